//! Networking as container engines set it up: the monitor lives in the container's network
//! namespace (the spec's `path`, or a new one as runc would make), engines configure that
//! namespace (before `create`, or in a prestart hook through `/proc/<monitor pid>/ns/net`),
//! and runv mirrors it into the VM.
//!
//! For every ethernet interface of the namespace (a veth end, usually), a tap device is made
//! in the same namespace and tied to the interface both ways with `tc` ingress qdiscs and
//! `mirred` redirects (as Kata does): frames arriving on the veth leave through the tap into
//! the VM, and the other way round. The VM's virtio-net device gets the interface's MAC and
//! MTU, and the agent gives the guest interface the same name, addresses and routes. The
//! namespace's own IP stack keeps its addresses but never sees a frame.
//!
//! What is supported: IPv4 addresses and routes (the agent configures IPv4), interfaces present
//! when the VM boots. runv runs prestart and createRuntime hooks before it boots the VM (after
//! the namespace exists), so docker's prestart-hook networking is in place by then; changes
//! made to the namespace after `create` returns are not seen (no hot-plug).
//!
//! Discovery is netlink (`netlink-packet-route`). The tc rules use the `tc` binary of
//! iproute2: the netlink crates' tc support covers qdiscs but building u32 filters with
//! mirred actions by hand is much code for two fixed rules, and every engine host has iproute2.

mod netlink;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

use netlink::Link;

/// The namespace the monitor started in (the host's), to run hooks there.
static HOST_NETNS: OnceLock<OwnedFd> = OnceLock::new();

/// What the spec asks for.
pub enum Netns {
    /// No network namespace entry: the host's (like runc, the container shares it).
    Host,
    /// A new, empty namespace (runc's default for a `network` entry without a path).
    New,
    /// Join an existing one.
    Path(PathBuf),
}

impl Netns {
    pub fn from_spec(spec: &serde_json::Value) -> Netns {
        let Some(ns) = spec["linux"]["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|ns| ns["type"] == "network"))
        else {
            return Netns::Host;
        };
        match ns["path"].as_str().filter(|p| !p.is_empty()) {
            Some(p) => Netns::Path(PathBuf::from(p)),
            None => Netns::New,
        }
    }
}

/// Moves the calling thread (the monitor's main thread, whose namespace engines see as
/// `/proc/<pid>/ns/net`) into the container's network namespace. Call it before any thread
/// is started: children started later inherit it.
pub fn enter(netns: &Netns) -> anyhow::Result<()> {
    if matches!(netns, Netns::Host) {
        return Ok(());
    }
    let host = File::open("/proc/thread-self/ns/net").context("opening our network namespace")?;
    let _ = HOST_NETNS.set(host.into());
    match netns {
        Netns::Path(path) => {
            let f = File::open(path)
                .with_context(|| format!("opening network namespace {}", path.display()))?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("joining network namespace {}", path.display()))
        }
        Netns::New => {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .context("creating a network namespace")?;
            if let Err(e) = netlink::set_up("lo") {
                tracing::debug!("loopback of the new namespace: {e:#}");
            }
            Ok(())
        }
        Netns::Host => Ok(()),
    }
}

/// Runs `f` on a thread in the host's network namespace (hooks are runtime-namespace code:
/// docker's libnetwork-setkey must not run inside the namespace it configures).
pub fn in_host_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let Some(host) = HOST_NETNS.get() else {
        return f();
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Err(e) = nix::sched::setns(host, nix::sched::CloneFlags::CLONE_NEWNET) {
                tracing::warn!("returning to the host network namespace for a hook: {e}");
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The network the VM gets: NICs for the hypervisor, interfaces and routes for the agent.
#[derive(Default, Debug)]
pub struct VmNetwork {
    pub nics: Vec<runv_api::NetInterface>,
    pub interfaces: Vec<runv_proto::Interface>,
    pub routes: Vec<runv_proto::Route>,
}

/// Discovers the namespace the calling thread is in and connects its ethernet interfaces to
/// taps. Nothing to do for the host's namespace: a VM never takes the host's interfaces.
pub fn prepare(netns: &Netns) -> anyhow::Result<VmNetwork> {
    if matches!(netns, Netns::Host) {
        return Ok(VmNetwork::default());
    }
    let links = netlink::links().context("listing the namespace's interfaces")?;
    let addrs = netlink::addresses().context("listing the namespace's addresses")?;
    let routes = netlink::routes().context("listing the namespace's routes")?;
    let mut net = VmNetwork::default();
    for (i, link) in links.iter().filter(|l| l.ether && !l.is_tap).enumerate() {
        let tap = format!("rvtap{i}");
        make_tap(&tap, link).with_context(|| format!("connecting {} to the VM", link.name))?;
        net.nics.push(runv_api::NetInterface {
            tap,
            mac: link.mac.clone(),
            mtu: link.mtu,
        });
        net.interfaces.push(runv_proto::Interface {
            mac: link.mac.clone(),
            name: link.name.clone(),
            mtu: Some(link.mtu),
            addresses: addrs
                .iter()
                .filter(|a| a.index == link.index && a.ip.is_ipv4())
                .map(|a| format!("{}/{}", a.ip, a.prefix))
                .collect(),
        });
        for r in routes.iter().filter(|r| r.oif == Some(link.index)) {
            // Connected routes come with the addresses in the guest.
            if r.gateway.is_none() && r.dest.is_some() {
                continue;
            }
            net.routes.push(runv_proto::Route {
                dest: match &r.dest {
                    Some((ip, len)) => format!("{ip}/{len}"),
                    None => "default".into(),
                },
                gateway: r.gateway.map(|g| g.to_string()),
                device: Some(link.name.clone()),
            });
        }
    }
    tracing::debug!("network for the VM: {net:?}");
    Ok(net)
}

/// Undoes [`prepare`] for `(interface, tap)` pairs, once the VM is gone: the namespace may
/// outlive the container (a named netns given by the user), and a second container there must
/// find it as the first did. Best effort: what is already gone is fine.
pub fn teardown(pairs: &[(String, String)]) {
    for (link, tap) in pairs {
        if let Err(e) = tc(&["qdisc", "del", "dev", link, "ingress"]) {
            tracing::debug!("{e:#}");
        }
        match Command::new("ip").args(["link", "del", tap]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::debug!(
                "ip link del {tap}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => tracing::debug!("ip link del {tap}: {e}"),
        }
    }
}

/// The `(interface, tap)` pairs of a prepared network, for [`teardown`].
pub fn links_of(net: &VmNetwork) -> Vec<(String, String)> {
    net.interfaces
        .iter()
        .zip(&net.nics)
        .map(|(i, n)| (i.name.clone(), n.tap.clone()))
        .collect()
}

fn make_tap(tap: &str, link: &Link) -> anyhow::Result<()> {
    netlink::create_tap(tap).with_context(|| format!("creating tap {tap}"))?;
    tc(&["qdisc", "add", "dev", &link.name, "ingress"])?;
    tc(&["qdisc", "add", "dev", tap, "ingress"])?;
    for (from, to) in [(link.name.as_str(), tap), (tap, link.name.as_str())] {
        tc(&[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ])?;
    }
    ip_link_mtu_up(tap, link.mtu)?;
    Ok(())
}

fn ip_link_mtu_up(name: &str, mtu: u32) -> anyhow::Result<()> {
    netlink::set_mtu_up(name, mtu).with_context(|| format!("setting {name} up with mtu {mtu}"))
}

fn tc(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .context("running tc (iproute2 is needed for container networking)")?;
    if !out.status.success() {
        bail!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The content of the files engines bind-mount at `/etc/hosts` and `/etc/resolv.conf`: the
/// guest cannot see host paths, so their content goes to the agent.
pub fn dns_files(spec: &serde_json::Value) -> (Option<String>, Option<String>) {
    let read = |dest: &str| -> Option<String> {
        let mounts = spec["mounts"].as_array()?;
        let m = mounts.iter().rev().find(|m| m["destination"] == dest)?;
        let source = Path::new(m["source"].as_str()?);
        // Bounded: these are small files; anything huge is not a hosts file.
        let meta = std::fs::metadata(source).ok()?;
        if !meta.is_file() || meta.len() > 1 << 20 {
            return None;
        }
        std::fs::read_to_string(source).ok()
    };
    (read("/etc/hosts"), read("/etc/resolv.conf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_from_spec() {
        let spec = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        assert!(matches!(Netns::from_spec(&spec), Netns::Host));
        let spec = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert!(matches!(Netns::from_spec(&spec), Netns::New));
        let spec =
            serde_json::json!({"linux": {"namespaces": [{"type": "network", "path": "/x"}]}});
        assert!(matches!(Netns::from_spec(&spec), Netns::Path(p) if p == Path::new("/x")));
    }

    #[test]
    fn dns_files_come_from_the_spec_mounts() {
        let dir = std::env::temp_dir().join(format!("runv-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/etc/resolv.conf", "source": dir.join("resolv.conf"), "type": "bind"},
            {"destination": "/etc/hosts", "source": dir.join("missing"), "type": "bind"},
        ]});
        let (hosts, resolv) = dns_files(&spec);
        assert_eq!(hosts, None);
        assert_eq!(resolv.as_deref(), Some("nameserver 10.0.0.1\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
