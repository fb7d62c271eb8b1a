//! Making a VM restored from a template its own: every clone starts from the same memory
//! image, so the kernel's random state, the wall clock and the NICs' MACs are the template's
//! until the host's `Restored` request replaces them, before any container process runs.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::libc;
use runv_proto::{MAX_RESTORE_ENTROPY, MacChange};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

pub fn make_unique(entropy: &[u8], unix_time_ns: u64, macs: &[MacChange]) -> Result<(), String> {
    reseed(entropy)?;
    set_clock(unix_time_ns)?;
    for m in macs {
        crate::net::change_mac(&m.template, &m.clone)?;
    }
    Ok(())
}

/// Credits the host's bytes to the input pool, then forces the CRNG to reseed from it, so
/// that /dev/urandom and getrandom() of this clone differ from its siblings' from here on.
fn reseed(entropy: &[u8]) -> Result<(), String> {
    if entropy.len() < 32 || entropy.len() > MAX_RESTORE_ENTROPY {
        return Err(format!(
            "restore entropy must be 32 to {MAX_RESTORE_ENTROPY} bytes, got {}",
            entropy.len()
        ));
    }
    let random = File::options()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    // The kernel reads buf as __u32 words: keep the buffer 4-byte aligned in length.
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a complete rand_pool_info whose buf_size matches the bytes after it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(format!(
            "crediting entropy: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _, 0) } < 0 {
        return Err(format!(
            "reseeding the CRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The template's wall clock stopped when it was saved; the host's is the truth.
fn set_clock(unix_time_ns: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec for the duration of the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } < 0 {
        return Err(format!(
            "setting the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
