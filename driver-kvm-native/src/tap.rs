//! Opening a host tap device by name (the core creates it, persistent, and connects it to the
//! container's network).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use nix::libc;

// TUNSETIFF is `_IOW('T', 202, int)` but takes a `struct ifreq`.
nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

/// Attaches to the tap `name` as `IFF_TAP | IFF_NO_PI`, non-blocking.
pub fn open(name: &str) -> Result<File, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(format!("bad tap device name {name:?}"));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| format!("opening /dev/net/tun for tap {name}: {e}"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: the fd is a tun device and `ifr` a valid, NUL-terminated ifreq that outlives
    // the call.
    unsafe { tun_set_iff(file.as_raw_fd(), &ifr) }
        .map_err(|e| format!("attaching to tap {name}: {e}"))?;
    Ok(file)
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = mac.split(':').collect();
    let mut out = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("bad MAC address {mac:?}"));
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {mac:?}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_garbage_is_refused() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        assert!(parse_mac("02:42:ac:11:00").is_err());
        assert!(parse_mac("zz:42:ac:11:00:02").is_err());
    }

    #[test]
    fn bad_tap_names_are_refused_before_any_ioctl() {
        assert!(open("").unwrap_err().contains("bad tap"));
        assert!(open("a/b").unwrap_err().contains("bad tap"));
        assert!(open(&"x".repeat(40)).unwrap_err().contains("bad tap"));
    }
}
