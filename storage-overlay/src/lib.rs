//! A runv storage plugin: the container's rootfs is an overlayfs whose lower layer is the bundle's
//! `rootfs` (never written to), with the upper and work directories in the container's state
//! directory. The merged directory is handed to the VM as a shared directory (9p / virtio-fs).
//!
//! Layout under `StorageRequest::state_dir`:
//!
//! ```text
//! overlay/upper    the container's changes
//! overlay/work     overlayfs scratch space
//! overlay/merged   the mount point handed to the hypervisor driver
//! ```
//!
//! `cleanup` unmounts `merged` (lazily when it is still busy) and removes `overlay/`; it is
//! idempotent, so it may run after a failed or partial `prepare`, or twice.

use std::fs;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use runv_api::{
    Capabilities, PluginInfo, PluginKind, PreparedRootfs, RootfsSource, Storage, StorageRequest,
    export_storage,
};

/// The overlayfs storage driver.
#[derive(Debug, Default)]
pub struct OverlayStorage;

/// Where the overlay of one container lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayPaths {
    pub root: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
}

impl OverlayPaths {
    pub fn for_request(request: &StorageRequest) -> Result<Self, String> {
        if !request.state_dir.is_absolute() {
            return Err(format!(
                "overlay storage: the state directory {} is not an absolute path",
                request.state_dir.display()
            ));
        }
        let root = request.state_dir.join("overlay");
        Ok(Self {
            upper: root.join("upper"),
            work: root.join("work"),
            merged: root.join("merged"),
            root,
        })
    }
}

/// The overlayfs mount options for these directories. Commas and colons in the paths would be
/// read as separators by overlayfs, so such paths are refused.
pub fn mount_options(lower: &Path, paths: &OverlayPaths) -> Result<String, String> {
    let mut parts = Vec::new();
    for (key, path) in [
        ("lowerdir", lower),
        ("upperdir", &paths.upper),
        ("workdir", &paths.work),
    ] {
        let s = path
            .to_str()
            .ok_or_else(|| format!("overlay storage: {} is not UTF-8", path.display()))?;
        if s.contains([',', ':', '\\']) {
            return Err(format!(
                "overlay storage: cannot use {s} as {key}: it contains ',', ':' or '\\'"
            ));
        }
        parts.push(format!("{key}={s}"));
    }
    Ok(parts.join(","))
}

/// Whether `path` is a mount point, according to /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> io::Result<bool> {
    let file = fs::File::open("/proc/self/mountinfo")?;
    for line in BufReader::new(file).lines() {
        let line = line?;
        // Field 5 is the mount point, with spaces and friends escaped as octal (\040).
        if let Some(mount_point) = line.split(' ').nth(4) {
            if Path::new(&unescape_mountinfo(mount_point)) == path {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn filesystems_has_overlay() -> Result<bool, String> {
    let text = fs::read_to_string("/proc/filesystems")
        .map_err(|e| format!("reading /proc/filesystems: {e}"))?;
    Ok(text
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay")))
}

fn overlay_module_available() -> bool {
    let Ok(uname) = nix::sys::utsname::uname() else {
        return false;
    };
    let release = uname.release().to_string_lossy().into_owned();
    let dir = Path::new("/lib/modules").join(release);
    let Ok(dep) = fs::read_to_string(dir.join("modules.dep")) else {
        return false;
    };
    dep.lines()
        .any(|l| l.contains("/overlayfs/overlay.ko") || l.contains("/overlay.ko"))
}

fn create_dir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("creating {}: {e}", path.display()))
}

fn remove_dir(path: &Path) -> Result<(), String> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

fn unmount(path: &Path) -> Result<(), String> {
    loop {
        let mounted = is_mounted(path).map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        if !mounted {
            return Ok(());
        }
        match umount2(path, MntFlags::empty()) {
            Ok(()) => {}
            Err(Errno::EBUSY) => umount2(path, MntFlags::MNT_DETACH)
                .map_err(|e| format!("lazily unmounting {}: {e}", path.display()))?,
            Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(format!("unmounting {}: {e}", path.display())),
        }
        // Loop: the same directory may have been mounted more than once (stacked mounts).
    }
}

impl Storage for OverlayStorage {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Storage,
            name: "overlay".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "overlayfs over the bundle rootfs, shared into the VM as a directory"
                .into(),
            capabilities: Capabilities::SHARED_DIR_ROOTFS,
        }
    }

    fn probe(&self) -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the overlay storage driver needs root to mount overlayfs".into());
        }
        if filesystems_has_overlay()? || overlay_module_available() {
            Ok(())
        } else {
            Err(
                "overlayfs is not available: not in /proc/filesystems and no overlay module \
                 (load it with `modprobe overlay`)"
                    .into(),
            )
        }
    }

    fn prepare(&self, request: &StorageRequest) -> Result<PreparedRootfs, String> {
        let paths = OverlayPaths::for_request(request)?;
        let lower = &request.rootfs;
        if !lower.is_absolute() {
            return Err(format!(
                "overlay storage: the rootfs {} is not an absolute path",
                lower.display()
            ));
        }
        if !lower.is_dir() {
            return Err(format!(
                "overlay storage: the rootfs {} is not a directory",
                lower.display()
            ));
        }
        let options = mount_options(lower, &paths)?;
        for dir in [&paths.upper, &paths.work, &paths.merged] {
            create_dir(dir)?;
        }
        let already =
            is_mounted(&paths.merged).map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        if !already {
            // A read-only container still gets an upper layer (the guest may need to write
            // /etc/resolv.conf and friends before it remounts); the guest mounts it read-only.
            mount(
                Some("overlay"),
                &paths.merged,
                Some("overlay"),
                MsFlags::empty(),
                Some(options.as_str()),
            )
            .map_err(|e| {
                format!(
                    "mounting overlayfs on {} (lower {}): {e}",
                    paths.merged.display(),
                    lower.display()
                )
            })?;
        }
        Ok(PreparedRootfs {
            source: RootfsSource::SharedDir { path: paths.merged },
            readonly: request.readonly,
        })
    }

    fn cleanup(&self, request: &StorageRequest) -> Result<(), String> {
        let paths = OverlayPaths::for_request(request)?;
        unmount(&paths.merged)?;
        remove_dir(&paths.root)
    }
}

export_storage!(|| Ok(OverlayStorage));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_three_layers() {
        let req = StorageRequest {
            state_dir: "/run/runv/c1".into(),
            rootfs: "/b/rootfs".into(),
            ..Default::default()
        };
        let paths = OverlayPaths::for_request(&req).unwrap();
        assert_eq!(paths.merged, Path::new("/run/runv/c1/overlay/merged"));
        assert_eq!(
            mount_options(&req.rootfs, &paths).unwrap(),
            "lowerdir=/b/rootfs,upperdir=/run/runv/c1/overlay/upper,\
             workdir=/run/runv/c1/overlay/work"
        );
    }

    #[test]
    fn separators_in_paths_are_refused() {
        let req = StorageRequest {
            state_dir: "/run/runv/c1".into(),
            ..Default::default()
        };
        let paths = OverlayPaths::for_request(&req).unwrap();
        let err = mount_options(Path::new("/b/a,b"), &paths).unwrap_err();
        assert!(err.contains("contains"), "{err}");
        assert!(mount_options(Path::new("/b/a:b"), &paths).is_err());
    }

    #[test]
    fn relative_state_dir_is_refused() {
        let req = StorageRequest {
            state_dir: "relative".into(),
            ..Default::default()
        };
        assert!(OverlayPaths::for_request(&req).is_err());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/tail\04"), r"/tail\04");
    }
}
