//! Network setup with the classic interface ioctls (IPv4). No netlink library and no `ip`
//! binary in the guest: this covers addresses, MTU, link up and routes, which is what a VM
//! with one or a few virtio-net interfaces needs.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::libc;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use runv_proto::{Interface, Route};

fn sock() -> Result<OwnedFd, String> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("bad interface name {name:?}"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; this is how the ioctls take it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl(
    fd: &OwnedFd,
    req: libc::c_ulong,
    arg: *mut libc::c_void,
    what: &str,
) -> Result<(), String> {
    // SAFETY: `arg` points to the ifreq/rtentry the request expects, alive for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) } < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_up(fd: &OwnedFd, name: &str, up: bool) -> Result<(), String> {
    let mut r = ifreq(name)?;
    ioctl(
        fd,
        libc::SIOCGIFFLAGS,
        &mut r as *mut _ as _,
        &format!("get flags of {name}"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { r.ifr_ifru.ifru_flags };
    let want = if up {
        flags | libc::IFF_UP as libc::c_short
    } else {
        flags & !(libc::IFF_UP as libc::c_short)
    };
    r.ifr_ifru.ifru_flags = want;
    ioctl(
        fd,
        libc::SIOCSIFFLAGS,
        &mut r as *mut _ as _,
        &format!("set {name} up"),
    )
}

/// Brings the loopback interface up.
pub fn loopback_up() -> Result<(), String> {
    set_up(&sock()?, "lo", true)
}

fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    let ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{s:?}: only IPv4 addresses are supported for now"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .ok_or_else(|| format!("bad prefix in {s:?}"))?;
    Ok((ip, len))
}

fn mask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(if len == 0 { 0 } else { u32::MAX << (32 - len) })
}

fn by_mac(mac: &str) -> Option<String> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|d| {
            let a = std::fs::read_to_string(d.path().join("address")).ok()?;
            a.trim()
                .eq_ignore_ascii_case(mac)
                .then(|| d.file_name().to_string_lossy().into_owned())
        })
}

/// Gives the interface that has MAC `from` the MAC `to` (a clone's NIC still has its
/// template's address). The link goes down for the change, as the kernel requires.
pub fn change_mac(from: &str, to: &str) -> Result<(), String> {
    let name = by_mac(from).ok_or_else(|| format!("no interface with MAC {from}"))?;
    let mut bytes = [0u8; 6];
    let parts: Vec<&str> = to.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("bad MAC {to:?}"));
    }
    for (b, p) in bytes.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC {to:?}"))?;
    }
    let fd = sock()?;
    set_up(&fd, &name, false)?;
    let mut r = ifreq(&name)?;
    // SAFETY: writing the sockaddr member of the ifreq union, which SIOCSIFHWADDR reads.
    unsafe {
        r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(bytes) {
            *d = s as libc::c_char;
        }
    }
    ioctl(
        &fd,
        libc::SIOCSIFHWADDR,
        &mut r as *mut _ as _,
        &format!("set MAC of {name} to {to}"),
    )
}

pub fn configure(interfaces: &[Interface], routes: &[Route]) -> Result<(), String> {
    let fd = sock()?;
    for itf in interfaces {
        let mut cur = None;
        for _ in 0..200 {
            cur = by_mac(&itf.mac);
            if cur.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let cur = cur.ok_or_else(|| format!("no interface with MAC {}", itf.mac))?;
        if cur != itf.name {
            set_up(&fd, &cur, false)?;
            let mut r = ifreq(&cur)?;
            let new = ifreq(&itf.name)?;
            r.ifr_ifru.ifru_newname = new.ifr_name;
            ioctl(
                &fd,
                libc::SIOCSIFNAME,
                &mut r as *mut _ as _,
                &format!("rename {cur} to {}", itf.name),
            )?;
        }
        if let Some(mtu) = itf.mtu {
            let mut r = ifreq(&itf.name)?;
            r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
            ioctl(&fd, libc::SIOCSIFMTU, &mut r as *mut _ as _, "set mtu")?;
        }
        if itf.addresses.len() > 1 {
            return Err(format!(
                "{}: only one address per interface is supported for now",
                itf.name
            ));
        }
        if let Some(a) = itf.addresses.first() {
            let (ip, len) = parse_cidr(a)?;
            let mut r = ifreq(&itf.name)?;
            r.ifr_ifru.ifru_addr = sockaddr(ip);
            ioctl(
                &fd,
                libc::SIOCSIFADDR,
                &mut r as *mut _ as _,
                &format!("set address {a}"),
            )?;
            let mut r = ifreq(&itf.name)?;
            r.ifr_ifru.ifru_netmask = sockaddr(mask(len));
            ioctl(
                &fd,
                libc::SIOCSIFNETMASK,
                &mut r as *mut _ as _,
                &format!("set netmask of {a}"),
            )?;
        }
        set_up(&fd, &itf.name, true)?;
    }
    for rt in routes {
        let (dst, len) = if rt.dest == "default" {
            (Ipv4Addr::UNSPECIFIED, 0)
        } else {
            parse_cidr(&rt.dest)?
        };
        // SAFETY: rtentry is plain old data; all-zero is a valid value.
        let mut e: libc::rtentry = unsafe { std::mem::zeroed() };
        e.rt_dst = sockaddr(dst);
        e.rt_genmask = sockaddr(mask(len));
        e.rt_flags = libc::RTF_UP;
        if let Some(gw) = &rt.gateway {
            let gw: Ipv4Addr = gw.parse().map_err(|_| format!("bad gateway {gw:?}"))?;
            e.rt_gateway = sockaddr(gw);
            e.rt_flags |= libc::RTF_GATEWAY;
        }
        let dev = rt
            .device
            .as_ref()
            .map(|d| std::ffi::CString::new(d.as_str()));
        let dev = dev.transpose().map_err(|_| "bad device name".to_string())?;
        if let Some(d) = &dev {
            e.rt_dev = d.as_ptr() as *mut libc::c_char;
        }
        ioctl(
            &fd,
            libc::SIOCADDRT,
            &mut e as *mut _ as _,
            &format!("add route {}", rt.dest),
        )?;
    }
    Ok(())
}
