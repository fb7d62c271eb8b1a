//! Device-mapper and loop devices seen and torn down from outside the driver, with `dmsetup`
//! and `losetup`, for the tests that run the devmapper driver (runv-cli's includes it too).
//! Nothing here panics, so it serves in `Drop`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// dmsetup without udev (it then makes and removes /dev/mapper nodes itself); None when it
/// cannot be run.
pub fn dmsetup(args: &[&str]) -> Option<Output> {
    Command::new("dmsetup")
        .env("DM_DISABLE_UDEV", "1")
        .arg("--noudevsync")
        .args(args)
        .output()
        .ok()
}

pub fn exists(name: &str) -> bool {
    dmsetup(&["info", name]).is_some_and(|o| o.status.success())
}

/// Removes device `name` if it exists, and its /dev/mapper node.
pub fn remove(name: &str) -> Result<(), String> {
    if exists(name) {
        match dmsetup(&["remove", name]) {
            Some(o) if o.status.success() => {}
            other => return Err(format!("dmsetup remove {name}: {other:?}")),
        }
    }
    let _ = std::fs::remove_file(Path::new("/dev/mapper").join(name));
    Ok(())
}

/// Detaches every loop device over `file` (`losetup -j`, then `-d` each).
pub fn detach_loops(file: &Path) {
    let Ok(out) = Command::new("losetup").arg("-j").arg(file).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(dev) = line.split(':').next() {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}
