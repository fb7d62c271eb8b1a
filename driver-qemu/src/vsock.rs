//! The agent channel over vsock, where the host has vhost-vsock and qemu runs with KVM: the
//! guest's side of the channel is then a socket served by the host kernel (vhost), not a
//! virtio-serial port that qemu's main loop copies through. The fallback is virtio-serial.
//!
//! The host listens (on a port the kernel picks) and the agent connects to it from the guest
//! (`runv.channel=vsock:2:PORT`): the listener exists before the guest boots, so the agent's
//! first connect succeeds. Any guest can reach the host's ports, so a connection is taken
//! only from this VM's CID, which this driver claims on the vhost device itself before qemu
//! gets it (`vhostfd=`): a CID in use by another VM is skipped, not a failed start.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, getpeername, getsockname,
    listen, socket,
};

pub const DEVICE: &str = "/dev/vhost-vsock";
/// The host's CID, as the guest reaches it.
const HOST_CID: u32 = 2;
const ANY: u32 = u32::MAX;
/// CIDs 0-2 are reserved; `u32::MAX` is "any".
const FIRST_CID: u32 = 3;

// VHOST_VSOCK_SET_GUEST_CID: _IOW(VHOST_VIRTIO = 0xAF, 0x60, __u64).
nix::ioctl_write_ptr!(set_guest_cid, 0xAF, 0x60, u64);

/// What the agent reads from the kernel command line: where the host listens.
pub fn kernel_param(port: u32) -> String {
    format!("runv.channel=vsock:{HOST_CID}:{port}")
}

/// Whether this host can give a VM a vsock agent channel.
pub fn available() -> bool {
    Path::new(DEVICE).exists()
}

/// A VM's vsock: the CID claimed for it, and the host's listener.
pub struct Vsock {
    pub cid: u32,
    pub port: u32,
    listener: OwnedFd,
}

impl Vsock {
    /// Opens the vhost device, claims a free CID for it (trying from one derived from
    /// `seed`), and listens on a port of the host's choosing. Returns the vsock and the vhost
    /// device, for qemu to inherit.
    pub fn new(seed: u32) -> Result<(Self, OwnedFd), String> {
        let vhost: OwnedFd = std::fs::File::options()
            .read(true)
            .write(true)
            .open(DEVICE)
            .map_err(|e| format!("opening {DEVICE}: {e}"))?
            .into();
        let span = ANY - FIRST_CID;
        let mut cid = None;
        for attempt in 0..256u32 {
            let candidate = FIRST_CID + seed.wrapping_add(attempt.wrapping_mul(7919)) % span;
            let value = u64::from(candidate);
            // SAFETY: the ioctl reads one u64 from a local that outlives the call, on a
            // vhost-vsock fd this function owns.
            match unsafe { set_guest_cid(vhost.as_raw_fd(), &value) } {
                Ok(_) => {
                    cid = Some(candidate);
                    break;
                }
                Err(nix::errno::Errno::EADDRINUSE) => continue,
                Err(e) => return Err(format!("claiming a vsock CID on {DEVICE}: {e}")),
            }
        }
        let cid = cid.ok_or_else(|| "no free vsock CID after 256 tries".to_string())?;
        let listener = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| format!("a vsock socket: {e}"))?;
        bind(listener.as_raw_fd(), &VsockAddr::new(ANY, ANY))
            .map_err(|e| format!("binding the vsock agent listener: {e}"))?;
        listen(&listener, Backlog::new(4).unwrap_or(Backlog::MAXCONN))
            .map_err(|e| format!("listening on vsock: {e}"))?;
        let port = getsockname::<VsockAddr>(listener.as_raw_fd())
            .map_err(|e| format!("the vsock listener's port: {e}"))?
            .port();
        Ok((
            Self {
                cid,
                port,
                listener,
            },
            vhost,
        ))
    }

    /// Waits until `deadline` for this VM's agent to connect (other CIDs are turned away);
    /// `gone` says whether the VM has ended, which ends the wait.
    pub fn accept(&self, deadline: Instant, gone: impl Fn() -> bool) -> Result<OwnedFd, String> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        loop {
            if gone() {
                return Err("the VM ended before its agent connected over vsock".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the agent did not connect over vsock (CID {}, port {}) in time",
                    self.cid, self.port
                ));
            }
            let slice = left.min(Duration::from_millis(100));
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            let timeout = PollTimeout::try_from(slice).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(format!("waiting for the agent on vsock: {e}")),
            }
            let fd = match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that nothing else owns.
                Ok(fd) => unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(format!("accepting the agent on vsock: {e}")),
            };
            match getpeername::<VsockAddr>(fd.as_raw_fd()) {
                Ok(peer) if peer.cid() == self.cid => return Ok(fd),
                // Another guest: not our agent. Dropping the socket closes it.
                _ => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_parameter_names_the_host_and_the_port() {
        if !available() {
            println!("skipped: no {DEVICE} (vhost-vsock; the test host has it)");
            return;
        }
        let (v, _vhost) = Vsock::new(std::process::id()).unwrap();
        assert!(v.cid >= FIRST_CID && v.cid != ANY);
        assert_eq!(
            kernel_param(v.port),
            format!("runv.channel=vsock:2:{}", v.port)
        );
        // A second VM gets another CID even from the same seed.
        let (w, _other) = Vsock::new(std::process::id()).unwrap();
        assert_ne!(v.cid, w.cid);
        let e = v.accept(Instant::now(), || false).unwrap_err();
        assert!(e.contains("in time"), "{e}");
        let e = v
            .accept(Instant::now() + Duration::from_secs(5), || true)
            .unwrap_err();
        assert!(e.contains("ended"), "{e}");
    }
}
