//! A container's root inside the guest, as runc makes it on a host: the spec's mounts with
//! their options and propagation, /dev with its nodes, the root itself, masked and read-only
//! paths. Runs in the new container process (its own mount namespace), before it execs.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode as FileMode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, chdir, chown, chroot};

use crate::helper::{Fail, fail};
use crate::spec::{CreateConfig, Device, Mount};

/// Joins `rel` (an absolute container path) under `root`, refusing `..`.
fn under(root: &Path, rel: &str) -> Result<PathBuf, Fail> {
    let mut p = root.to_path_buf();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(x) => p.push(x),
            Component::RootDir | Component::CurDir => {}
            _ => return Err(fail(format!("mount destination {rel:?} contains \"..\""))),
        }
    }
    Ok(p)
}

/// What the mount options of one spec mount ask for.
struct Options {
    flags: MsFlags,
    /// Propagation changes applied after the mount (MS_SHARED, MS_SLAVE, ... with MS_REC).
    propagation: Vec<MsFlags>,
    data: Vec<String>,
    bind: bool,
    /// runc's extension: the tmpfs starts with a copy of what the directory held.
    tmpcopyup: bool,
}

fn parse_options(options: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: Vec::new(),
        bind: false,
        tmpcopyup: false,
    };
    for opt in options {
        let mut set = |f: MsFlags| o.flags |= f;
        match opt.as_str() {
            "ro" => set(MsFlags::MS_RDONLY),
            "rw" | "defaults" => {}
            "nosuid" => set(MsFlags::MS_NOSUID),
            "nodev" => set(MsFlags::MS_NODEV),
            "noexec" => set(MsFlags::MS_NOEXEC),
            "sync" => set(MsFlags::MS_SYNCHRONOUS),
            "dirsync" => set(MsFlags::MS_DIRSYNC),
            "mand" => set(MsFlags::MS_MANDLOCK),
            "relatime" => set(MsFlags::MS_RELATIME),
            "strictatime" => set(MsFlags::MS_STRICTATIME),
            "noatime" => set(MsFlags::MS_NOATIME),
            "nodiratime" => set(MsFlags::MS_NODIRATIME),
            "suid" | "dev" | "exec" | "async" | "atime" | "diratime" | "norelatime" | "nomand"
            | "nostrictatime" => {}
            "bind" => o.bind = true,
            "tmpcopyup" => o.tmpcopyup = true,
            // runc's recursive forms (mount_setattr there); applied to the mount itself here.
            "rro" => set(MsFlags::MS_RDONLY),
            "rnosuid" => set(MsFlags::MS_NOSUID),
            "rnodev" => set(MsFlags::MS_NODEV),
            "rnoexec" => set(MsFlags::MS_NOEXEC),
            "rnoatime" => set(MsFlags::MS_NOATIME),
            "rrelatime" => set(MsFlags::MS_RELATIME),
            "rstrictatime" => set(MsFlags::MS_STRICTATIME),
            "rnodiratime" => set(MsFlags::MS_NODIRATIME),
            "rrw" | "rsuid" | "rdev" | "rexec" | "ratime" | "rdiratime" | "rnorelatime"
            | "rnostrictatime" => {}
            "rbind" => {
                o.bind = true;
                o.flags |= MsFlags::MS_REC;
            }
            p @ ("private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared"
            | "unbindable" | "runbindable") => o.propagation.push(propagation(p).unwrap()),
            other => o.data.push(other.to_string()),
        }
    }
    o
}

/// The mount flags of a propagation name (`rootfsPropagation` and mount options).
pub fn propagation(name: &str) -> Option<MsFlags> {
    let rec = MsFlags::MS_REC;
    Some(match name {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | rec,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | rec,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | rec,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | rec,
        _ => return None,
    })
}

fn do_mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Fail> {
    mount(src, dst, fstype, flags, data).map_err(|e| {
        fail(format!(
            "mount {} on {}: {e}",
            fstype.unwrap_or("bind"),
            dst.display()
        ))
    })
}

/// Mounts the container's filesystems under `cfg.rootfs` (still in the agent's view).
pub fn setup_rootfs(cfg: &CreateConfig, in_userns: bool) -> Result<(), Fail> {
    let rootfs = Path::new(&cfg.rootfs);
    // runc's order: `/` gets rootfsPropagation (default rslave), then the rootfs mount is
    // made private so it can become the root, so that the root itself ends up private.
    let root_propagation = match cfg.rootfs_propagation.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => {
            propagation(p).ok_or_else(|| fail(format!("unknown rootfsPropagation {p:?}")))?
        }
        None => MsFlags::MS_SLAVE | MsFlags::MS_REC,
    };
    do_mount(None, Path::new("/"), None, root_propagation, None)?;
    // (The agent mounted the rootfs there, so it is a mount point.)
    let _ = do_mount(None, rootfs, None, MsFlags::MS_PRIVATE, None);
    do_mount(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let mut dev_is_tmpfs = false;
    for mnt in &cfg.mounts {
        mount_one(rootfs, mnt, in_userns)?;
        if mnt.destination.trim_end_matches('/') == "/dev" {
            dev_is_tmpfs = mnt.kind.as_deref() != Some("bind");
        }
    }
    if dev_is_tmpfs {
        make_dev(&rootfs.join("dev"), &cfg.devices, in_userns)?;
    }
    for (src, dst) in &cfg.files {
        let dst = under(rootfs, dst)?;
        if std::fs::symlink_metadata(&dst)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            // e.g. /etc/resolv.conf -> ../run/...: replace the link target's role.
            let _ = std::fs::remove_file(&dst);
        }
        if make_target(&dst, false).is_err() {
            crate::warn!("cannot create {}, not providing it", dst.display());
            continue;
        }
        do_mount(Some(Path::new(src)), &dst, None, MsFlags::MS_BIND, None)?;
    }
    Ok(())
}

fn mount_one(rootfs: &Path, mnt: &Mount, in_userns: bool) -> Result<(), Fail> {
    let dst = under(rootfs, &mnt.destination)?;
    let o = parse_options(&mnt.options);
    let kind = mnt.kind.as_deref().unwrap_or("none");
    if o.bind || kind == "bind" {
        let Some(src) = mnt.source.as_deref() else {
            return Err(fail(format!(
                "bind mount {} has no source",
                mnt.destination
            )));
        };
        let src = Path::new(src);
        let Ok(meta) = std::fs::metadata(src) else {
            crate::warn!(
                "skipping bind mount of {}: not shared with the VM",
                src.display()
            );
            return Ok(());
        };
        make_target(&dst, meta.is_dir())?;
        do_mount(
            Some(src),
            &dst,
            None,
            MsFlags::MS_BIND | (o.flags & MsFlags::MS_REC),
            None,
        )?;
        if !(o.flags - MsFlags::MS_REC).is_empty() {
            do_mount(
                None,
                &dst,
                None,
                o.flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )?;
        }
        return set_propagation(&dst, &o.propagation);
    }
    make_target(&dst, true)?;
    // In a user namespace the container gets a devpts instance of its own, as runc mounts
    // it: the agent's would show unmapped owners.
    if kind == "devpts" && !in_userns {
        // The agent allocates a process's pty from its own devpts (mounted gid=5,mode=620
        // like the spec's) before the process enters the container, so the container sees
        // that instance: then `tty` and ttyname() find /dev/pts/N.
        do_mount(
            Some(Path::new("/dev/pts")),
            &dst,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
        return set_propagation(&dst, &o.propagation);
    }
    let (fstype, data) = match kind {
        // A VM has a cgroup v2 hierarchy of its own (the guest kernel runs no v1 controllers).
        "cgroup" | "cgroup2" => ("cgroup2", String::new()),
        k => (k, o.data.join(",")),
    };
    let src = mnt.source.clone().unwrap_or_else(|| fstype.to_string());
    // The directory's old contents stay reachable through this fd once the tmpfs covers it.
    let below = if o.tmpcopyup && fstype == "tmpfs" {
        std::fs::File::open(&dst).ok()
    } else {
        None
    };
    let r = do_mount(
        Some(Path::new(&src)),
        &dst,
        Some(fstype),
        o.flags,
        (!data.is_empty()).then_some(data.as_str()),
    );
    match r {
        Ok(()) => {}
        // sysfs needs the network namespace owned by the user namespace, and the container
        // shares the VM's: bind the guest's /sys instead, as runc does in a user namespace.
        Err(_) if fstype == "sysfs" && in_userns => {
            do_mount(
                Some(Path::new("/sys")),
                &dst,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
            let _ = do_mount(
                None,
                &dst,
                None,
                o.flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            );
        }
        Err(e) if fstype == "cgroup2" || fstype == "mqueue" => {
            crate::warn!("{}", e.message);
        }
        Err(e) => return Err(e),
    }
    if let Some(below) = below {
        use std::os::fd::AsRawFd;
        let from = PathBuf::from(format!("/proc/self/fd/{}", below.as_raw_fd()));
        copy_tree(&from, &dst)
            .map_err(|e| fail(format!("tmpcopyup into {}: {e}", mnt.destination)))?;
    }
    set_propagation(&dst, &o.propagation)
}

/// Copies a directory's contents (files, directories, links, with modes and owners).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&src)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
        } else if kind.is_symlink() {
            symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            continue;
        }
        let _ = nix::unistd::fchownat(
            None,
            &dst,
            Some(Uid::from_raw(meta.uid())),
            Some(Gid::from_raw(meta.gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        );
        if !kind.is_symlink() {
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
    }
    Ok(())
}

fn set_propagation(dst: &Path, changes: &[MsFlags]) -> Result<(), Fail> {
    for f in changes {
        mount(None::<&str>, dst, None::<&str>, *f, None::<&str>)
            .map_err(|e| fail(format!("set propagation of {}: {e}", dst.display())))?;
    }
    Ok(())
}

/// runc's default devices, made in every container with its own /dev.
const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Creates the device nodes (runc's defaults, then `linux.devices`) and the usual links.
fn make_dev(dev: &Path, devices: &[Device], in_userns: bool) -> Result<(), Fail> {
    let defaults = DEFAULT_DEVICES.iter().map(|(name, major, minor)| Device {
        kind: "c".into(),
        path: format!("/dev/{name}"),
        major: *major as i64,
        minor: *minor as i64,
        file_mode: Some(0o666),
        uid: Some(0),
        gid: Some(0),
    });
    for d in defaults.chain(devices.iter().cloned()) {
        let rel = d
            .path
            .strip_prefix("/dev/")
            .ok_or_else(|| fail(format!("device path {:?} is not under /dev", d.path)))?;
        let dst = under(dev, rel)?;
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| fail(format!("create {}: {e}", parent.display())))?;
        }
        if in_userns {
            // mknod is refused in a user namespace: bind the guest's node, as runc does.
            let host = Path::new("/dev").join(rel);
            if host.exists() {
                make_target(&dst, false)?;
                do_mount(Some(&host), &dst, None, MsFlags::MS_BIND, None)?;
            } else {
                crate::warn!("device {} does not exist in the guest", d.path);
            }
            continue;
        }
        mknod_device(&dst, &d)?;
    }
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = symlink(target, dev.join(link));
    }
    Ok(())
}

fn mknod_device(dst: &Path, d: &Device) -> Result<(), Fail> {
    let kind = match d.kind.as_str() {
        "c" | "u" => SFlag::S_IFCHR,
        "b" => SFlag::S_IFBLK,
        "p" => SFlag::S_IFIFO,
        other => return Err(fail(format!("device {}: unknown type {other:?}", d.path))),
    };
    let mode = d.file_mode.unwrap_or(0o666) & 0o7777;
    let _ = std::fs::remove_file(dst);
    let dev = makedev(d.major as u64, d.minor as u64);
    mknod(dst, kind, FileMode::from_bits_truncate(mode), dev)
        .map_err(|e| fail(format!("mknod {}: {e}", d.path)))?;
    // mknod applies the umask; the spec's mode is exact.
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("chmod {}: {e}", d.path)))?;
    chown(
        dst,
        Some(Uid::from_raw(d.uid.unwrap_or(0))),
        Some(Gid::from_raw(d.gid.unwrap_or(0))),
    )
    .map_err(|e| fail(format!("chown {}: {e}", d.path)))
}

pub fn make_target(p: &Path, dir: bool) -> Result<(), Fail> {
    if p.exists() {
        return Ok(());
    }
    let err = |e: std::io::Error| fail(format!("create mount point {}: {e}", p.display()));
    if dir {
        std::fs::create_dir_all(p).map_err(err)
    } else {
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map(drop)
            .map_err(err)
    }
}

/// Makes `rootfs` the root. The agent runs from the initramfs, where pivot_root is refused
/// (EINVAL: the current root is rootfs), so like switch_root we move the mount onto `/` and
/// chroot, in the container's own mount namespace.
pub fn enter_root(rootfs: &Path) -> Result<(), Fail> {
    // A mount moved under a shared parent becomes shared: keep the old root private, as
    // runc makes the rootfs's parent private before pivot_root.
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    );
    chdir(rootfs).map_err(|e| fail(format!("chdir {}: {e}", rootfs.display())))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| fail(format!("move rootfs to /: {e}")))?;
    chroot(".").map_err(|e| fail(format!("chroot: {e}")))?;
    chdir("/").map_err(|e| fail(format!("chdir /: {e}")))?;
    Ok(())
}

/// What runc does once the root is in place: masked and read-only paths, the read-only root.
pub fn finish_root(cfg: &CreateConfig) -> Result<(), Fail> {
    for p in &cfg.masked_paths {
        mask_path(p)?;
    }
    for p in &cfg.readonly_paths {
        readonly_path(p)?;
    }
    if cfg.readonly {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | current_flags("/"),
            None::<&str>,
        )
        .map_err(|e| fail(format!("remount / read-only: {e}")))?;
    }
    Ok(())
}

fn mask_path(p: &str) -> Result<(), Fail> {
    let Ok(meta) = std::fs::metadata(p) else {
        return Ok(());
    };
    let r = if meta.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        // The container's own /dev/null, as runc binds it.
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    r.map_err(|e| fail(format!("mask {p}: {e}")))
}

/// The flags a mount has now, which a bind remount must repeat: the kernel refuses to drop
/// locked ones, and runc keeps them (nosuid, nodev, noexec, atime flags).
fn current_flags(p: &str) -> MsFlags {
    use nix::sys::statvfs::{FsFlags, statvfs};
    let Ok(st) = statvfs(p) else {
        return MsFlags::empty();
    };
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            out |= ms;
        }
    }
    out
}

fn readonly_path(p: &str) -> Result<(), Fail> {
    if std::fs::metadata(p).is_err() {
        return Ok(());
    }
    let keep = current_flags(p);
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .and_then(|_| {
        mount(
            None::<&str>,
            p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC | keep,
            None::<&str>,
        )
    })
    .map_err(|e| fail(format!("make {p} read-only: {e}")))
}

/// Writes `linux.sysctl` through /proc/sys, in the container's namespaces.
pub fn apply_sysctl(sysctl: &std::collections::BTreeMap<String, String>) -> Result<(), Fail> {
    for (key, value) in sysctl {
        if key.is_empty() || key.contains("..") || key.starts_with('/') {
            return Err(fail(format!("invalid sysctl {key:?}")));
        }
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value).map_err(|e| fail(format!("sysctl {key}={value}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = parse_options(&[
            "nosuid".into(),
            "rbind".into(),
            "rslave".into(),
            "gid=5".into(),
            "ro".into(),
        ]);
        assert!(o.bind);
        assert!(
            o.flags
                .contains(MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID)
        );
        assert_eq!(o.propagation, [MsFlags::MS_SLAVE | MsFlags::MS_REC]);
        assert_eq!(o.data, ["gid=5"]);
    }

    #[test]
    fn destinations_never_leave_the_root() {
        assert!(under(Path::new("/r"), "/a/../../etc").is_err());
        assert_eq!(
            under(Path::new("/r"), "/dev/pts").unwrap(),
            Path::new("/r/dev/pts")
        );
    }
}
