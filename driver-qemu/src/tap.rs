//! Taps reach qemu as open file descriptors (`-netdev tap,fd=N`): attaching to a tap by name
//! needs CAP_NET_ADMIN, which qemu's jail does not have.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::libc;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens the existing tap `name` (in the caller's network namespace) with the flags qemu uses
/// itself: no packet information, virtio-net headers.
pub fn open(name: &str) -> Result<OwnedFd, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("bad tap name {name:?}"));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("opening /dev/net/tun for tap {name}: {e}"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, alive for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut ifr) } < 0 {
        return Err(format!(
            "attaching to tap {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(tun.into())
}

/// Lets `fd` survive qemu's exec. Runs in the forked child: one system call.
pub fn inherit(fd: i32) -> std::io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map(drop)
    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
}
