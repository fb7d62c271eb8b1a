//! `runv --storage devmapper run`: the container's rootfs is a thin snapshot handed to the VM
//! as a virtio-blk disk. Needs device-mapper in the kernel: CI runs this binary inside the
//! test host (`cargo xtask vmtest`); elsewhere it says it is skipped. Runs on the default
//! driver (qemu, with KVM in the test host), on kvm-native (which needs a usable KVM), and on
//! kvmtool where a real `lkvm` is installed (`skipped: no lkvm` otherwise).

mod common;
#[path = "../../storage-devmapper/tests/dm_host/mod.rs"]
mod dm_host;

use std::path::{Path, PathBuf};

use common::{Env, text};

/// The driver's default pool (`runv` passes it no options), removed at the end of a test that
/// made it, also when the test fails: its devices, loop devices and directory.
struct DefaultPool {
    made_here: bool,
}

const POOL_DIR: &str = "/var/lib/runv/devmapper";

impl DefaultPool {
    fn new() -> Self {
        DefaultPool {
            made_here: !Path::new(POOL_DIR).join("pool.json").exists(),
        }
    }
}

impl Drop for DefaultPool {
    fn drop(&mut self) {
        if !self.made_here {
            return;
        }
        // Bases are inactive once made and snapshots go with their containers: the pool is
        // what is left active.
        let _ = dm_host::remove("runv-pool");
        for f in ["metadata.img", "data.img"] {
            dm_host::detach_loops(&Path::new(POOL_DIR).join(f));
        }
        let _ = std::fs::remove_dir_all(POOL_DIR);
    }
}

#[test]
fn a_container_runs_on_a_thin_snapshot_and_delete_removes_it() {
    if !Path::new("/dev/mapper/control").exists() {
        println!("skipped: no /dev/mapper/control");
        return;
    }
    thin_snapshot_run("dm", &[], None);
}

#[test]
fn kvm_native_runs_a_container_on_a_thin_snapshot() {
    if !Path::new("/dev/mapper/control").exists() {
        println!("skipped: no /dev/mapper/control");
        return;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !runv_api::cpuinfo_has_virt_flag(&cpuinfo) || !Path::new("/dev/kvm").exists() {
        println!("skipped: no usable KVM for the kvm-native driver (no vmx/svm or no /dev/kvm)");
        return;
    }
    thin_snapshot_run("dmkn", &["--driver", "kvm-native"], None);
}

#[test]
fn kvmtool_runs_a_container_on_a_thin_snapshot() {
    let Some(lkvm) = lkvm() else {
        println!(
            "skipped: no lkvm (install kvmtool's lkvm as /usr/local/bin/lkvm, see the README)"
        );
        return;
    };
    if !Path::new("/dev/mapper/control").exists() {
        println!("skipped: no /dev/mapper/control");
        return;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !runv_api::cpuinfo_has_virt_flag(&cpuinfo) || !Path::new("/dev/kvm").exists() {
        println!("skipped: no usable KVM for the kvmtool driver (no vmx/svm or no /dev/kvm)");
        return;
    }
    thin_snapshot_run("dmkt", &["--driver", "kvmtool"], Some(&lkvm));
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

/// `lkvm`: the kvmtool binary, given to runv as `$RUNV_KVMTOOL`.
fn thin_snapshot_run(id: &str, driver: &[&str], lkvm: Option<&Path>) {
    let _pool = DefaultPool::new();
    let env = Env::new(id);
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "grep ' / ' /proc/mounts; echo written > /tmp/f; cat /tmp/f",
        ],
    );
    let mut runv = env.runv();
    if let Some(lkvm) = lkvm {
        runv.env("RUNV_KVMTOOL", lkvm);
    }
    let out = env.run(
        runv.args(driver)
            .args(["--storage", "devmapper", "run", "--bundle"])
            .arg(&bundle)
            .arg(id),
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
        !Path::new(&format!("/dev/mapper/runv-c-{id}")).exists(),
        "the snapshot is removed"
    );
    env.assert_clean();
}
