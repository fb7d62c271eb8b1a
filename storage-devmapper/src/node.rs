//! `/dev/mapper/<name>` nodes. The `devicemapper` crate, unlike libdevmapper, never makes them
//! (it leaves that to udev), so where no udev runs this driver makes them itself.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::stat::{Mode, SFlag, makedev, mknod};

const UDEV_CONTROL: &str = "/run/udev/control";

fn path(n: &str) -> PathBuf {
    Path::new("/dev/mapper").join(n)
}

/// Makes `/dev/mapper/<n>` a block node (0600) of `major:minor` unless udev made it (as a
/// symlink to `../dm-N`) or it is there already.
pub fn make(n: &str, major: u32, minor: u32) -> Result<PathBuf, String> {
    let node = path(n);
    let want = makedev(major.into(), minor.into());
    // The crate waits for udev's rules before it returns, so a node udev makes is there; the
    // short wait only covers a udev that started meanwhile.
    for _ in 0..100 {
        if let Ok(md) = fs::metadata(&node) {
            if md.file_type().is_block_device() && md.rdev() == want {
                return Ok(node);
            }
            // A stale node of an earlier device of that name.
            fs::remove_file(&node)
                .map_err(|e| format!("devmapper storage: removing {}: {e}", node.display()))?;
            break;
        }
        if !Path::new(UDEV_CONTROL).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    mknod(&node, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), want)
        .map_err(|e| format!("devmapper storage: mknod {}: {e}", node.display()))?;
    Ok(node)
}

/// Removes `/dev/mapper/<n>` if it is there.
pub fn remove(n: &str) -> Result<(), String> {
    let node = path(n);
    match fs::remove_file(&node) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(format!(
            "devmapper storage: removing {}: {e}",
            node.display()
        )),
        _ => Ok(()),
    }
}
