//! `runv --storage devmapper run`: the container's rootfs is a thin snapshot handed to the VM
//! as a virtio-blk disk. Needs device-mapper in the kernel: CI runs this binary inside the
//! test host (`cargo xtask vmtest`); elsewhere it says it is skipped.

mod common;

use std::path::Path;

use common::{Env, text};

#[test]
fn a_container_runs_on_a_thin_snapshot_and_delete_removes_it() {
    if !Path::new("/dev/mapper/control").exists() {
        println!("skipped: no /dev/mapper/control");
        return;
    }
    let env = Env::new("dm");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "grep ' / ' /proc/mounts; echo written > /tmp/f; cat /tmp/f",
        ],
    );
    let out = env.run(
        env.runv()
            .args(["--storage", "devmapper", "run", "--bundle"])
            .arg(&bundle)
            .arg("dm1"),
        600,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/vda / ext4"), "{stdout}");
    assert!(stdout.contains("written"), "{stdout}");
    assert!(
        !bundle.join("rootfs/tmp/f").exists(),
        "the bundle stays untouched"
    );
    assert!(
        !Path::new("/dev/mapper/runv-c-dm1").exists(),
        "the snapshot is removed"
    );
    env.assert_clean();
}
