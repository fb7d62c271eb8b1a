//! A container with a terminal: the pty master arrives on the console socket (runc's
//! protocol), output flows, input reaches the container, and `stty size` follows a resize.

mod common;

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Env, wait_until};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// The console-socket receiver an engine would run: accepts one connection and takes the fd.
fn receive_master(listener: &UnixListener) -> (OwnedFd, String) {
    let (stream, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let mut fd = None;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            fd = fds.first().copied();
        }
    }
    let n = msg.bytes;
    let name = String::from_utf8_lossy(&buf[..n]).into_owned();
    // SAFETY: SCM_RIGHTS gave us this descriptor; we are its only owner.
    (
        unsafe { OwnedFd::from_raw_fd(fd.expect("no fd on the console socket")) },
        name,
    )
}

nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, nix::pty::Winsize);

fn resize(master: &OwnedFd, rows: u16, cols: u16) {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one Winsize from `ws`, which outlives the call.
    unsafe { set_winsize(master.as_raw_fd(), &ws) }.unwrap();
}

/// Reads from the master until `needle` appeared in everything read so far.
fn read_until(rx: &mpsc::Receiver<Vec<u8>>, seen: &mut String, needle: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out waiting for {needle:?}; terminal showed {seen:?}"
        );
        if let Ok(chunk) = rx.recv_timeout(left) {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[test]
fn tty_through_a_console_socket_follows_resizes() {
    let env = Env::new("tty");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "echo tty:$(tty) group:$(stat -c %g $(tty)); stty size; read line; echo got:$line; stty size",
        ],
    );
    env.edit_spec(&bundle, |s| s["process"]["terminal"] = true.into());
    let socket = env.dir.join("console.sock");
    let listener = UnixListener::bind(&socket).unwrap();

    let mut create = env.runv();
    create
        .args(["create", "--console-socket"])
        .arg(&socket)
        .arg("--bundle")
        .arg(&bundle)
        .arg("t1");
    let master = std::thread::scope(|scope| {
        let created = scope.spawn(|| env.run_files(&mut create, 180));
        let (master, name) = receive_master(&listener);
        assert!(name.starts_with("/dev/pts/"), "pty name {name:?}");
        resize(&master, 24, 80);
        let (status, _, err) = created.join().unwrap();
        assert!(status.success(), "create failed: {err}");
        master
    });

    let (tx, rx) = mpsc::channel();
    let mut reader = File::from(master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    env.run_ok(env.runv().args(["start", "t1"]), 60);
    let mut seen = String::new();
    read_until(&rx, &mut seen, "24 80", 60);
    resize(&master, 40, 100);
    // The monitor looks at the size every 200 ms; give it a few rounds before answering.
    std::thread::sleep(Duration::from_millis(800));
    File::from(master.try_clone().unwrap())
        .write_all(b"hello\r")
        .unwrap();
    read_until(&rx, &mut seen, "got:hello", 60);
    read_until(&rx, &mut seen, "40 100", 60);
    assert!(
        seen.contains("tty:/dev/pts/"),
        "the container sees its terminal: {seen:?}"
    );
    // devpts mounted gid=5 (the spec's option, as runc mounts it): the tty's group is tty.
    assert!(
        seen.contains(" group:5"),
        "the terminal belongs to group tty (5): {seen:?}"
    );
    wait_until(60, "the container to stop", || {
        env.state("t1")["status"] == "stopped"
    });
    env.run_ok(env.runv().args(["delete", "t1"]), 60);
    env.assert_clean();
}
