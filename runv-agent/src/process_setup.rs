//! The last steps before a container process execs, in runc's order: session and terminal,
//! rlimits, oom score, seccomp (early when it needs privileges), the capability sets and the
//! user, umask, cwd, no_new_privs; then the executable lookup and exec with runc's wording.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};
use nix::libc;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::stat::{Mode as FileMode, umask};
use nix::unistd::{Gid, Uid, chdir, execvpe, setgid, setgroups, setsid, setuid};

use crate::helper::{Fail, fail};
use crate::spec::{Capabilities, Process, Seccomp};

pub fn lookup_path(p: &Process) -> String {
    p.env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .to_string()
}

/// Finds the executable like runc (Go's exec.LookPath), with runc's error wording.
pub fn lookup(args: &[String], path: &str) -> Result<PathBuf, Fail> {
    let Some(arg0) = args.first() else {
        return Err(fail("args must not be empty"));
    };
    // One stat per candidate: over 9p without a cache each is a walk of the whole path.
    let executable = |m: &std::fs::Metadata| !m.is_dir() && m.permissions().mode() & 0o111 != 0;
    if arg0.contains('/') {
        return match std::fs::metadata(arg0) {
            Err(e) => Err(Fail {
                code: 127,
                message: format!("exec: \"{arg0}\": stat {arg0}: {}", errno_text(&e)),
            }),
            Ok(m) if executable(&m) => Ok(PathBuf::from(arg0)),
            Ok(_) => Err(Fail {
                code: 126,
                message: format!("exec: \"{arg0}\": permission denied"),
            }),
        };
    }
    for dir in path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let cand = Path::new(dir).join(arg0);
        if std::fs::metadata(&cand).is_ok_and(|m| executable(&m)) {
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

pub fn finish_and_exec(
    p: &Process,
    exe: &Path,
    seccomp: Option<&Seccomp>,
    phases: &mut runv_proto::Phases,
) -> Result<std::convert::Infallible, Fail> {
    setsid().map_err(|e| fail(format!("setsid: {e}")))?;
    // Rust programs (the agent, its helpers) ignore SIGPIPE, and an ignored signal stays
    // ignored across exec: the process gets the default, as under runc. Before seccomp,
    // which might not allow rt_sigaction.
    // SAFETY: restoring the default disposition installs no handler code.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }
        .map_err(|e| fail(format!("reset SIGPIPE: {e}")))?;
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
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .map_err(|e| fail(format!("set oom_score_adj {adj}: {e}")))?;
    }
    phases.mark("session");
    // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN: load it while we have it.
    if let Some(s) = seccomp.filter(|_| !p.no_new_privileges) {
        crate::seccomp::apply(s).map_err(fail)?;
        phases.mark("seccomp");
    }
    let caps = p.capabilities.clone().unwrap_or_default();
    drop_bounding(&caps.bounding)?;
    set_user(p)?;
    set_capabilities(&caps)?;
    phases.mark("caps");
    umask(FileMode::from_bits_truncate(
        p.user.umask.unwrap_or(0o022) as libc::mode_t
    ));
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
    if let Some(s) = seccomp.filter(|_| p.no_new_privileges) {
        crate::seccomp::apply(s).map_err(fail)?;
        phases.mark("seccomp");
    }
    if phases.enabled() {
        // Before the exec, so it costs the process a console write (debug only).
        crate::debug!("process phases: {phases}");
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

/// Switches to the spec's user, keeping the permitted set across setuid so that the
/// capability sets can be set afterwards (runc's order).
fn set_user(p: &Process) -> Result<(), Fail> {
    nix::sys::prctl::set_keepcaps(true).map_err(|e| fail(format!("keepcaps: {e}")))?;
    let groups: Vec<Gid> = p
        .user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    // In a user namespace with setgroups denied, setgroups fails: runc skips it there too.
    if let Err(e) = setgroups(&groups) {
        if !groups.is_empty() || e != nix::errno::Errno::EPERM {
            return Err(fail(format!("setgroups: {e}")));
        }
    }
    setgid(Gid::from_raw(p.user.gid)).map_err(|e| fail(format!("setgid: {e}")))?;
    setuid(Uid::from_raw(p.user.uid)).map_err(|e| fail(format!("setuid: {e}")))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| fail(format!("keepcaps: {e}")))?;
    Ok(())
}

fn cap_set(names: &[String]) -> HashSet<Capability> {
    // Names this guest kernel does not know are ignored with a warning, as runc does.
    let supported = caps::runtime::thread_all_supported();
    names
        .iter()
        .filter_map(|n| match n.parse::<Capability>() {
            Ok(c) if supported.contains(&c) => Some(c),
            _ => {
                crate::warn!("unknown capability {n:?} ignored");
                None
            }
        })
        .collect()
}

/// Sets inheritable, effective, permitted and ambient as the spec lists them. Order matters:
/// inheritable while permitted is still full, effective before permitted shrinks under it.
fn set_capabilities(c: &Capabilities) -> Result<(), Fail> {
    let set = |which: CapSet, names: &[String]| {
        caps::set(None, which, &cap_set(names))
            .map_err(|e| fail(format!("set {which:?} capabilities: {e}")))
    };
    set(CapSet::Inheritable, &c.inheritable)?;
    set(CapSet::Effective, &c.effective)?;
    set(CapSet::Permitted, &c.permitted)?;
    for cap in cap_set(&c.ambient) {
        // Possible only for a capability both permitted and inheritable; runc warns and
        // goes on (its default spec lists an ambient capability with no inheritable set).
        if let Err(e) = caps::raise(None, CapSet::Ambient, cap) {
            crate::debug!("cannot raise ambient {cap}: {e}");
        }
    }
    Ok(())
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

/// Drops every capability not in `keep` from the bounding set.
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
