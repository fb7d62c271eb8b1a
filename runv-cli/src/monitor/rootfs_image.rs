//! A block image of a directory rootfs, for hypervisor drivers that cannot share directories
//! (kvm-native). The image is a copy: the container's writes stay in it, not in the bundle.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use runv_api::{Capabilities, PreparedRootfs, RootfsSource};

const MIB: u64 = 1 << 20;
/// Room for the container's own writes and for ext4's metadata.
const SLACK_BYTES: u64 = 256 * MIB;

/// What the driver can take, given what storage prepared: the rootfs unchanged, or `None`
/// when a directory must become an image first.
pub fn fit(
    driver: &str,
    caps: Capabilities,
    prepared: PreparedRootfs,
) -> anyhow::Result<Result<PreparedRootfs, PreparedRootfs>> {
    let shared = caps.contains(Capabilities::SHARED_DIR_ROOTFS);
    let block = caps.contains(Capabilities::BLOCK_ROOTFS);
    match &prepared.source {
        RootfsSource::SharedDir { .. } if shared => Ok(Ok(prepared)),
        RootfsSource::SharedDir { .. } if block => Ok(Err(prepared)),
        RootfsSource::Block { .. } if block => Ok(Ok(prepared)),
        RootfsSource::SharedDir { .. } => {
            bail!("hypervisor driver {driver} takes neither a shared-directory nor a block rootfs")
        }
        RootfsSource::Block { .. } => bail!(
            "hypervisor driver {driver} cannot take a block rootfs: choose another storage driver"
        ),
    }
}

/// Bytes and inodes under `dir`, not following symbolic links.
fn usage(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut bytes, mut inodes) = (0u64, 1u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let meta = entry.metadata()?;
            inodes += 1;
            bytes += meta.len().next_multiple_of(4096);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Writes an ext4 image of `dir` to `image` (`mkfs.ext4 -d`, which keeps owners and modes).
pub fn build(dir: &Path, image: &Path, readonly: bool) -> anyhow::Result<PreparedRootfs> {
    let (bytes, inodes) = usage(dir)?;
    let size = (bytes + bytes / 4 + SLACK_BYTES).next_multiple_of(MIB);
    let file = std::fs::File::create(image)
        .with_context(|| format!("creating the rootfs image {}", image.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing the rootfs image {}", image.display()))?;
    drop(file);
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-O", "^has_journal"])
        .arg("-N")
        .arg((inodes + 16384).to_string())
        .arg("-d")
        .arg(dir)
        .arg(image)
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = std::fs::remove_file(image);
            bail!(
                "mkfs.ext4 not found (install e2fsprogs): it builds the rootfs image for drivers without shared directories"
            )
        }
        Err(e) => return Err(e).context("running mkfs.ext4"),
    };
    if !output.status.success() {
        let _ = std::fs::remove_file(image);
        bail!(
            "mkfs.ext4 -d {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(PreparedRootfs {
        source: RootfsSource::Block {
            path: image.to_path_buf(),
            fs_type: "ext4".into(),
        },
        readonly,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_rootfs() -> PreparedRootfs {
        PreparedRootfs {
            source: RootfsSource::SharedDir { path: "/r".into() },
            readonly: false,
        }
    }

    #[test]
    fn a_directory_goes_to_an_image_only_for_block_only_drivers() {
        let both = Capabilities::SHARED_DIR_ROOTFS | Capabilities::BLOCK_ROOTFS;
        assert!(fit("qemu", both, dir_rootfs()).unwrap().is_ok());
        assert!(
            fit("kvm-native", Capabilities::BLOCK_ROOTFS, dir_rootfs())
                .unwrap()
                .is_err()
        );
        let err = fit("x", Capabilities::PAUSE, dir_rootfs()).unwrap_err();
        assert!(err.to_string().contains("neither"), "{err}");
        let block = PreparedRootfs {
            source: RootfsSource::Block {
                path: "/dev/x".into(),
                fs_type: "ext4".into(),
            },
            readonly: true,
        };
        let err = fit("kvmtool", Capabilities::SHARED_DIR_ROOTFS, block).unwrap_err();
        assert!(
            err.to_string().contains("cannot take a block rootfs"),
            "{err}"
        );
    }

    #[test]
    fn usage_counts_files_and_directories() {
        let dir = std::env::temp_dir().join(format!("runv-usage-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/f"), vec![0u8; 5000]).unwrap();
        let (bytes, inodes) = usage(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(inodes, 4);
        assert!(bytes >= 8192, "{bytes}");
    }
}
