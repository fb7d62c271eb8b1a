//! The virtio-fs daemon: one `virtiofsd` process per shared directory, serving the guest's
//! FUSE requests straight from the guest's RAM (vhost-user). This process only sets up its
//! rings ([`crate::virtio::Fs`]).
//!
//! The daemon gets a listening socket that is already bound (`--fd`), and this process is
//! connected before the daemon accepts: no waiting for a socket file to appear, and a
//! daemon that dies early is a refused or reset connection, not a hang. It ends when that
//! connection closes (the VM ended, or this process died); dropping the [`Daemon`] also
//! kills and reaps it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Looked up in `PATH`, then where distributions install it.
const BINARY: &str = "virtiofsd";
const LIBEXEC: [&str; 2] = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// `RUNV_VIRTIOFSD`: the daemon's path, or `off` to have directories copied into images
/// as on hosts without it.
pub const ENV: &str = "RUNV_VIRTIOFSD";
/// How long the daemon may take to answer a vhost-user request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon for VMs of this driver: `parameter` (`virtiofsd=PATH`), else `$RUNV_VIRTIOFSD`,
/// else `virtiofsd` in `PATH` or a distribution's libexec directory; `None` when there is
/// none or `RUNV_VIRTIOFSD=off`.
pub fn find(parameter: Option<&str>) -> Option<Result<PathBuf, String>> {
    let parameter = parameter.filter(|p| !p.is_empty());
    let env = std::env::var(ENV).ok().filter(|p| !p.is_empty());
    match (parameter, env.as_deref()) {
        (None, Some("off")) => None,
        (None, None) => runv_api::find_in_path(BINARY)
            .or_else(|| LIBEXEC.iter().map(PathBuf::from).find(|p| p.is_file()))
            .map(Ok),
        _ => Some(runv_api::find_program(
            parameter,
            Some(ENV),
            BINARY,
            "virtiofsd",
            || format!("{BINARY} not found"),
        )),
    }
}

/// A running daemon for one shared directory, and the connection to it.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `binary` on `dir` (read-only when `readonly`), its socket at `socket` (removed
    /// again once connected), its stderr appended to `log`. Returns the daemon and the
    /// connected vhost-user stream.
    pub fn start(
        binary: &Path,
        dir: &Path,
        readonly: bool,
        socket: &Path,
        log: Option<&Path>,
    ) -> Result<(Self, UnixStream), String> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)
            .map_err(|e| format!("binding the virtio-fs socket {}: {e}", socket.display()))?;
        let result = Self::spawn(binary, dir, readonly, listener, log).and_then(|child| {
            let daemon = Self { child };
            let stream = UnixStream::connect(socket)
                .map_err(|e| format!("connecting to virtiofsd for {}: {e}", dir.display()))?;
            stream
                .set_read_timeout(Some(REPLY_TIMEOUT))
                .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
                .map_err(|e| format!("virtio-fs socket timeouts: {e}"))?;
            Ok((daemon, stream))
        });
        let _ = std::fs::remove_file(socket);
        result
    }

    fn spawn(
        binary: &Path,
        dir: &Path,
        readonly: bool,
        listener: UnixListener,
        log: Option<&Path>,
    ) -> Result<Child, String> {
        let stderr = match log {
            Some(path) => File::options()
                .create(true)
                .append(true)
                .open(path)
                .map(Stdio::from)
                .map_err(|e| format!("opening {}: {e}", path.display()))?,
            None => Stdio::null(),
        };
        let fd = OwnedFd::from(listener);
        let raw = fd.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--fd={raw}"))
            .arg("--shared-dir")
            .arg(dir)
            // Namespaces around the daemon: it sees only `dir`.
            .arg("--sandbox=namespace")
            // What runc gives a container on its rootfs: file capabilities and other xattrs,
            // and the guest told where the bundle has mount points (inode numbers stay
            // unique across them).
            .arg("--xattr")
            .arg("--announce-submounts")
            // Host and guest both change the bundle (runc's semantics): the guest caches
            // with timeouts and revalidation, not for ever.
            .arg("--cache=auto")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if readonly {
            cmd.arg("--readonly");
        }
        // SAFETY: between fork and exec only async-signal-safe calls: fcntl on an fd this
        // process owns, so that the daemon inherits the listening socket.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::fcntl(raw, nix::libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        // Ours closes here: the daemon's copy is the only one, so if the daemon dies the
        // connection fails instead of waiting in a backlog nobody accepts from.
        drop(fd);
        Ok(child)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // It ends by itself once the connection is gone; give it a moment, then make sure.
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_daemon_is_an_error_that_names_it() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let e = Daemon::start(
            Path::new("/nonexistent/virtiofsd"),
            dir.as_path(),
            false,
            &dir.as_path().join("fs.sock"),
            None,
        )
        .err()
        .unwrap();
        assert!(e.contains("starting /nonexistent/virtiofsd"), "{e}");
        assert!(!dir.as_path().join("fs.sock").exists());
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_a_failed_connection_not_a_hang() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        // `true` ignores its arguments and exits: whatever the connection does, reading a
        // reply from it must end (EOF or an error), not block.
        let (daemon, stream) = match Daemon::start(
            Path::new("/bin/true"),
            dir.as_path(),
            false,
            &dir.as_path().join("fs.sock"),
            None,
        ) {
            Ok(pair) => pair,
            Err(e) => {
                assert!(e.contains("connecting to virtiofsd"), "{e}");
                return;
            }
        };
        let mut byte = [0u8; 1];
        let read = std::io::Read::read(&mut &stream, &mut byte);
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        drop(daemon);
    }
}
