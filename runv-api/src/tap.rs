//! Attaching to a host tap device by name: the core creates it (persistent) in the container's
//! network; drivers open it for their VMM.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::libc;

// TUNSETIFF is `_IOW('T', 202, int)` but takes a `struct ifreq`.
nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

/// Opens `/dev/net/tun` as the tap `name` (made if it does not exist) with
/// `IFF_TAP | IFF_NO_PI | extra_flags` (e.g. `IFF_VNET_HDR`). The fd is close-on-exec.
pub fn attach(name: &str, extra_flags: libc::c_int) -> Result<OwnedFd, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(format!("bad tap device name {name:?}"));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("opening /dev/net/tun for tap {name}: {e}"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | extra_flags) as libc::c_short;
    // SAFETY: the fd is a tun device and `ifr` a valid, NUL-terminated ifreq that outlives
    // the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &ifr) }
        .map_err(|e| format!("attaching to tap {name}: {e}"))?;
    Ok(tun.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tap_names_are_refused_before_any_ioctl() {
        for name in ["", "a/b", &"x".repeat(40)] {
            assert!(attach(name, 0).unwrap_err().contains("bad tap"), "{name:?}");
        }
    }
}
