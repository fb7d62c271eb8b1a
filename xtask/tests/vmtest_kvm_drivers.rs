//! Both KVM hypervisor paths, end to end inside a test host (`xtask vmtest`, where kvm-amd
//! gives a real nested KVM): `--driver kvm-native` and `--driver qemu --accel kvm` each boot
//! the guest, run a busybox container and return its exit status, and carry a detached
//! container through create, start, exec, pause, resume, kill and delete, leaving nothing
//! behind, and connect a container in a network namespace (a veth pair) to the test host.
//! kvm-native also boots the bzImage (the 64-bit boot protocol; the vmlinux goes through PVH).
//! `runv drivers` lists kvm-native as available there.
//!
//! `--driver kvmtool` goes through the same steps with a real `lkvm` where one is installed on
//! this machine (`/usr/local/bin/lkvm` or `lkvm` in `PATH`: the test host sees this machine's
//! `/`); without one that test prints `skipped: no lkvm` (and `scripts/test.sh` says so in its
//! summary). kvmtool is not packaged by Debian: see the README for building it.
//!
//! Needs `cargo build --workspace` and `cargo xtask guest` first (scripts/test.sh does both).
//! With `RUNV_GUEST_DIR=target/guest/runv` every step boots runv's own kernel instead
//! (`cargo xtask kernel`).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{
    TempDir, assert_built, guest_dir, guest_flags, guest_release, make_bundle, qemu_with_tcg,
    run_in_test_host, target_dir, value,
};

const SCRIPT: &str = r#"
set -u
export RUNV_TEMPLATE=off  # cold starts (templates_kvm tests the clones)
B="$1"        # prints CONTAINER-KERNEL, exits 42
SLEEPER="$2"  # sleeps
PINGER="$3"   # in netns n1: pings 10.9.0.1
VMLINUZ="$4"  # the guest kernel as a bzImage for kvm-native, or - to skip that step
DRIVERS="$5"  # NAME:FLAGS;NAME:FLAGS... (FLAGS split at spaces)
if [ "$6" != - ]; then export RUNV_KVMTOOL="$6"; fi  # the lkvm binary, or -
INITRD="$7"   # the initrd to boot the bzImage with, or - for runv's default
step() { echo "== $*"; }
R=/tmp/r

step "a network namespace n1 with 10.9.0.2, its veth peer 10.9.0.1 here"
ip netns add n1
ip link add v0 type veth peer name v1
ip link set v1 netns n1
ip addr add 10.9.0.1/24 dev v0
ip link set v0 up
ip -n n1 addr add 10.9.0.2/24 dev v1
ip -n n1 link set v1 up

step "runv drivers"
runv drivers
runv drivers --format json | tr -d ' \n' | grep -o '{[^{}]*"name":"kvm-native"[^{}]*}' | sed 's/^/KN-DRIVER=/'
runv drivers --format json | tr -d ' \n' | grep -o '{[^{}]*"name":"kvmtool"[^{}]*}' | sed 's/^/KT-DRIVER=/'

old_ifs=$IFS
IFS=';'
for spec in $DRIVERS; do
    IFS=$old_ifs
    name=${spec%%:*}
    flags=${spec#*:}
    step "$name: run"
    timeout 120 runv $flags --root $R run --bundle "$B" run-$name </dev/null >/tmp/run.out
    echo "$name-RUN-RC=$?"
    cat /tmp/run.out
    sed -n "s/^ROOTFS-TYPE=/$name-ROOTFS-TYPE=/p" /tmp/run.out
    # What the container wrote on its rootfs is in the bundle, as with runc (a shared
    # directory; not where the driver got a copy of it as an image).
    if [ "$(cat "$B/rootfs/written-by-guest" 2>/dev/null)" = written ]; then
        echo "$name-WRITE-IN-BUNDLE=yes"
    else
        echo "$name-WRITE-IN-BUNDLE=no"
    fi
    # Its owner, group and mode (set-uid included) as the container set them.
    echo "$name-OWNER-MODE=$(stat -c %u:%g:%a "$B/rootfs/written-by-guest" 2>/dev/null)"
    rm -f "$B/rootfs/written-by-guest"
    # And what it wrote into its volume (a bind mount of a host directory).
    if [ "$(cat "$B/vol/from-guest" 2>/dev/null)" = vol ]; then
        echo "$name-VOLUME-WRITE=yes"
    else
        echo "$name-VOLUME-WRITE=no"
    fi
    rm -f "$B/vol/from-guest"

    step "$name: networking"
    timeout 120 runv $flags --root $R run --bundle "$PINGER" net-$name </dev/null >/tmp/net.out
    echo "$name-NET-RC=$?"
    sed "s/^PING-OK/$name-PING=ok/" /tmp/net.out
    if tc -n n1 qdisc show dev v1 | grep -q ingress || ip -n n1 link show | grep -q rvtap; then
        echo "$name-LEFTOVER=network"
    fi

    step "$name: create, start, exec, pause, resume, kill, delete"
    id=life-$name
    timeout 120 runv $flags --root $R create --bundle "$SLEEPER" $id </dev/null
    echo "$name-CREATE-RC=$?"
    timeout 30 runv --root $R start $id
    echo "$name-START-RC=$?"
    timeout 60 runv --root $R exec $id sh -c "echo $name-EXEC-OUT=\$(cat /proc/1/comm); exit 5"
    echo "$name-EXEC-RC=$?"
    # The guest's virtio devices, by id (3 console/serial, 19 vsock, 26 fs...).
    timeout 60 runv --root $R exec $id sh -c 'echo $(cat /sys/bus/virtio/devices/*/device)' |
        sed "s/^/$name-VIRTIO-IDS=/"
    timeout 30 runv --root $R pause $id
    echo "$name-PAUSE-RC=$?"
    runv --root $R state $id | tr -d ' \n' | grep -o '"status":"[a-z]*"' | sed "s/^/$name-PAUSED-/"
    timeout 30 runv --root $R resume $id
    echo "$name-RESUME-RC=$?"
    timeout 60 runv --root $R exec $id true
    echo "$name-EXEC-AFTER-RESUME-RC=$?"
    timeout 30 runv --root $R kill $id KILL
    echo "$name-KILL-RC=$?"
    for _ in $(seq 150); do
        runv --root $R state $id | grep -q '"stopped"' && break
        sleep 0.2
    done
    runv --root $R state $id | tr -d ' \n' | grep -o '"status":"[a-z]*"' | sed "s/^/$name-KILLED-/"
    timeout 30 runv --root $R delete $id
    echo "$name-DELETE-RC=$?"
    if [ -e $R/$id ] || [ -e $R/run-$name ]; then echo "$name-LEFTOVER=state"; fi
    if pgrep -f "runv __monitor" >/dev/null; then echo "$name-LEFTOVER=monitor"; fi
    if pgrep -x lkvm >/dev/null; then echo "$name-LEFTOVER=lkvm"; fi
    if pgrep -x virtiofsd >/dev/null; then echo "$name-LEFTOVER=virtiofsd"; fi
    if pgrep qemu-system >/dev/null; then
        ps -eo pid,ppid,stat,etimes,args | grep '[q]emu-system' | cut -c1-200
        sleep 3
        if pgrep -x lkvm >/dev/null; then echo "$name-LEFTOVER=lkvm"; fi
        if pgrep qemu-system >/dev/null; then echo "$name-LEFTOVER=qemu"; else echo "$name-QEMU-EXITED-LATE=yes"; fi
    fi
    if [ "$name" = kvm-native ] && command -v virtiofsd >/dev/null; then
        step "$name: virtiofsd killed under a running container"
        timeout 120 runv $flags --root $R run -d --bundle "$SLEEPER" vfs-$name </dev/null >/dev/null 2>&1
        pkill -KILL -x virtiofsd
        for _ in $(seq 150); do
            runv --root $R state vfs-$name | grep -q '"stopped"' && break
            sleep 0.2
        done
        runv --root $R state vfs-$name | tr -d ' \n' | grep -o '"status":"[a-z]*"' | sed "s/^/$name-AFTER-VIRTIOFSD-KILLED-/"
        timeout 30 runv --root $R delete -f vfs-$name
        echo "$name-VFS-DELETE-RC=$?"
    fi
done

IFS=$old_ifs

if [ "$VMLINUZ" != - ]; then
    step "kvm-native: the bzImage, through the 64-bit boot protocol"
    if [ "$INITRD" = - ]; then set --; else set -- --initrd "$INITRD"; fi
    timeout 200 runv --driver kvm-native --kernel "$VMLINUZ" "$@" --root $R run --bundle "$B" bz </dev/null
    echo "BZIMAGE-RUN-RC=$?"
fi
echo "SCRIPT-DONE=yes"
"#;

#[test]
fn kvm_native_and_qemu_kvm_run_containers_inside_the_test_host() {
    let name = "kvm_native_and_qemu_kvm_run_containers_inside_the_test_host";
    if qemu_with_tcg(name).is_none() {
        return;
    }
    assert_built(&[
        "debug/runv",
        "debug/librunv_driver_qemu.so",
        "debug/librunv_driver_kvm_native.so",
        "guest/vmlinux",
        "guest/vmlinuz",
        "guest/initrd.img",
    ]);
    let (stdout, all, release) = drive(
        "drivers",
        &[
            ("kvm-native", "--driver kvm-native"),
            ("qemu-kvm", "--driver qemu --accel kvm"),
        ],
        None,
        true,
        400,
    );

    let kn = value(&stdout, "KN-DRIVER").unwrap_or_default();
    assert!(
        kn.contains("\"available\":true"),
        "kvm-native in runv drivers: {kn:?}\n{all}"
    );
    // Each driver printed the guest's kernel (one container per driver, then kvm-native booting
    // the bzImage), and the bzImage run's status came back too.
    assert_eq!(kernels(&stdout), [release.as_str(); 3], "{all}");
    assert_eq!(value(&stdout, "BZIMAGE-RUN-RC"), Some("42"), "{all}");
    for name in ["kvm-native", "qemu-kvm"] {
        check_driver(&stdout, name, &all);
    }
    // With KVM and vhost-vsock (the test host has both) qemu's agent channel is a vsock,
    // not a virtio-serial port; everything above went through it.
    let ids = value(&stdout, "qemu-kvm-VIRTIO-IDS").unwrap_or_default();
    let ids: Vec<&str> = ids.split_whitespace().collect();
    assert!(
        ids.contains(&"0x0013"),
        "qemu-kvm has no vsock: {ids:?}\n{all}"
    );
    assert!(
        !ids.contains(&"0x0003"),
        "qemu-kvm still has a serial port: {ids:?}\n{all}"
    );
    // qemu shares the bundle's directory by 9p; kvm-native by virtio-fs where virtiofsd is
    // installed (scripts/test.sh builds it), else it copies it into an image.
    assert_eq!(value(&stdout, "qemu-kvm-ROOTFS-TYPE"), Some("9p"), "{all}");
    let shared = |name: &str| {
        for (key, want) in [
            ("WRITE-IN-BUNDLE", "yes"),
            ("OWNER-MODE", "1234:5678:4751"),
            ("VOLUME-WRITE", "yes"),
        ] {
            let key = format!("{name}-{key}");
            assert_eq!(value(&stdout, &key), Some(want), "{key}\n{all}");
        }
    };
    shared("qemu-kvm");
    let (fs_type, in_bundle) = if virtiofsd_installed() {
        shared("kvm-native");
        // A virtiofsd killed under a running container ends its VM: the container is
        // stopped, not hanging on its files.
        assert!(
            stdout.contains("kvm-native-AFTER-VIRTIOFSD-KILLED-\"status\":\"stopped\""),
            "{all}"
        );
        assert_eq!(
            value(&stdout, "kvm-native-VFS-DELETE-RC"),
            Some("0"),
            "{all}"
        );
        ("virtiofs", "yes")
    } else {
        println!("kvm-native: no virtiofsd here, so its rootfs is an image copy");
        ("ext4", "no")
    };
    assert_eq!(
        value(&stdout, "kvm-native-ROOTFS-TYPE"),
        Some(fs_type),
        "{all}"
    );
    assert_eq!(
        value(&stdout, "kvm-native-WRITE-IN-BUNDLE"),
        Some(in_bundle),
        "{all}"
    );
}

/// Whether kvm-native finds a virtiofsd (the test host sees this machine's `/`).
fn virtiofsd_installed() -> bool {
    std::env::var_os("RUNV_VIRTIOFSD").is_none()
        && (["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"]
            .iter()
            .any(|p| Path::new(p).is_file())
            || std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .any(|d| d.join("virtiofsd").is_file()))
}

/// The same steps on a real kvmtool (`lkvm`), where one is installed.
#[test]
fn kvmtool_runs_containers_inside_the_test_host() {
    let name = "kvmtool_runs_containers_inside_the_test_host";
    let Some(lkvm) = lkvm() else {
        println!(
            "skipped: no lkvm (install kvmtool's lkvm as /usr/local/bin/lkvm, see the README)"
        );
        return;
    };
    if qemu_with_tcg(name).is_none() {
        return;
    }
    assert_built(&[
        "debug/runv",
        "debug/librunv_driver_kvmtool.so",
        "guest/vmlinux",
        "guest/vmlinuz",
        "guest/initrd.img",
    ]);
    println!("lkvm: {}", lkvm.display());
    let (stdout, all, release) = drive(
        "kvmtool",
        &[("kvmtool", "--driver kvmtool")],
        Some(&lkvm),
        false,
        400,
    );
    let driver = value(&stdout, "KT-DRIVER").unwrap_or_default();
    assert!(
        driver.contains("\"available\":true"),
        "kvmtool in runv drivers: {driver:?}\n{all}"
    );
    assert_eq!(kernels(&stdout), [release.as_str()], "{all}");
    check_driver(&stdout, "kvmtool", &all);
}

/// kvmtool's `lkvm`: `/usr/local/bin/lkvm` (where the README installs it), else from `PATH`.
fn lkvm() -> Option<PathBuf> {
    let local = Path::new("/usr/local/bin/lkvm");
    if local.is_file() {
        return Some(local.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("lkvm"))
        .find(|p| p.is_file())
}

/// Runs SCRIPT in a test host for `drivers` (name, runv flags), with `lkvm` as
/// `$RUNV_KVMTOOL`, and with the kvm-native bzImage step when `bzimage`; returns its stdout,
/// stdout and stderr for messages, and the guest kernel release.
fn drive(
    tag: &str,
    drivers: &[(&str, &str)],
    lkvm: Option<&Path>,
    bzimage: bool,
    timeout_s: u32,
) -> (String, String, String) {
    let target = target_dir();
    let runv = target.join("debug/runv");
    let release = guest_release();

    // Under target/ (the test host sees the host's / but has its own fresh /tmp).
    let dir = TempDir(target.join(format!("vmtest-{tag}-{}", std::process::id())));
    let _ = fs::remove_dir_all(&dir.0);
    let bundle = dir.0.join("bundle");
    make_bundle(
        &runv,
        &bundle,
        &[
            "sh",
            "-c",
            "echo \"CONTAINER-KERNEL=$(uname -r)\"; \
             echo \"ROOTFS-TYPE=$(awk '$2 == \"/\" {print $3}' /proc/mounts)\"; \
             echo written > /written-by-guest; chown 1234:5678 /written-by-guest; \
             chmod 4751 /written-by-guest; echo vol > /vol/from-guest; exit 42",
        ],
    );
    fs::create_dir(bundle.join("vol")).unwrap();
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/vol",
            "type": "bind",
            "source": bundle.join("vol"),
            "options": ["rbind", "rw"],
        }));
    for set in ["bounding", "effective", "permitted"] {
        let caps = spec["process"]["capabilities"][set].as_array_mut().unwrap();
        caps.push("CAP_CHOWN".into());
        caps.push("CAP_FOWNER".into());
    }
    fs::write(&config, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let sleeper = dir.0.join("sleeper");
    make_bundle(&runv, &sleeper, &["sleep", "600"]);
    let pinger = dir.0.join("pinger");
    make_bundle(
        &runv,
        &pinger,
        &[
            "sh",
            "-c",
            "ping -c 2 -W 5 10.9.0.1 >/dev/null && echo PING-OK",
        ],
    );
    let config = pinger.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
    let namespaces = spec["linux"]["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|n| n["type"] != "network");
    namespaces.push(serde_json::json!({"type": "network", "path": "/var/run/netns/n1"}));
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set]
            .as_array_mut()
            .unwrap()
            .push("CAP_NET_RAW".into());
    }
    fs::write(&config, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let script = dir.0.join("drivers.sh");
    fs::write(&script, SCRIPT).unwrap();

    let vmlinuz = if bzimage {
        guest_dir().join("vmlinuz")
    } else {
        PathBuf::from("-")
    };
    let guest = guest_flags();
    let initrd = match guest.iter().position(|f| f == "--initrd") {
        Some(i) => PathBuf::from(&guest[i + 1]),
        None => PathBuf::from("-"),
    };
    // The script splits the driver specs at ';' and the flags at spaces.
    assert!(
        guest.iter().all(|f| !f.contains([' ', ';'])),
        "guest paths must not hold spaces or semicolons: {guest:?}"
    );
    let guest = guest.join(" ");
    let specs: Vec<String> = drivers
        .iter()
        .map(|(n, f)| format!("{n}:{f} {guest}").trim_end().to_string())
        .collect();
    let specs = PathBuf::from(specs.join(";"));
    let out = run_in_test_host(
        &script,
        &[
            &bundle,
            &sleeper,
            &pinger,
            &vmlinuz,
            &specs,
            lkvm.unwrap_or(Path::new("-")),
            &initrd,
        ],
        timeout_s,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let all = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    println!("{all}");
    assert!(
        out.status.success(),
        "xtask vmtest failed: {}\n{all}",
        out.status
    );
    assert_eq!(value(&stdout, "SCRIPT-DONE"), Some("yes"), "{all}");
    (stdout, all, release)
}

fn kernels(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("CONTAINER-KERNEL="))
        .collect()
}

/// One driver's run, networking and lifecycle results, and that it left nothing behind.
fn check_driver(stdout: &str, name: &str, all: &str) {
    let key = |k: &str| format!("{name}-{k}");
    let expect = |k: &str, v: &str| {
        assert_eq!(value(stdout, &key(k)), Some(v), "{}\n{all}", key(k));
    };
    expect("RUN-RC", "42");
    // The container reached the test host through its veth, via the driver's NIC.
    expect("NET-RC", "0");
    expect("PING", "ok");
    for step in [
        "CREATE-RC",
        "START-RC",
        "PAUSE-RC",
        "RESUME-RC",
        "KILL-RC",
        "DELETE-RC",
    ] {
        expect(step, "0");
    }
    // exec ran in the container (whose pid 1 is the sleeper) and its status came back.
    expect("EXEC-OUT", "sleep");
    expect("EXEC-RC", "5");
    expect("EXEC-AFTER-RESUME-RC", "0");
    assert!(
        stdout.contains(&format!("{name}-PAUSED-\"status\":\"paused\"")),
        "{name} paused state\n{all}"
    );
    assert!(
        stdout.contains(&format!("{name}-KILLED-\"status\":\"stopped\"")),
        "{name} stopped after kill\n{all}"
    );
    assert_eq!(
        value(stdout, &key("LEFTOVER")),
        None,
        "{}\n{all}",
        key("LEFTOVER")
    );
}
