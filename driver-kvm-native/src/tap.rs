//! Opening a host tap device by name (the core creates it, persistent, and connects it to the
//! container's network).

use std::fs::File;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Attaches to the tap `name` as `IFF_TAP | IFF_NO_PI`, non-blocking.
pub fn open(name: &str) -> Result<File, String> {
    let fd = runv_api::tap::attach(name, 0)?;
    fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
    )
    .map_err(|e| format!("making tap {name} non-blocking: {e}"))?;
    Ok(fd.into())
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
