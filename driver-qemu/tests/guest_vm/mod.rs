//! What the tests that boot the development guest straight through the qemu driver share: this
//! crate's `real_vm.rs`, and storage-devmapper's `block_rootfs_vm.rs` (as a `#[path]` module,
//! since test files cannot be a dependency).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use runv_api::VmConfig;

/// A scratch directory; on drop (also when a test fails) every process started with a path
/// inside it on its command line (our qemu) is killed by pid, then the directory is removed.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("runv-vm-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn processes(&self) -> Vec<i32> {
        let needle = self.0.to_str().unwrap().as_bytes().to_vec();
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // The test itself may name the directory in its arguments.
            if pid == std::process::id() as i32 {
                continue;
            }
            if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
                if cmdline
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice())
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for pid in self.processes() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `$RUNV_GUEST_DIR`, else the workspace's `target/guest` (made by `cargo xtask guest`).
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNV_GUEST_DIR") {
        return dir.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("guest")
}

/// A 1-vCPU, 256 MiB VM booting the development guest, its files in `scratch`.
pub fn config(scratch: &Scratch, name: &str) -> VmConfig {
    let guest = guest_dir();
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initrd.img"));
    assert!(
        kernel.exists() && initrd.exists(),
        "{} or {} is missing: run `cargo xtask guest` first",
        kernel.display(),
        initrd.display()
    );
    VmConfig {
        version: runv_api::VM_CONFIG_VERSION,
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        kernel,
        initrd: Some(initrd),
        kernel_params: "quiet".into(),
        state_dir: scratch.0.join("state"),
        console_log: scratch.0.join("console.log"),
        log_file: Some(scratch.0.join("qemu.log")),
        ..Default::default()
    }
}

/// What the VM wrote (qemu's log and the console's last 40 lines), for failure messages.
pub fn logs(scratch: &Scratch) -> String {
    let read = |n: &str| fs::read_to_string(scratch.0.join(n)).unwrap_or_default();
    let console = read("console.log");
    let lines: Vec<&str> = console.lines().collect();
    format!(
        "--- qemu.log ---\n{}\n--- console.log (tail) ---\n{}",
        read("qemu.log"),
        lines[lines.len().saturating_sub(40)..].join("\n")
    )
}
