//! Taps reach qemu as open file descriptors (`-netdev tap,fd=N`): attaching to a tap by name
//! needs CAP_NET_ADMIN, which qemu's jail does not have.

use std::os::fd::OwnedFd;

use nix::libc;

/// Opens the existing tap `name` (in the caller's network namespace) with the flags qemu uses
/// itself: no packet information, virtio-net headers.
pub fn open(name: &str) -> Result<OwnedFd, String> {
    runv_api::tap::attach(name, libc::IFF_VNET_HDR)
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
