//! The QEMU driver with `-accel kvm`, proven inside a test host (`xtask vmtest`: a TCG VM with
//! `-cpu EPYC,+svm`, where kvm-amd gives a real nested KVM). One test-host boot runs every KVM
//! check; the built xtask binary is called directly (`cargo xtask` from inside `cargo test`
//! would deadlock on the target-dir lock).
//!
//! Needs `cargo build --workspace` and `cargo xtask guest` first (scripts/test.sh does both).
//! Fails with a clear message when qemu-system-x86_64 is missing; skips (saying so) only when
//! the host's qemu has no TCG accelerator.

mod common;

use std::fs;

use common::{
    TempDir, assert_built, make_bundle, qemu_with_tcg, run_in_test_host, target_dir, value,
};

/// Everything the KVM path needs, in one test-host boot.
const SCRIPT: &str = r#"
set -u
export RUNV_TEMPLATE=off  # cold starts (templates_kvm tests the clones)
B="$1"      # prints CONTAINER-KERNEL and CONTAINER-MEM-KIB, exits 42
AUTO="$2"   # prints AUTO-CONTAINER=ran
step() { echo "== $*"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

step "/dev/kvm inside the test host"
ls -l /dev/kvm
grep -qw svm /proc/cpuinfo && echo "SVM=yes"
# A KVM VM is created (KVM_CREATE_VM and a vCPU) and quit: /dev/kvm answers real ioctls.
if echo quit | timeout 60 qemu-system-x86_64 -M none -accel kvm -nodefaults -display none \
        -monitor stdio >/dev/null 2>/tmp/kvmprobe.err; then
    echo "KVM-PROBE=ok"
else
    echo "KVM-PROBE=failed"; cat /tmp/kvmprobe.err
fi

step "runv drivers"
runv drivers
runv drivers --format json > /tmp/drivers.json
grep -o '"description": *"QEMU microvm ([^"]*)"' /tmp/drivers.json | sed 's/^/QEMU-DESC=/'

step "runv --accel kvm run"
t0=$(now_ms)
timeout 120 runv --accel kvm --root /tmp/r run --bundle "$B" c1
rc=$?
t1=$(now_ms)
echo "RUN-KVM-RC=$rc"
echo "RUN-KVM-MS=$((t1 - t0))"

step "runv run --detach without --accel (the driver chooses)"
t0=$(now_ms)
timeout 120 runv --root /tmp/r run --detach --bundle "$AUTO" c2 </dev/null
echo "RUN-D-RC=$?"
for _ in $(seq 300); do
    runv --root /tmp/r state c2 | grep -q '"stopped"' && break
    sleep 0.2
done
t1=$(now_ms)
runv --root /tmp/r state c2 | grep -o '"status": *"[a-z]*"' | sed 's/^/AUTO-STATE=/'
echo "RUN-AUTO-MS=$((t1 - t0))"
if grep -q -- '-accel kvm' /tmp/r/c2/hypervisor.log; then echo "AUTO-ACCEL=kvm"; fi
if grep -q -- 'using TCG' /tmp/r/c2/hypervisor.log; then echo "AUTO-ACCEL=tcg"; fi
sed 's/^/hypervisor.log: /' /tmp/r/c2/hypervisor.log | cut -c1-300
runv --root /tmp/r delete --force c2
echo "SCRIPT-DONE=yes"
"#;

#[test]
fn qemu_driver_uses_kvm_inside_the_test_host() {
    if qemu_with_tcg("qemu_driver_uses_kvm_inside_the_test_host").is_none() {
        return;
    }
    let target = target_dir();
    let runv = target.join("debug/runv");
    assert_built(&[
        "debug/runv",
        "debug/librunv_driver_qemu.so",
        "guest/vmlinux",
        "guest/initrd.img",
    ]);
    let release = fs::read_to_string(target.join("guest/kernel.release")).unwrap();

    // Under target/ (the test host sees the host's / but has its own fresh /tmp).
    let dir = TempDir(target.join(format!("vmtest-kvm-{}", std::process::id())));
    let _ = fs::remove_dir_all(&dir.0);
    let bundle = dir.0.join("bundle");
    make_bundle(
        &runv,
        &bundle,
        &[
            "sh",
            "-c",
            "echo \"CONTAINER-KERNEL=$(uname -r)\"; \
             echo \"CONTAINER-MEM-KIB=$(awk '/MemTotal/{print $2}' /proc/meminfo)\"; exit 42",
        ],
    );
    let auto = dir.0.join("auto");
    make_bundle(&runv, &auto, &["sh", "-c", "echo AUTO-CONTAINER=ran"]);
    let script = dir.0.join("kvm-checks.sh");
    fs::write(&script, SCRIPT).unwrap();

    // The script needs ~30 s.
    let out = run_in_test_host(&script, &[&bundle, &auto], 240);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    println!("{all}");
    assert!(
        out.status.success(),
        "xtask vmtest failed: {}\n{all}",
        out.status
    );
    assert_eq!(value(&stdout, "SCRIPT-DONE"), Some("yes"), "{all}");

    // /dev/kvm works in the test host.
    assert_eq!(value(&stdout, "SVM"), Some("yes"), "{all}");
    assert_eq!(value(&stdout, "KVM-PROBE"), Some("ok"), "{all}");

    // The driver reports KVM there.
    let desc = value(&stdout, "QEMU-DESC").unwrap_or_default();
    assert!(
        desc.contains("(KVM)"),
        "qemu driver description {desc:?}\n{all}"
    );

    // runv --accel kvm boots the guest, the container prints the guest's kernel, and its exit
    // status comes back.
    assert_eq!(value(&stdout, "RUN-KVM-RC"), Some("42"), "{all}");
    assert_eq!(
        value(&stdout, "CONTAINER-KERNEL"),
        Some(release.trim()),
        "{all}"
    );
    // It ran in the small nested VM (default 128 MiB), not in the 4 GiB test host.
    let mem: u64 = value(&stdout, "CONTAINER-MEM-KIB")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(mem < 1024 * 1024, "container MemTotal {mem} KiB\n{all}");

    // Without --accel the driver chose KVM by itself, and says so in hypervisor.log.
    assert_eq!(value(&stdout, "RUN-D-RC"), Some("0"), "{all}");
    assert_eq!(value(&stdout, "AUTO-CONTAINER"), Some("ran"), "{all}");
    assert!(
        stdout.contains("AUTO-STATE=\"status\": \"stopped\"")
            || stdout.contains("AUTO-STATE=\"status\":\"stopped\""),
        "{all}"
    );
    let accels: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("AUTO-ACCEL="))
        .collect();
    assert_eq!(accels, ["kvm"], "{all}");

    for key in ["RUN-KVM-MS", "RUN-AUTO-MS"] {
        eprintln!("{key}: {}", value(&stdout, key).unwrap_or("?"));
    }
}
