//! QEMU's jail: what a guest that takes over qemu can reach is what qemu can see and do.
//! Before exec, in the forked child, qemu gets its own mount namespace whose root is an empty
//! tmpfs holding only what this VM needs, bound at the same paths as on the host so that the
//! command line stays as it is (the state directory, which may be a `/proc/<pid>/fd` alias,
//! at [`STATE_DIR`]): the system's programs and libraries (read-only), a few device nodes,
//! the VM's kernel, initrd, disks, shares and template files. No `/sys`, no other container's
//! files, and of `/proc` only the process directories (read-only: 9p changes modes through
//! `/proc/self/fd`). Then qemu becomes a user of its own, keeping as ambient capabilities only
//! what its devices need: the file capabilities 9p uses to write as the guest's users when
//! the VM has shares, DAC_OVERRIDE alone otherwise (root's /dev/kvm, disks, state dir). It
//! cannot mount, load modules, ptrace, signal root's processes or configure the network:
//! taps come as open fds. Shares and the state directory are `nodev,nosuid,noexec` in the
//! jail, so that a device node made through 9p (CAP_MKNOD) cannot be opened by qemu.
//!
//! Everything is computed before fork; the child only makes system calls on prepared C strings.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::libc;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;
use runv_api::VmConfig;

/// qemu's uid and gid when not given: this base plus the monitor's pid, so that each VM's
/// qemu is a user of its own (it cannot signal another's) while it runs; far above the ranges
/// distributions hand out to users and to user namespaces (subuid).
pub const ID_BASE: u32 = 0x6000_0000;

/// Capabilities kept when the VM has shares: what QEMU's 9p `local` backend uses to create
/// files as the guest's uid and mode (chown, chmod, utimes, mknod, file capabilities) in
/// directories it does not own. Not CAP_DAC_READ_SEARCH: it allows `open_by_handle_at`, which
/// reaches the whole filesystem behind a bind mount.
const SHARE_CAPS: [u32; 6] = [
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_MKNOD,
    CAP_SETFCAP,
];

// capability numbers (linux/capability.h); libc does not export them.
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_MKNOD: u32 = 27;
const CAP_SETFCAP: u32 = 31;

/// linux/capability.h's `_LINUX_CAPABILITY_VERSION_3` and its structs.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Top-level system directories qemu's program, libraries, modules and firmware live in
/// (symlinks on merged-/usr systems, recreated as symlinks).
const SYSTEM_DIRS: [&str; 7] = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// System files read at start (the dynamic linker's cache).
const SYSTEM_FILES: [&str; 1] = ["/etc/ld.so.cache"];
/// Device nodes qemu may open: the accelerator and the random and null devices.
const DEVICES: [&str; 6] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/kvm",
];

/// Where the VM's state directory (its sockets) is in the jail: the host's path may be a
/// `/proc/<pid>/fd/N` alias (for socket paths that would be too long), which neither resolves
/// in qemu's namespace nor can be a mount point there.
pub const STATE_DIR: &str = "/vm";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

#[derive(Debug, PartialEq, Eq)]
struct Bind {
    source: CString,
    /// The same path inside the jail's root.
    target: CString,
    depth: usize,
    readonly: bool,
    /// nodev, nosuid, noexec: data, not programs or devices.
    data: bool,
    /// With the mounts under it (a share's volumes); the state directory without, since the
    /// jail's own root is mounted inside it.
    recursive: bool,
}

/// One VM's jail, ready to be entered in the forked child.
#[derive(Debug)]
pub struct Jail {
    root: CString,
    /// Mount points and directories to make in the tmpfs, parents first.
    dirs: Vec<CString>,
    files: Vec<CString>,
    symlinks: Vec<(CString, CString)>,
    binds: Vec<Bind>,
    /// `<root>/proc`.
    proc: CString,
    /// The monitor's working directory, where relative paths on qemu's command line start
    /// (made in the jail; the bound files under it are there).
    cwd: Option<CString>,
    /// Bit n set: capability n stays (bounding, permitted, effective, ambient).
    keep_caps: u64,
    /// Who qemu runs as.
    uid: u32,
    gid: u32,
    last_cap: u32,
}

fn cstring(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("path {} has a NUL byte", path.display()))
}

/// `path` made absolute, as qemu will open it (relative to its working directory, which is
/// the monitor's).
fn absolute(path: &Path) -> Result<PathBuf, String> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .map_err(|e| format!("current directory: {e}"))?
        .join(path))
}

struct Builder {
    root: PathBuf,
    dirs: Vec<PathBuf>,
    files: Vec<PathBuf>,
    symlinks: Vec<(PathBuf, PathBuf)>,
    binds: Vec<(PathBuf, PathBuf, bool, bool, bool)>,
}

impl Builder {
    fn inside(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Makes the directories of `path` as qemu will walk them (`a/../b` needs `a`), and its
    /// mount point; returns where that is.
    fn mount_point(&mut self, path: &Path, kind: Kind) -> PathBuf {
        let mut at = PathBuf::from("/");
        let parts: Vec<_> = path.components().skip(1).collect();
        for (i, part) in parts.iter().enumerate() {
            match part {
                Component::Normal(n) => at.push(n),
                Component::ParentDir => {
                    at.pop();
                    continue;
                }
                _ => continue,
            }
            let target = self.inside(&at);
            let last = i + 1 == parts.len();
            if last && kind == Kind::File {
                if !self.files.contains(&target) {
                    self.files.push(target);
                }
            } else if !self.dirs.contains(&target) {
                self.dirs.push(target);
            }
        }
        at
    }

    /// Binds `path` from the host at the same path; a path that does not exist is skipped
    /// (qemu reports it, as without the jail).
    fn bind(&mut self, path: &Path, readonly: bool, data: bool) -> Result<(), String> {
        let path = absolute(path)?;
        self.bind_at(&path, &path, readonly, data, true)
    }

    /// Binds the host's `source` at `at` in the jail. The source is resolved here, in the
    /// monitor's namespace: a magic link (`/proc/<pid>/fd/N`) to a mount of this namespace
    /// cannot be bound from qemu's.
    fn bind_at(
        &mut self,
        source: &Path,
        at: &Path,
        readonly: bool,
        data: bool,
        recursive: bool,
    ) -> Result<(), String> {
        let Ok(real) = std::fs::canonicalize(source) else {
            return Ok(());
        };
        let Ok(meta) = std::fs::metadata(&real) else {
            return Ok(());
        };
        let kind = if meta.is_dir() { Kind::Dir } else { Kind::File };
        let at = self.mount_point(at, kind);
        if self.binds.iter().any(|b| b.1 == self.inside(&at)) {
            return Ok(());
        }
        let target = self.inside(&at);
        self.binds.push((real, target, readonly, data, recursive));
        Ok(())
    }
}

impl Jail {
    /// The jail of the VM `config`, whose tmpfs root is mounted on `root` (an empty directory
    /// in the VM's state directory). `extra` are more host paths qemu opens (a template's
    /// directory), bound read-write.
    pub fn new(
        config: &VmConfig,
        root: &Path,
        extra: &[&Path],
        (uid, gid): (u32, u32),
    ) -> Result<Self, String> {
        let mut b = Builder {
            root: root.to_path_buf(),
            dirs: Vec::new(),
            files: Vec::new(),
            symlinks: Vec::new(),
            binds: Vec::new(),
        };
        for name in SYSTEM_DIRS {
            let host = Path::new("/").join(name);
            match std::fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host)
                        .map_err(|e| format!("reading {}: {e}", host.display()))?;
                    b.symlinks.push((target, b.inside(&host)));
                }
                Ok(m) if m.is_dir() => b.bind(&host, true, false)?,
                _ => {}
            }
        }
        for file in SYSTEM_FILES {
            b.bind(Path::new(file), true, false)?;
        }
        for dev in DEVICES {
            b.bind(Path::new(dev), false, false)?;
        }
        b.bind(&config.kernel, true, true)?;
        if let Some(initrd) = &config.initrd {
            b.bind(initrd, true, true)?;
        }
        b.bind_at(&config.state_dir, Path::new(STATE_DIR), false, true, false)?;
        if !config.console_log.as_os_str().is_empty() {
            b.bind(&config.console_log, false, true)?;
        }
        let mut shares = false;
        for share in &config.shared_dirs {
            if !share.host_path.as_os_str().is_empty() {
                b.bind(&share.host_path, share.readonly, true)?;
                shares = true;
            }
        }
        for disk in &config.block_devices {
            // Device nodes keep their mount's flags (/dev): not `data`.
            b.bind(&disk.host_path, disk.readonly, false)?;
        }
        if let Some(dir) = config.memory_file.as_deref().and_then(Path::parent) {
            b.bind(dir, false, true)?;
        }
        for path in extra {
            b.bind(path, false, true)?;
        }

        let proc = b.mount_point(Path::new("/proc"), Kind::Dir);
        let proc = b.inside(&proc);
        let cwd = std::env::current_dir()
            .ok()
            .map(|d| b.mount_point(&d, Kind::Dir));
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40u32)
            .min(63);
        // Without shares: only to open what is bound in (root's /dev/kvm, disks, state dir).
        let keep_caps = if shares {
            SHARE_CAPS.iter().fold(0u64, |m, c| m | 1 << c)
        } else {
            1 << CAP_DAC_OVERRIDE
        };
        let mut binds = b
            .binds
            .iter()
            .map(|(source, target, readonly, data, recursive)| {
                Ok(Bind {
                    source: cstring(source)?,
                    target: cstring(target)?,
                    depth: target.components().count(),
                    readonly: *readonly,
                    data: *data,
                    recursive: *recursive,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        // Parents before what is bound inside them.
        binds.sort_by_key(|b| b.depth);
        Ok(Self {
            root: cstring(root)?,
            dirs: b
                .dirs
                .iter()
                .map(|d| cstring(d))
                .collect::<Result<_, _>>()?,
            files: b
                .files
                .iter()
                .map(|f| cstring(f))
                .collect::<Result<_, _>>()?,
            symlinks: b
                .symlinks
                .iter()
                .map(|(t, l)| Ok((cstring(t)?, cstring(l)?)))
                .collect::<Result<_, String>>()?,
            binds,
            cwd: cwd.as_deref().map(cstring).transpose()?,
            proc: cstring(&proc)?,
            keep_caps,
            uid,
            gid,
            last_cap,
        })
    }

    /// Whether capability `cap` stays.
    pub fn keeps(&self, cap: u32) -> bool {
        self.keep_caps & (1 << cap) != 0
    }

    /// Enters the jail. Runs in the forked child before exec: system calls on prepared
    /// strings only, no allocation. Writes the failing step to stderr (the VM's log).
    pub fn enter(&self) -> std::io::Result<()> {
        let step = |what: &'static str, r: nix::Result<()>| {
            r.map_err(|e| {
                let _ = nix::unistd::write(std::io::stderr(), b"runv-driver-qemu: jail: ");
                let _ = nix::unistd::write(std::io::stderr(), what.as_bytes());
                let _ = nix::unistd::write(std::io::stderr(), b" failed\n");
                std::io::Error::from_raw_os_error(e as i32)
            })
        };
        step(
            "unshare",
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS),
        )?;
        // Mounts made on the host later (a pod's members) still reach the jail's shares;
        // nothing made here goes back.
        step(
            "making / a slave",
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None::<&str>,
            ),
        )?;
        step(
            "mounting the tmpfs root",
            mount(
                Some(c"tmpfs"),
                self.root.as_c_str(),
                Some(c"tmpfs"),
                MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                Some(c"mode=0755"),
            ),
        )?;
        for dir in &self.dirs {
            match nix::unistd::mkdir(dir.as_c_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => step("making a mount point", Err(e))?,
            }
        }
        for file in &self.files {
            match nix::fcntl::open(
                file.as_c_str(),
                nix::fcntl::OFlag::O_CREAT
                    | nix::fcntl::OFlag::O_WRONLY
                    | nix::fcntl::OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => {
                    let _ = nix::unistd::close(fd);
                }
                Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => step("making a file mount point", Err(e))?,
            }
        }
        for (target, link) in &self.symlinks {
            match nix::unistd::symlinkat(target.as_c_str(), None, link.as_c_str()) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => step("making a symlink", Err(e))?,
            }
        }
        for b in &self.binds {
            step(
                "binding a path",
                mount(
                    Some(b.source.as_c_str()),
                    b.target.as_c_str(),
                    None::<&str>,
                    if b.recursive {
                        MsFlags::MS_BIND | MsFlags::MS_REC
                    } else {
                        MsFlags::MS_BIND
                    },
                    None::<&str>,
                ),
            )?;
            let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
            if b.readonly {
                flags |= MsFlags::MS_RDONLY;
            }
            if b.data {
                flags |= MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
            }
            if b.readonly || b.data {
                step(
                    "restricting a bind",
                    mount(
                        None::<&str>,
                        b.target.as_c_str(),
                        None::<&str>,
                        flags,
                        None::<&str>,
                    ),
                )?;
            }
        }
        // QEMU's 9p server changes modes through /proc/self/fd (its symlink-safe chmod).
        // Process directories only (no /proc/sys, sysrq-trigger, kcore: uid 0 may write
        // sysctls without any capability), read-only. Not `hidepid=invisible`: with it the
        // 9p server's own /proc/self/fd lookups fail (ENOENT). Other processes' files need
        // ptrace access, which qemu, without capabilities, does not have over root's.
        let proc_flags =
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
        let new_proc = |options: &std::ffi::CStr| {
            mount(
                Some(c"proc"),
                self.proc.as_c_str(),
                Some(c"proc"),
                proc_flags,
                Some(options),
            )
        };
        // Kernels before 5.8 lack `subset=pid`; where no new procfs may be mounted at all (a
        // container whose /proc has masked paths), the host's, read-only.
        let host_proc = || {
            mount(
                Some(c"/proc"),
                self.proc.as_c_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            mount(
                None::<&str>,
                self.proc.as_c_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | proc_flags,
                None::<&str>,
            )
        };
        step(
            "mounting /proc",
            new_proc(c"subset=pid")
                .or_else(|_| new_proc(c""))
                .or_else(|_| host_proc()),
        )?;
        step(
            "entering the root",
            nix::unistd::chdir(self.root.as_c_str()),
        )?;
        step("pivot_root", nix::unistd::pivot_root(c".", c"."))?;
        step(
            "detaching the old root",
            umount2(c".", MntFlags::MNT_DETACH),
        )?;
        step("entering /", nix::unistd::chdir(c"/"))?;
        if let Some(cwd) = &self.cwd {
            let _ = nix::unistd::chdir(cwd.as_c_str());
        }
        self.drop_capabilities()
    }

    /// Becomes `uid`/`gid` (no supplementary groups) keeping only `keep_caps`, as ambient
    /// capabilities so that they survive the exec of qemu (and of the `cat` a template's
    /// migration runs): an escaped qemu is not root, cannot signal root's processes or other
    /// VMs' qemu (each has a uid of its own), and holds nothing but what its devices need.
    fn drop_capabilities(&self) -> std::io::Result<()> {
        let check = |r: libc::c_long| {
            if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: prctl, setgroups, setres[ug]id, capget and capset with integer arguments
        // or pointers to locals alive for the call; no allocation.
        unsafe {
            // While still root with CAP_SETPCAP.
            for cap in 0..=self.last_cap {
                if !self.keeps(cap) {
                    check(
                        libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0).into(),
                    )?;
                }
            }
            check(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                    0,
                    0,
                    0,
                )
                .into(),
            )?;
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong, 0, 0, 0).into())?;
            check(libc::setgroups(0, std::ptr::null()).into())?;
            check(libc::setresgid(self.gid, self.gid, self.gid).into())?;
            check(libc::setresuid(self.uid, self.uid, self.uid).into())?;
            let mut header = CapHeader {
                version: CAPABILITY_VERSION_3,
                pid: 0,
            };
            let mut data = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            for (i, d) in data.iter_mut().enumerate() {
                let word = (self.keep_caps >> (32 * i)) as u32;
                (d.effective, d.permitted, d.inheritable) = (word, word, word);
            }
            check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()))?;
            for cap in 0..=self.last_cap {
                if self.keeps(cap) {
                    check(
                        libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                            cap as libc::c_ulong,
                            0,
                            0,
                        )
                        .into(),
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_api::{BlockDevice, SharedDir};

    fn config(dir: &Path) -> VmConfig {
        VmConfig {
            kernel: dir.join("vmlinux"),
            state_dir: dir.join("vm"),
            console_log: dir.join("console.log"),
            ..VmConfig::default()
        }
    }

    #[test]
    fn binds_the_vm_files_at_their_paths_parents_first() {
        let dir = std::env::temp_dir().join(format!("runv-jail-unit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("vm")).unwrap();
        std::fs::create_dir_all(dir.join("share")).unwrap();
        std::fs::write(dir.join("vmlinux"), b"").unwrap();
        std::fs::write(dir.join("console.log"), b"").unwrap();
        let mut c = config(&dir);
        c.shared_dirs.push(SharedDir {
            tag: "rootfs".into(),
            host_path: dir.join("share"),
            readonly: true,
        });
        c.block_devices.push(BlockDevice {
            id: "gone".into(),
            host_path: dir.join("missing-disk"),
            readonly: false,
        });
        let jail = Jail::new(&c, &dir.join("vm/jail"), &[], (7, 8)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        let root = dir.join("vm/jail");
        let target = |p: &Path| cstring(&root.join(p.strip_prefix("/").unwrap())).unwrap();
        let share = jail
            .binds
            .iter()
            .find(|b| b.target == target(&dir.join("share")))
            .expect("the share is bound");
        assert!(share.readonly && share.data);
        let state = jail
            .binds
            .iter()
            .find(|b| b.target == target(Path::new(STATE_DIR)))
            .expect("the state dir is bound");
        assert!(
            !state.recursive,
            "the jail's own root is mounted in the state dir"
        );
        assert!(jail.files.contains(&target(&dir.join("vmlinux"))));
        // A path that does not exist is left to qemu to report.
        assert!(
            !jail
                .binds
                .iter()
                .any(|b| b.target == target(&dir.join("missing-disk")))
        );
        let depths: Vec<_> = jail.binds.iter().map(|b| b.depth).collect();
        assert!(depths.windows(2).all(|w| w[0] <= w[1]));
        // A VM with shares keeps the 9p file capabilities and nothing else.
        assert!(jail.keeps(CAP_CHOWN) && jail.keeps(CAP_DAC_OVERRIDE));
        // CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_MODULE
        for cap in [21, 12, 2, 19, 16] {
            assert!(!jail.keeps(cap), "capability {cap} kept");
        }
    }

    #[test]
    fn a_vm_without_shares_keeps_only_dac_override() {
        let jail = Jail::new(
            &config(Path::new("/nonexistent")),
            Path::new("/j"),
            &[],
            (7, 8),
        )
        .unwrap();
        assert_eq!(jail.keep_caps, 1 << CAP_DAC_OVERRIDE);
        assert_eq!((jail.uid, jail.gid), (7, 8));
    }

    #[test]
    fn a_path_through_dot_dot_gets_the_directories_qemu_walks() {
        let mut b = Builder {
            root: "/j".into(),
            dirs: Vec::new(),
            files: Vec::new(),
            symlinks: Vec::new(),
            binds: Vec::new(),
        };
        let at = b.mount_point(Path::new("/a/./b/../c"), Kind::File);
        assert_eq!(at, PathBuf::from("/a/c"));
        assert_eq!(b.dirs, [PathBuf::from("/j/a"), PathBuf::from("/j/a/b")]);
        assert_eq!(b.files, [PathBuf::from("/j/a/c")]);
    }
}
