//! The host programs the driver runs for what is not device-mapper: `losetup` (loop devices
//! over the pool's sparse files), `blockdev` (a device's size) and `mkfs.ext4 -d` (filling a
//! base from a bundle's rootfs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the driver runs, for the probe.
pub const PROGRAMS: [&str; 3] = ["mkfs.ext4", "losetup", "blockdev"];

/// Runs `cmd`; its trimmed stdout, or one line with its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("running {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            stderr.trim().replace('\n', "; ")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `program` is in `PATH`.
pub fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// The size of block device `dev` in bytes.
pub fn block_size(dev: &Path) -> Result<u64, String> {
    run(Command::new("blockdev").arg("--getsize64").arg(dev))?
        .parse()
        .map_err(|e| format!("size of {}: {e}", dev.display()))
}

/// The loop device backing `file`, attaching it when none does.
pub fn loop_for(file: &Path) -> Result<PathBuf, String> {
    let found = run(Command::new("losetup").arg("-j").arg(file))?;
    if let Some(dev) = found.lines().next().and_then(|l| l.split(':').next()) {
        if !dev.is_empty() {
            return Ok(dev.into());
        }
    }
    Ok(run(Command::new("losetup").args(["--find", "--show"]).arg(file))?.into())
}

/// Makes an ext4 filesystem on `dev` holding the files of `rootfs`.
pub fn mkfs_ext4_from(rootfs: &Path, dev: &Path) -> Result<(), String> {
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1",
            "-d",
        ])
        .arg(rootfs)
        .arg(dev))
    .map(drop)
}
