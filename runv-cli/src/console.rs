//! Terminals: a host pty whose master goes to `--console-socket` (runc's protocol: the master
//! fd sent by SCM_RIGHTS with the pty's name as payload), and its size.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::pty::{OpenptyResult, Winsize, openpty};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};

pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
    pub name: PathBuf,
}

pub fn open() -> anyhow::Result<Pty> {
    let OpenptyResult { master, slave } = openpty(None, None).context("opening a pty")?;
    let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
        .unwrap_or_else(|_| PathBuf::from("/dev/pts/?"));
    // The guest's pty does the line discipline; the host side passes bytes through untouched.
    let mut attrs = tcgetattr(&slave).context("reading pty attributes")?;
    cfmakeraw(&mut attrs);
    tcsetattr(&slave, SetArg::TCSANOW, &attrs).context("setting the pty raw")?;
    Ok(Pty {
        master,
        slave,
        name,
    })
}

/// Sends the pty master to a console socket, as runc does.
pub fn send_master(socket: &Path, pty: &Pty) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to console socket {}", socket.display()))?;
    let name = pty.name.to_string_lossy();
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(name.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .with_context(|| format!("sending the pty to console socket {}", socket.display()))?;
    Ok(())
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, Winsize);

/// The window size of a terminal, or None if it is not one.
pub fn window_size(fd: impl AsFd) -> Option<(u16, u16)> {
    let mut ws = Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one Winsize into the valid, exclusively borrowed `ws`.
    unsafe { tiocgwinsz(fd.as_fd().as_raw_fd(), &mut ws) }.ok()?;
    Some((ws.ws_row, ws.ws_col))
}
