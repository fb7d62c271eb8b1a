//! The few rtnetlink calls runv needs, synchronous, in the calling thread's network namespace:
//! dumps of links, addresses and routes; link up with an MTU; a persistent tap device.

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use anyhow::{Context, bail};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub mtu: u32,
    /// An ethernet device (not loopback, not a tunnel without L2).
    pub ether: bool,
    /// One of ours.
    pub is_tap: bool,
}

#[derive(Debug, Clone)]
pub struct Addr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// None: the default route.
    pub dest: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
}

/// Sends one request and collects the answers (all parts of a dump, or the ack).
fn request(message: RouteNetlinkMessage, flags: u16) -> anyhow::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding the netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting the netlink socket")?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::from(message));
    req.finalize();
    let mut buf = vec![0; req.header.length as usize];
    req.serialize(&mut buf[..]);
    socket
        .send(&buf[..], 0)
        .context("sending a netlink request")?;

    let mut answers = Vec::new();
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let size = socket
            .recv(&mut &mut rx[..], 0)
            .context("reading a netlink answer")?;
        let mut offset = 0;
        while offset < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> =
                NetlinkMessage::deserialize(&rx[offset..size])
                    .map_err(|e| anyhow::anyhow!("bad netlink message: {e}"))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) => {
                    if e.code.is_none() {
                        // An ack.
                        return Ok(answers);
                    }
                    bail!("netlink: {}", e.to_io());
                }
                NetlinkPayload::InnerMessage(m) => answers.push(m),
                _ => {}
            }
            if flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0 {
                return Ok(answers);
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn dump(message: RouteNetlinkMessage) -> anyhow::Result<Vec<RouteNetlinkMessage>> {
    request(message, NLM_F_REQUEST | NLM_F_DUMP)
}

pub fn links() -> anyhow::Result<Vec<Link>> {
    let mut links = Vec::new();
    for m in dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        let RouteNetlinkMessage::NewLink(l) = m else {
            continue;
        };
        let mut link = Link {
            index: l.header.index,
            name: String::new(),
            mac: String::new(),
            mtu: 1500,
            ether: l.header.link_layer_type == LinkLayerType::Ether,
            is_tap: false,
        };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Address(mac) => {
                    link.mac = mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":")
                }
                _ => {}
            }
        }
        link.is_tap = link.name.starts_with("rvtap");
        if link.mac.len() != 17 {
            link.ether = false;
        }
        links.push(link);
    }
    Ok(links)
}

pub fn addresses() -> anyhow::Result<Vec<Addr>> {
    let mut out = Vec::new();
    for m in dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))? {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on p2p links).
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            out.push(Addr {
                index: a.header.index,
                ip,
                prefix: a.header.prefix_len,
            });
        }
    }
    Ok(out)
}

pub fn routes() -> anyhow::Result<Vec<Route>> {
    let mut req = RouteMessage::default();
    req.header.address_family = AddressFamily::Inet;
    let mut out = Vec::new();
    for m in dump(RouteNetlinkMessage::GetRoute(req))? {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        // The main table's unicast routes (not local/broadcast ones).
        if r.header.table != 254 || r.header.kind != RouteType::Unicast {
            continue;
        }
        let ip = |a: &RouteAddress| match a {
            RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
            RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
            _ => None,
        };
        let mut route = Route {
            dest: None,
            gateway: None,
            oif: None,
        };
        for a in &r.attributes {
            match a {
                RouteAttribute::Destination(d) => {
                    route.dest = ip(d).map(|d| (d, r.header.destination_prefix_length))
                }
                RouteAttribute::Gateway(g) => route.gateway = ip(g),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                _ => {}
            }
        }
        out.push(route);
    }
    Ok(out)
}

fn index_of(name: &str) -> anyhow::Result<u32> {
    links()?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .with_context(|| format!("no interface {name}"))
}

/// Sets a link up, and its MTU when `mtu` is given.
fn set_link(name: &str, mtu: Option<u32>) -> anyhow::Result<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index_of(name)?;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    request(RouteNetlinkMessage::SetLink(msg), NLM_F_REQUEST | NLM_F_ACK)?;
    Ok(())
}

pub fn set_up(name: &str) -> anyhow::Result<()> {
    set_link(name, None)
}

pub fn set_mtu_up(name: &str, mtu: u32) -> anyhow::Result<()> {
    set_link(name, Some(mtu))
}

/// Creates a persistent tap device (no packet info header) that the VMM's driver opens by
/// name.
pub fn create_tap(name: &str) -> anyhow::Result<()> {
    use nix::libc;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    let tun = runv_api::tap::attach(name, 0).map_err(anyhow::Error::msg)?;
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETPERSIST");
    }
    Ok(())
}
