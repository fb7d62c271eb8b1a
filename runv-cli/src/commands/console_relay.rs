//! Foreground `run`/`exec` with a terminal and no `--console-socket`: runv is its own console
//! socket, receives the pty master and relays it to its own stdin/stdout (raw mode when stdin
//! is a terminal, restored at the end).

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread;

use anyhow::Context;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};

pub struct Receiver {
    listener: UnixListener,
    path: PathBuf,
}

impl Receiver {
    pub fn bind() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("runv-console-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("binding console socket {}", path.display()))?;
        Ok(Receiver { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the master (the monitor sent it during create) and relays it.
    pub fn accept_and_relay(self) -> anyhow::Result<Relay> {
        let master = receive_fd(&self.listener)?;
        Ok(Relay::start(master))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives one fd sent by SCM_RIGHTS on the next connection.
pub fn receive_fd(listener: &UnixListener) -> anyhow::Result<OwnedFd> {
    let (stream, _) = listener.accept().context("waiting for the console")?;
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receiving the console")?;
    for c in msg.cmsgs().context("reading the console message")? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: SCM_RIGHTS gave us a fresh descriptor that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    anyhow::bail!("the console socket peer sent no file descriptor")
}

pub struct Relay {
    saved: Option<Termios>,
}

impl Relay {
    pub fn start(master: OwnedFd) -> Self {
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok();
        if let Some(attrs) = &saved {
            let mut raw = attrs.clone();
            cfmakeraw(&mut raw);
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
            if let Some((rows, cols)) = crate::console::window_size(&stdin) {
                set_window_size(&master, rows, cols);
            }
        }
        let mut from_master = File::from(master.try_clone().expect("dup pty master"));
        let mut to_master = File::from(master);
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            let mut out = std::io::stdout();
            while let Ok(n) = from_master.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
        });
        thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut to_master);
        });
        Relay { saved }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(attrs) = &self.saved {
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, attrs);
        }
    }
}

nix::ioctl_write_ptr_bad!(tiocswinsz, nix::libc::TIOCSWINSZ, nix::pty::Winsize);

fn set_window_size(fd: &OwnedFd, rows: u16, cols: u16) {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one Winsize from the valid `ws`.
    let _ = unsafe { tiocswinsz(fd.as_raw_fd(), &ws) };
}
