//! The helper: a fresh exec of the agent binary (`runv-agent __helper`), single-threaded, that
//! creates a container init or an exec'd process.
//!
//! Why a fresh exec: the agent is multi-threaded, and a child forked from a multi-threaded
//! process may not allocate. The helper is single-threaded, so after its own `clone` the child
//! can build paths, parse and allocate freely. The helper clones with `CLONE_PARENT`, so the
//! new process is a direct child of the agent (PID 1), which reaps it and learns its exit
//! status; the helper reports the pid and exits.
//!
//! Protocol on fd 3 (a unix socket to the agent), one JSON line each:
//! agent → helper: [`HelperConfig`]; helper → agent: `Pid`; process → agent: `Ready` or
//! `Error`; agent → process (create only): the line `start`; then the process execs, which
//! closes fd 3 (close-on-exec): EOF means success, an `Error` line means exec failed.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::libc;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid, chdir, chroot, execvpe, fchdir, setgid, setgroups, setsid, setuid};

use crate::spec::{HelperConfig, Mode, Mount, Process, Report};

struct Fail {
    code: i32,
    message: String,
}

fn fail(message: impl Into<String>) -> Fail {
    Fail {
        code: 1,
        message: message.into(),
    }
}

fn report(sock: &mut UnixStream, r: &Report) {
    if let Ok(mut line) = serde_json::to_vec(r) {
        line.push(b'\n');
        let _ = sock.write_all(&line);
    }
}

/// Entry point of `runv-agent __helper`.
pub fn main() -> ! {
    // SAFETY: the agent started us with fd 3 set to our end of a unix socketpair; nothing
    // else in this fresh process owns fd 3.
    let mut sock = unsafe { UnixStream::from_raw_fd(3) };
    let mut line = String::new();
    let cfg: HelperConfig = match BufReader::new(&sock).read_line(&mut line) {
        Ok(_) => match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                report(
                    &mut sock,
                    &Report::Error {
                        message: format!("bad helper config: {e}"),
                        code: 1,
                    },
                );
                std::process::exit(1)
            }
        },
        Err(_) => std::process::exit(1),
    };
    let _ = fcntl(sock.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));

    let mut flags = CloneFlags::CLONE_PARENT;
    let mut root_fd = None;
    match &cfg.mode {
        Mode::Create { .. } => {
            flags |= CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC;
        }
        Mode::Exec { init_pid } => match join_namespaces(*init_pid) {
            Ok(fd) => root_fd = Some(fd),
            Err(f) => {
                report(
                    &mut sock,
                    &Report::Error {
                        message: f.message,
                        code: f.code,
                    },
                );
                std::process::exit(1)
            }
        },
    }

    // SAFETY: raw clone without a new stack behaves like fork. This process is
    // single-threaded (a fresh exec that started no threads), so the child may allocate.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags.bits() as libc::c_long) | libc::SIGCHLD as libc::c_long,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        report(
            &mut sock,
            &Report::Error {
                message: format!("clone: {e}"),
                code: 1,
            },
        );
        std::process::exit(1);
    }
    if pid > 0 {
        report(&mut sock, &Report::Pid(pid as i32));
        std::process::exit(0);
    }
    // The child: set up and exec, or report why not.
    let f = child(&cfg, root_fd, &mut sock);
    report(
        &mut sock,
        &Report::Error {
            message: f.message,
            code: f.code,
        },
    );
    std::process::exit(f.code)
}

fn join_namespaces(init_pid: i32) -> Result<OwnedFd, Fail> {
    let open = |p: String| File::open(&p).map_err(|e| fail(format!("open {p}: {e}")));
    let root = open(format!("/proc/{init_pid}/root"))?;
    let mut fds = Vec::new();
    for (ns, flag) in [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        fds.push((open(format!("/proc/{init_pid}/ns/{ns}"))?, flag, ns));
    }
    for (fd, flag, ns) in fds {
        setns(&fd, flag).map_err(|e| fail(format!("setns {ns}: {e}")))?;
    }
    Ok(root.into())
}

fn child(cfg: &HelperConfig, root_fd: Option<OwnedFd>, sock: &mut UnixStream) -> Fail {
    let r = (|| -> Result<(), Fail> {
        match &cfg.mode {
            Mode::Create {
                rootfs,
                readonly,
                hostname,
                mounts,
                masked_paths,
                readonly_paths,
                files,
            } => {
                setup_rootfs(Path::new(rootfs), mounts, files)?;
                if let Some(h) = hostname {
                    nix::unistd::sethostname(h).map_err(|e| fail(format!("sethostname: {e}")))?;
                }
                enter_root(Path::new(rootfs))?;
                for p in masked_paths {
                    mask_path(p)?;
                }
                for p in readonly_paths {
                    readonly_path(p)?;
                }
                if *readonly {
                    mount(
                        None::<&str>,
                        "/",
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                    .map_err(|e| fail(format!("remount / read-only: {e}")))?;
                }
            }
            Mode::Exec { .. } => {
                let fd = root_fd.as_ref().expect("root fd for exec");
                fchdir(fd.as_raw_fd()).map_err(|e| fail(format!("fchdir to root: {e}")))?;
                chroot(".").map_err(|e| fail(format!("chroot: {e}")))?;
                chdir("/").map_err(|e| fail(format!("chdir /: {e}")))?;
            }
        }
        Ok(())
    })();
    if let Err(f) = r {
        return f;
    }
    let p = &cfg.process;
    let path = lookup_path(p);
    let exe = match lookup(&p.args, &path) {
        Ok(exe) => exe,
        Err(f) => return f,
    };
    report(sock, &Report::Ready);
    if cfg.wait_start {
        let mut line = String::new();
        let _ = BufReader::new(&*sock).read_line(&mut line);
        if line.trim() != "start" {
            // The agent went away or the container was removed before start.
            std::process::exit(1);
        }
    }
    match finish_and_exec(p, &exe) {
        Ok(never) => match never {},
        Err(f) => f,
    }
}

fn lookup_path(p: &Process) -> String {
    p.env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .to_string()
}

/// Finds the executable like runc (Go's exec.LookPath), with runc's error wording.
fn lookup(args: &[String], path: &str) -> Result<PathBuf, Fail> {
    let Some(arg0) = args.first() else {
        return Err(fail("args must not be empty"));
    };
    let executable = |p: &Path| -> Result<(), std::io::Error> {
        let m = std::fs::metadata(p)?;
        if m.is_dir() || m.permissions().mode() & 0o111 == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EACCES));
        }
        Ok(())
    };
    if arg0.contains('/') {
        return match std::fs::metadata(arg0) {
            Err(e) => Err(Fail {
                code: 127,
                message: format!("exec: \"{arg0}\": stat {arg0}: {}", errno_text(&e)),
            }),
            Ok(_) => match executable(Path::new(arg0)) {
                Ok(()) => Ok(PathBuf::from(arg0)),
                Err(_) => Err(Fail {
                    code: 126,
                    message: format!("exec: \"{arg0}\": permission denied"),
                }),
            },
        };
    }
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = Path::new(dir).join(arg0);
        if executable(&cand).is_ok() {
            return Ok(cand);
        }
    }
    Err(Fail {
        code: 127,
        message: format!("exec: \"{arg0}\": executable file not found in $PATH"),
    })
}

/// The lower-case strerror text that Go prints ("no such file or directory").
fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}

fn finish_and_exec(p: &Process, exe: &Path) -> Result<std::convert::Infallible, Fail> {
    setsid().map_err(|e| fail(format!("setsid: {e}")))?;
    if p.terminal {
        // SAFETY: TIOCSCTTY on fd 0 (the pty slave the agent gave us) takes no pointer.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(fail(format!(
                "set controlling terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    for rl in &p.rlimits {
        let res = rlimit_resource(&rl.kind)
            .ok_or_else(|| fail(format!("unknown rlimit type {:?}", rl.kind)))?;
        setrlimit(res, rl.soft, rl.hard)
            .map_err(|e| fail(format!("setrlimit {}: {e}", rl.kind)))?;
    }
    if let Some(caps) = &p.capabilities {
        drop_bounding(&caps.bounding)?;
    }
    let groups: Vec<Gid> = p
        .user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    setgroups(&groups).map_err(|e| fail(format!("setgroups: {e}")))?;
    setgid(Gid::from_raw(p.user.gid)).map_err(|e| fail(format!("setgid: {e}")))?;
    setuid(Uid::from_raw(p.user.uid)).map_err(|e| fail(format!("setuid: {e}")))?;
    if let Err(e) = chdir(p.cwd.as_str()) {
        return Err(fail(format!(
            "chdir to cwd (\"{}\") set in config.json failed: {}",
            p.cwd,
            e.desc().to_lowercase()
        )));
    }
    if p.no_new_privileges {
        nix::sys::prctl::set_no_new_privs().map_err(|e| fail(format!("no_new_privs: {e}")))?;
    }
    let cstr = |s: &str| CString::new(s).map_err(|_| fail(format!("NUL byte in {s:?}")));
    let exe_c = cstr(&exe.to_string_lossy())?;
    let args: Vec<CString> = p.args.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let env: Vec<CString> = p.env.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
    let e = execvpe(&exe_c, &args, &env).unwrap_err();
    let code = if e == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    };
    Err(Fail {
        code,
        message: format!("exec: \"{}\": {}", p.args[0], e.desc().to_lowercase()),
    })
}

fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        _ => return None,
    })
}

/// Drops every capability not in `keep` from the bounding set (effective after exec and
/// across setuid). Permitted/effective sets of root stay as the kernel computes them at exec
/// from the bounding set.
fn drop_bounding(keep: &[String]) -> Result<(), Fail> {
    for (n, name) in runv_proto::LINUX_CAPABILITIES.iter().enumerate() {
        if keep.iter().any(|k| k == name) {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP, n) takes integers only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, n as libc::c_ulong, 0, 0, 0) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(fail(format!(
                "drop {name}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

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

fn mount_flags(options: &[String]) -> (MsFlags, Vec<String>, bool) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut bind = false;
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "bind" => bind = true,
            "rbind" => {
                bind = true;
                flags |= MsFlags::MS_REC
            }
            "private" | "rprivate" | "slave" | "rslave" | "shared" | "rshared" => {}
            other => data.push(other.to_string()),
        }
    }
    (flags, data, bind)
}

fn setup_rootfs(rootfs: &Path, mounts: &[Mount], files: &[(String, String)]) -> Result<(), Fail> {
    let m = |src: Option<&Path>, dst: &Path, fstype: Option<&str>, flags, data: Option<&str>| {
        mount(src, dst, fstype, flags, data).map_err(|e| {
            fail(format!(
                "mount {} on {}: {e}",
                fstype.unwrap_or("bind"),
                dst.display()
            ))
        })
    };
    m(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    m(
        Some(rootfs),
        rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let mut dev_is_tmpfs = false;
    for mnt in mounts {
        let dst = under(rootfs, &mnt.destination)?;
        let (flags, data, bind) = mount_flags(&mnt.options);
        let kind = mnt.kind.as_deref().unwrap_or("none");
        if bind || kind == "bind" {
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
                continue;
            };
            make_target(&dst, meta.is_dir())?;
            m(
                Some(src),
                &dst,
                None,
                MsFlags::MS_BIND | (flags & MsFlags::MS_REC),
                None,
            )?;
            if !(flags - MsFlags::MS_REC).is_empty() {
                m(
                    None,
                    &dst,
                    None,
                    flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                    None,
                )?;
            }
            continue;
        }
        make_target(&dst, true)?;
        if kind == "devpts" {
            // The agent allocates a process's pty from its own devpts before the process enters
            // the container, so the container sees that instance: then `tty` and ttyname()
            // find /dev/pts/N. (A VM holds one pod; its containers share the instance.)
            m(
                Some(Path::new("/dev/pts")),
                &dst,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
            continue;
        }
        let (fstype, data) = match kind {
            // A VM has a cgroup v2 hierarchy of its own.
            "cgroup" | "cgroup2" => ("cgroup2", String::new()),
            k => (k, data.join(",")),
        };
        let src = mnt.source.clone().unwrap_or_else(|| fstype.to_string());
        let r = m(
            Some(Path::new(&src)),
            &dst,
            Some(fstype),
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        );
        match r {
            Ok(()) => {}
            Err(e) if fstype == "cgroup2" || fstype == "mqueue" => {
                crate::warn!("{}", e.message);
            }
            Err(e) => return Err(e),
        }
        if mnt.destination.trim_end_matches('/') == "/dev" {
            dev_is_tmpfs = true;
        }
    }
    if dev_is_tmpfs {
        let dev = rootfs.join("dev");
        for d in ["null", "zero", "full", "random", "urandom", "tty"] {
            let dst = dev.join(d);
            make_target(&dst, false)?;
            m(
                Some(&Path::new("/dev").join(d)),
                &dst,
                None,
                MsFlags::MS_BIND,
                None,
            )?;
        }
        for (link, target) in [
            ("ptmx", "pts/ptmx"),
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            let _ = std::os::unix::fs::symlink(target, dev.join(link));
        }
    }
    for (src, dst) in files {
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
        m(Some(Path::new(src)), &dst, None, MsFlags::MS_BIND, None)?;
    }
    Ok(())
}

fn make_target(p: &Path, dir: bool) -> Result<(), Fail> {
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
fn enter_root(rootfs: &Path) -> Result<(), Fail> {
    chdir(rootfs).map_err(|e| fail(format!("chdir {}: {e}", rootfs.display())))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| fail(format!("move rootfs to /: {e}")))?;
    chroot(".").map_err(|e| fail(format!("chroot: {e}")))?;
    chdir("/").map_err(|e| fail(format!("chdir /: {e}")))?;
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

fn readonly_path(p: &str) -> Result<(), Fail> {
    if std::fs::metadata(p).is_err() {
        return Ok(());
    }
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
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        )
    })
    .map_err(|e| fail(format!("make {p} read-only: {e}")))
}
