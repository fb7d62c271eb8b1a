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
//!
//! With a user namespace the helper, still in the guest's namespace, writes the new process's
//! uid and gid maps before the process goes on (it waits on a pipe), as runc's parent does.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::libc;
use nix::sched::{CloneFlags, setns};
use nix::unistd::{Gid, Uid, chdir, chroot, fchdir, setresgid, setresuid};

use crate::process_setup::{finish_and_exec, lookup, lookup_path};
use crate::rootfs_setup::{apply_sysctl, enter_root, finish_root, setup_rootfs};
use crate::spec::{CreateConfig, HelperConfig, IdMapping, Mode, Report};

#[derive(Debug)]
pub struct Fail {
    pub code: i32,
    pub message: String,
}

pub fn fail(message: impl Into<String>) -> Fail {
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

fn report_fail(sock: &mut UnixStream, f: Fail) -> ! {
    report(
        sock,
        &Report::Error {
            message: f.message,
            code: f.code,
        },
    );
    std::process::exit(f.code.max(1))
}

/// Entry point of `runv-agent __helper`.
pub fn main() -> ! {
    let mut phases = runv_proto::Phases::start(true);
    // SAFETY: the agent started us with fd 3 set to our end of a unix socketpair; nothing
    // else in this fresh process owns fd 3.
    let mut sock = unsafe { UnixStream::from_raw_fd(3) };
    let mut line = String::new();
    let cfg: HelperConfig = match BufReader::new(&sock).read_line(&mut line) {
        Ok(_) => match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => report_fail(&mut sock, fail(format!("bad helper config: {e}"))),
        },
        Err(_) => std::process::exit(1),
    };
    if cfg.timing {
        crate::log::set_level(crate::log::Level::Debug);
    }
    phases.mark("config");
    let _ = fcntl(sock.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // We inherited the agent's -1000 (never OOM-killed); a container process gets what a
    // process under runc gets: 0, or the spec's value (set later).
    let _ = std::fs::write("/proc/self/oom_score_adj", "0");

    // A container's init is born inside its (new) cgroup. An exec'd process is cloned here
    // and moves itself in: a move is not bound by pids.max, so `exec` still works in a
    // container whose pids a fork bomb has used up. The fd is opened now, in the guest's
    // namespaces, because the kernel checks a move with the opener's credentials and cgroup
    // namespace, and we are about to join the container's.
    let mut cgroup_procs = None;
    if let Some(cg) = &cfg.cgroup {
        let r = match cfg.mode {
            Mode::Create(_) => crate::guest_cgroup::enter(Path::new(cg)),
            Mode::Exec { .. } => {
                crate::guest_cgroup::open_procs(Path::new(cg)).map(|f| cgroup_procs = Some(f))
            }
        };
        if let Err(e) = r {
            report_fail(&mut sock, fail(e));
        }
    }
    phases.mark("cgroup");
    let mut flags = CloneFlags::CLONE_PARENT;
    let mut root_fd = None;
    let mut later_unshare = CloneFlags::empty();
    // The child waits on this until the pid is reported (and, with a user namespace, its id
    // maps written): its own reports must never reach the agent before the pid.
    let (sync_r, sync_w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => report_fail(&mut sock, fail(format!("pipe: {e}"))),
    };
    match &cfg.mode {
        Mode::Create(c) => {
            for ns in &c.new_namespaces {
                flags |= match ns.as_str() {
                    "mount" => CloneFlags::CLONE_NEWNS,
                    "pid" => CloneFlags::CLONE_NEWPID,
                    "uts" => CloneFlags::CLONE_NEWUTS,
                    "ipc" => CloneFlags::CLONE_NEWIPC,
                    "cgroup" => CloneFlags::CLONE_NEWCGROUP,
                    "user" => CloneFlags::CLONE_NEWUSER,
                    other => report_fail(&mut sock, fail(format!("unknown namespace {other}"))),
                };
            }
            // A pod member joins the sandbox's namespaces first; the pid namespace applies
            // to the clone below.
            if let Err(f) = join_pod_namespaces(&c.join_namespaces) {
                report_fail(&mut sock, f);
            }
            if flags.contains(CloneFlags::CLONE_NEWUSER) {
                // Namespaces made before the id maps exist record an unmapped creator (an
                // IPC namespace's mqueue root would belong to nobody): the child unshares
                // them once mapped, as runc does. Only the pid namespace must come with
                // the clone, since unshare would put only later children in it.
                later_unshare = flags
                    & (CloneFlags::CLONE_NEWNS
                        | CloneFlags::CLONE_NEWUTS
                        | CloneFlags::CLONE_NEWIPC
                        | CloneFlags::CLONE_NEWCGROUP);
                flags -= later_unshare;
            }
        }
        Mode::Exec { init_pid } => match join_namespaces(*init_pid) {
            Ok(fd) => root_fd = Some(fd),
            Err(f) => report_fail(&mut sock, f),
        },
    }
    phases.mark("namespaces");

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
        report_fail(&mut sock, fail(format!("clone: {e}")));
    }
    if pid > 0 {
        if let Mode::Create(c) = &cfg.mode {
            if flags.contains(CloneFlags::CLONE_NEWUSER) {
                if let Err(f) = write_id_maps(pid as i32, c) {
                    // SAFETY: kill takes integers; the child is ours and waits for the maps.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    report_fail(&mut sock, f);
                }
            }
        }
        report(&mut sock, &Report::Pid(pid as i32));
        let _ = nix::unistd::write(&sync_w, b"1");
        phases.mark("clone");
        if cfg.timing {
            crate::debug!("helper phases: {phases}");
        }
        std::process::exit(0);
    }
    // The child: set up and exec, or report why not; first wait for the pid report.
    let mut phases = runv_proto::Phases::start(cfg.timing);
    drop(sync_w);
    let mut b = [0u8; 1];
    if File::from(sync_r).read(&mut b).unwrap_or(0) != 1 {
        // The helper died before it reported us: nobody waits for this process.
        std::process::exit(1);
    }
    phases.mark("sync");
    if let Some(mut procs) = cgroup_procs {
        if let Err(e) = procs.write_all(b"0") {
            report_fail(&mut sock, fail(format!("join the container's cgroup: {e}")));
        }
    }
    phases.mark("cgroup");
    let f = child(
        &cfg,
        root_fd,
        flags
            .contains(CloneFlags::CLONE_NEWUSER)
            .then_some(later_unshare),
        &mut sock,
        &mut phases,
    );
    report_fail(&mut sock, f)
}

fn write_id_maps(pid: i32, c: &CreateConfig) -> Result<(), Fail> {
    let text = |m: &[IdMapping]| {
        m.iter()
            .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.size))
            .collect::<String>()
    };
    for (file, maps) in [("uid_map", &c.uid_mappings), ("gid_map", &c.gid_mappings)] {
        if maps.is_empty() {
            return Err(fail(format!(
                "a user namespace needs linux.{}Mappings",
                &file[..3]
            )));
        }
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, text(maps)).map_err(|e| fail(format!("write {path}: {e}")))?;
    }
    Ok(())
}

fn join_pod_namespaces(joins: &[(String, i32)]) -> Result<(), Fail> {
    for (kind, pid) in joins {
        let (file, flag) = match kind.as_str() {
            "pid" => ("pid", CloneFlags::CLONE_NEWPID),
            "uts" => ("uts", CloneFlags::CLONE_NEWUTS),
            "ipc" => ("ipc", CloneFlags::CLONE_NEWIPC),
            "cgroup" => ("cgroup", CloneFlags::CLONE_NEWCGROUP),
            other => return Err(fail(format!("cannot join a {other} namespace of the pod"))),
        };
        let path = format!("/proc/{pid}/ns/{file}");
        let fd = File::open(&path).map_err(|e| fail(format!("open {path}: {e}")))?;
        setns(&fd, flag).map_err(|e| fail(format!("setns {path}: {e}")))?;
    }
    Ok(())
}

/// Joins every namespace in which the container's init differs from the agent (user first:
/// it decides what the others may be joined with) and returns its root.
fn join_namespaces(init_pid: i32) -> Result<OwnedFd, Fail> {
    let open = |p: String| File::open(&p).map_err(|e| fail(format!("open {p}: {e}")));
    let root = open(format!("/proc/{init_pid}/root"))?;
    let mut fds = Vec::new();
    for (ns, flag) in [
        ("user", CloneFlags::CLONE_NEWUSER),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let theirs = std::fs::read_link(format!("/proc/{init_pid}/ns/{ns}")).ok();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
        if theirs.is_some() && theirs != ours {
            fds.push((open(format!("/proc/{init_pid}/ns/{ns}"))?, flag, ns));
        }
    }
    for (fd, flag, ns) in fds {
        setns(&fd, flag).map_err(|e| fail(format!("setns {ns}: {e}")))?;
        if ns == "user" {
            become_namespace_root()?;
        }
    }
    Ok(root.into())
}

/// In a new user namespace, become its root (when mapped) so that files made during setup
/// belong to the container's root, as runc's nsexec does.
fn become_namespace_root() -> Result<(), Fail> {
    let mapped = |file: &str| {
        std::fs::read_to_string(format!("/proc/self/{file}"))
            .map(|m| {
                m.lines().any(|l| {
                    let f: Vec<u64> = l
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    f.len() == 3 && f[0] == 0 && f[2] > 0
                })
            })
            .unwrap_or(false)
    };
    if mapped("gid_map") {
        let g = Gid::from_raw(0);
        setresgid(g, g, g).map_err(|e| fail(format!("setresgid 0: {e}")))?;
    }
    if mapped("uid_map") {
        let u = Uid::from_raw(0);
        setresuid(u, u, u).map_err(|e| fail(format!("setresuid 0: {e}")))?;
    }
    Ok(())
}

fn child(
    cfg: &HelperConfig,
    root_fd: Option<OwnedFd>,
    userns_unshare: Option<CloneFlags>,
    sock: &mut UnixStream,
    phases: &mut runv_proto::Phases,
) -> Fail {
    let r = (|| -> Result<(), Fail> {
        match &cfg.mode {
            Mode::Create(c) => {
                // In a user namespace, the helper wrote the id maps before it let us go on.
                if let Some(unshare) = userns_unshare {
                    become_namespace_root()?;
                    nix::sched::unshare(unshare).map_err(|e| fail(format!("unshare: {e}")))?;
                }
                let in_userns = c.new_namespaces.iter().any(|n| n == "user");
                if let Some(h) = &c.hostname {
                    nix::unistd::sethostname(h).map_err(|e| fail(format!("sethostname: {e}")))?;
                }
                if let Some(d) = &c.domainname {
                    // SAFETY: the pointer and length describe `d`, alive for the call.
                    let r = unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) };
                    if r < 0 {
                        let e = std::io::Error::last_os_error();
                        return Err(fail(format!("setdomainname: {e}")));
                    }
                }
                phases.mark("names");
                setup_rootfs(c, in_userns)?;
                phases.mark("mounts");
                enter_root(Path::new(&c.rootfs))?;
                phases.mark("pivot");
                apply_sysctl(&c.sysctl)?;
                finish_root(c)?;
            }
            Mode::Exec { .. } => {
                let fd = root_fd
                    .as_ref()
                    .ok_or_else(|| fail("no container root to exec in"))?;
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
    phases.mark("root");
    let p = &cfg.process;
    let path = lookup_path(p);
    let exe = match lookup(&p.args, &path) {
        Ok(exe) => exe,
        Err(f) => return f,
    };
    report(sock, &Report::Ready);
    phases.mark("ready");
    if cfg.wait_start {
        let mut line = String::new();
        let _ = BufReader::new(&*sock).read_line(&mut line);
        if line.trim() != "start" {
            // The agent went away or the container was removed before start.
            std::process::exit(1);
        }
    }
    match finish_and_exec(p, &exe, cfg.seccomp.as_ref(), phases) {
        Ok(never) => match never {},
        Err(f) => f,
    }
}
