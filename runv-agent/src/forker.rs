//! The forker: helpers without an exec each.
//!
//! A helper must be a single-threaded process (see `helper`), and the agent is not. Each
//! helper used to be a fresh exec of the agent binary (`/proc/self/exe __helper`): a fork of
//! the whole multi-threaded agent, an exec and the static binary's start-up, for every
//! container and every `exec`; under TCG that was about a quarter of an exec's time (issue
//! 16). Now one single-threaded process, `runv-agent __forker`, started on first use, forks
//! every helper: a helper costs the fork of a small idle process.
//!
//! The forker clones with `CLONE_PARENT`, so a helper is still the agent's child (the agent
//! reaps it, and the helper's own `CLONE_PARENT` makes the container process the agent's
//! child too), and runs `helper::main` with the fds it was given, as a fresh helper would.
//!
//! Protocol on the forker's fd 3 (a unix socket to the agent): the agent sends one byte with
//! four fds attached (SCM_RIGHTS): what becomes the helper's fd 3 (its socket to the agent),
//! 0, 1 and 2; the forker answers with the helper's pid as an i32, little endian, or minus an
//! errno. A byte without fds is answered with minus EINVAL: the agent sends one to wait until
//! a forker it started is up. When there is no forker (it cannot be started, or died), the
//! agent execs a helper as before.
//!
//! The agent starts the forker when it starts serving, not at the first container: in a
//! template VM it is then part of what every clone gets ready-made (its exec and start-up
//! under TCG were most of a clone's first `create`); elsewhere it starts while the host
//! prepares the first container.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use crate::reaper::Reaper;

/// How long a fork may take before the forker is given up on (a fork bomb makes forks slow,
/// not this slow).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no helper was forked.
#[derive(Debug)]
pub enum ForkError {
    /// No forker to ask (it could not be started or is gone): exec a helper instead.
    Unavailable(String),
    /// The forker's fork failed (the guest is out of processes or memory), or the forker
    /// died with the request in hand. Not worth a second try with an exec.
    Failed(std::io::Error),
}

/// The agent's end: the forker's socket, started on first use and again after it died.
#[derive(Default)]
pub struct Forker {
    conn: Mutex<Option<UnixStream>>,
}

impl Forker {
    /// Starts the forker unless one runs; with `wait`, returns once it answers. A forker
    /// that cannot be started is left to the first helper's request (which then execs one).
    pub fn prestart(&self, reaper: &Reaper, wait: bool) {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.is_some() {
            return;
        }
        let mut sock = match start(reaper) {
            Ok(s) => s,
            Err(e) => {
                crate::debug!("{e}");
                return;
            }
        };
        if wait {
            let mut answer = [0u8; 4];
            let up = sock
                .write_all(&[1])
                .and_then(|()| sock.read_exact(&mut answer));
            if up.is_err() || i32::from_le_bytes(answer) != -libc::EINVAL {
                crate::debug!("forker: no answer at start ({up:?})");
                return;
            }
        }
        *conn = Some(sock);
    }

    /// Forks a helper whose fds 3, 0, 1 and 2 are `fds`; returns its pid. The helper is the
    /// agent's child: the caller reaps it (or tells the reaper to forget it).
    pub fn spawn_helper(
        &self,
        reaper: &Reaper,
        fds: [BorrowedFd<'_>; 4],
    ) -> Result<i32, ForkError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if conn.is_none() {
            *conn = Some(start(reaper).map_err(ForkError::Unavailable)?);
        }
        let sock = conn.as_mut().expect("set above");
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&[1])],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        );
        if let Err(e) = sent {
            // The forker is gone: nothing was forked, so an exec'd helper may take over.
            *conn = None;
            return Err(ForkError::Unavailable(format!("forker: send: {e}")));
        }
        let mut answer = [0u8; 4];
        if let Err(e) = sock.read_exact(&mut answer) {
            // It may have forked a helper before it died: that helper finds its socket
            // closed when the caller drops it, and exits.
            *conn = None;
            return Err(ForkError::Failed(std::io::Error::other(format!(
                "the helper forker did not answer: {e}"
            ))));
        }
        match i32::from_le_bytes(answer) {
            pid if pid > 0 => Ok(pid),
            errno => Err(ForkError::Failed(std::io::Error::from_raw_os_error(-errno))),
        }
    }
}

/// Execs `runv-agent __forker` with its end of a new socketpair as fd 3.
fn start(reaper: &Reaper) -> Result<UnixStream, String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("forker: socketpair: {e}"))?;
    ours.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(|e| format!("forker: socket timeout: {e}"))?;
    let child = Command::new("/proc/self/exe")
        .arg("__forker")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .fd3(theirs.as_raw_fd())
        .spawn()
        .map_err(|e| format!("forker: spawn: {e}"))?;
    // Its exit, whenever it comes, is no one's business: the next request starts another.
    reaper.forget(child.id() as i32);
    Ok(ours)
}

/// Passing a socket to a child process as its fd 3, which the helper and forker protocols
/// use (std's `Command` sets up only 0, 1 and 2).
pub trait Fd3 {
    fn fd3(&mut self, fd: RawFd) -> &mut Self;
}

impl Fd3 for Command {
    fn fd3(&mut self, fd: RawFd) -> &mut Self {
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            self.pre_exec(move || {
                if fd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

/// Entry point of `runv-agent __forker`: forks a helper per request until the agent closes
/// the socket. Single-threaded, so a fork of it may allocate (see `helper`).
pub fn main() -> ! {
    // SAFETY: the agent started us with fd 3 set to our end of a unix socketpair; nothing
    // else in this process owns fd 3.
    let mut sock = unsafe { UnixStream::from_raw_fd(3) };
    loop {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; 4]);
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(_) => std::process::exit(1),
        };
        if msg.bytes == 0 {
            // The agent closed its end.
            std::process::exit(0);
        }
        let mut fds = Vec::new();
        for c in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(v) = c {
                // SAFETY: the kernel just installed these fds for us; nothing else owns them.
                fds.extend(v.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let answer = fork_helper(&fds);
        drop(fds);
        if sock.write_all(&answer.to_le_bytes()).is_err() {
            std::process::exit(1);
        }
    }
}

/// Forks a helper with `fds` as its 3, 0, 1, 2; returns its pid or minus an errno.
fn fork_helper(fds: &[OwnedFd]) -> i32 {
    // The received fds are above 3 (0-3 are open here), so the dup2s below cannot
    // overwrite one another.
    if fds.len() != 4 || fds.iter().any(|f| f.as_raw_fd() <= 3) {
        return -libc::EINVAL;
    }
    // SAFETY: raw clone without a new stack behaves like fork. This process is
    // single-threaded, so the child may allocate.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_long,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return -Errno::last_raw();
    }
    if pid > 0 {
        return pid as i32;
    }
    // The helper: its fds in place (dup2 onto 3 also closes our socket to the agent), the
    // originals closed, then what a fresh `__helper` does.
    for (fd, target) in fds.iter().zip([3, 0, 1, 2]) {
        // SAFETY: dup2 on fds we own; the targets are ours to replace.
        if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
            std::process::exit(1);
        }
    }
    for fd in fds {
        // SAFETY: closing our own copies; the OwnedFds are never used again in this process
        // (helper::main does not return, so they are not dropped).
        unsafe { libc::close(fd.as_raw_fd()) };
    }
    crate::helper::main()
}
