//! The guest gives back memory it frees (the qemu driver's virtio-balloon with free page
//! reporting): a container fills and then removes a file in its tmpfs, and the guest RAM
//! qemu holds on the host shrinks again. On whichever guest the tests boot (`RUNV_GUEST_DIR`):
//! Debian's kernel loads `virtio_balloon` as a module, runv's own has it built in.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{Env, text};

/// What the container writes into its /dev/shm and removes again (MiB). Small enough for a
/// 128 MiB guest on Debian's kernel, which leaves ~35 MiB free.
const FILL_MIB: u64 = 24;

/// Resident size (KiB) of qemu's guest RAM: its anonymous mapping of at least `ram_kib`.
fn guest_ram_rss_kib(qemu: u32, ram_kib: u64) -> u64 {
    let smaps = fs::read_to_string(format!("/proc/{qemu}/smaps")).unwrap();
    let mut in_ram = false;
    let mut best = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                // Anonymous: no path after the inode.
                in_ram = (b - a) / 1024 >= ram_kib && line.split_whitespace().count() == 5;
                continue;
            }
        }
        if in_ram && first == "Rss:" {
            best = best.max(words.next().unwrap().parse().unwrap());
        }
    }
    assert!(
        best > 0,
        "no guest RAM mapping of {ram_kib} KiB in qemu {qemu}"
    );
    best
}

#[test]
fn freed_guest_memory_goes_back_to_the_host() {
    let env = Env::new("guest-memory");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            &format!(
                "dd if=/dev/zero of=/dev/shm/fill bs=1M count={FILL_MIB} 2>/dev/null && \
                 touch /tmp/filled && sleep 1000"
            ),
        ],
    );
    env.edit_spec(&bundle, |s| {
        s["annotations"] = serde_json::json!({"runv.vm.memory_mib": "128"});
    });
    // The detached monitor keeps the command's stdio: files, not pipes.
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "--detach", "--bundle"])
            .arg(&bundle)
            .arg("m1"),
        180,
    );
    assert!(status.success(), "runv run --detach: {err}");
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(env.root.join("m1/state.json")).unwrap()).unwrap();
    let qemu = state["runv"]["vm_pids"][0].as_u64().unwrap() as u32;
    let ram_kib = 128 << 10;

    // The guest's balloon driver is bound and reports free pages in blocks it can have free
    // in 128 MiB (256 KiB: the agent set the order for the guest's size).
    let out = env.run_ok(
        env.runv().args([
            "exec",
            "m1",
            "sh",
            "-c",
            "ls /sys/bus/virtio/drivers/virtio_balloon/ | grep -c virtio; \
             cat /sys/module/page_reporting/parameters/page_reporting_order",
        ]),
        60,
    );
    assert_eq!(text(&out.stdout), "1\n6\n", "{}", text(&out.stderr));

    common::wait_until(60, "the container to fill its tmpfs", || {
        env.run(
            env.runv().args(["exec", "m1", "test", "-e", "/tmp/filled"]),
            30,
        )
        .status
        .success()
    });
    let filled = guest_ram_rss_kib(qemu, ram_kib);
    env.run_ok(env.runv().args(["exec", "m1", "rm", "/dev/shm/fill"]), 60);
    // Reports go out 2 s after pages are freed; under TCG on a loaded machine, give it time.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut now = guest_ram_rss_kib(qemu, ram_kib);
    while filled.saturating_sub(now) < (FILL_MIB / 2) << 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        now = guest_ram_rss_kib(qemu, ram_kib);
    }
    assert!(
        filled.saturating_sub(now) >= (FILL_MIB / 2) << 10,
        "guest RAM resident on the host: {filled} KiB with the {FILL_MIB} MiB file, still \
         {now} KiB 60 s after it was removed"
    );

    env.run_ok(env.runv().args(["delete", "--force", "m1"]), 60);
    env.assert_clean();
}
