//! Boot: mounts, modules, finding the channel, serving, powering off.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use runv_proto::Mux;

use crate::log::{self, Level};
use crate::modules::Modules;
use crate::power::power_off;
use crate::reaper::Reaper;
use crate::server::Agent;

const PORT_NAME: &str = "org.runv.agent";

struct Cmdline {
    log: Level,
    reboot: bool,
    channel: Option<String>,
    /// `runv.template=1`: this VM is booted to be saved as a template.
    template: bool,
}

fn cmdline() -> Cmdline {
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut c = Cmdline {
        log: Level::Info,
        reboot: false,
        channel: None,
        template: false,
    };
    for w in text.split_whitespace() {
        if let Some(v) = w.strip_prefix("runv.log=") {
            c.log = log::parse_level(v).unwrap_or(Level::Info);
        } else if let Some(v) = w.strip_prefix("runv.exit=") {
            c.reboot = v == "reboot";
        } else if let Some(v) = w.strip_prefix("runv.channel=") {
            c.channel = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("runv.template=") {
            c.template = v == "1";
        }
    }
    c
}

fn mount_basics() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let list: [(&str, &str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", "proc", nosuid, None),
        ("sysfs", "/sys", "sysfs", nosuid, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            // No nosuid, as the kernel mounts it: containers in a user namespace get bind
            // mounts of these nodes and cannot clear a flag locked from here.
            MsFlags::empty(),
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("gid=5,mode=0620,ptmxmode=0666"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "run",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmp",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
    ];
    for (src, dst, fs, flags, data) in list {
        let _ = std::fs::create_dir_all(dst);
        if let Err(e) = mount(Some(src), dst, Some(fs), flags, data) {
            if e != nix::errno::Errno::EBUSY {
                // Logging is not up yet (no /dev/kmsg before devtmpfs): use the console.
                eprintln!("runv-agent: mount {dst}: {e}");
            }
        }
    }
}

pub fn main() -> ! {
    let t0 = Instant::now();
    mount_basics();
    let c = cmdline();
    log::init(c.log);
    crate::info!("starting runv-agent {}", env!("CARGO_PKG_VERSION"));
    let reaper = Reaper::start();
    let modules = Arc::new(Modules::load_table());
    modules.load_for_devices();
    crate::page_reporting::tune();
    if c.template {
        // Clones share what the template loaded: load now what containers load lazily.
        modules.load_for_containers();
    }
    if let Err(e) = crate::net::loopback_up() {
        crate::warn!("loopback: {e}");
    }
    // PID 1 must survive an OOM in the guest: the kernel panics when init dies.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        crate::warn!("oom_score_adj: {e}");
    }
    if let Err(e) = crate::guest_cgroup::init() {
        crate::warn!("container cgroups: {e}");
    }
    crate::debug!(
        "modules loaded after {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let channel = match find_channel(&c, Duration::from_secs(30)) {
        Ok(f) => f,
        Err(e) => {
            crate::error!("{e}");
            power_off(c.reboot);
        }
    };
    crate::info!(
        "channel {} open after {:.0} ms",
        c.channel.as_deref().unwrap_or("virtio-serial"),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let writer = match channel.try_clone() {
        Ok(w) => w,
        Err(e) => {
            crate::error!("dup channel: {e}");
            power_off(c.reboot);
        }
    };
    let splice_to = match channel.try_clone() {
        Ok(w) => w,
        Err(e) => {
            crate::error!("dup channel: {e}");
            power_off(c.reboot);
        }
    };
    let mux = Mux::new(Box::new(writer));
    let agent = Agent::new(mux, splice_to, modules, reaper, c.reboot, c.template);
    match agent.serve(channel) {
        Ok(()) => info!("host went away"),
        Err(e) => error!("{e}"),
    }
    power_off(c.reboot)
}

fn find_port() -> Option<PathBuf> {
    for d in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(d.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(PathBuf::from("/dev").join(d.file_name()));
        }
    }
    None
}

/// `runv.channel=vsock:CID:PORT`: the host listens there (the qemu driver, with vhost-vsock).
fn vsock_target(channel: &str) -> Option<(u32, u32)> {
    let (cid, port) = channel.strip_prefix("vsock:")?.split_once(':')?;
    Some((cid.parse().ok()?, port.parse().ok()?))
}

/// Connects to the host's vsock listener, retrying while the transport comes up.
fn connect_vsock(cid: u32, port: u32, timeout: Duration) -> Result<File, String> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let start = Instant::now();
    loop {
        let attempt = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .and_then(|fd| connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)).map(|()| fd));
        match attempt {
            Ok(fd) => return Ok(File::from(fd)),
            Err(e) if start.elapsed() > timeout => {
                return Err(format!("no agent channel: vsock {cid}:{port}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn find_channel(c: &Cmdline, timeout: Duration) -> Result<File, String> {
    if let Some((cid, port)) = c.channel.as_deref().and_then(vsock_target) {
        return connect_vsock(cid, port, timeout);
    }
    let start = Instant::now();
    loop {
        if let Some(dev) = find_port() {
            if dev.exists() {
                return File::options()
                    .read(true)
                    .write(true)
                    .open(&dev)
                    .map_err(|e| format!("open {}: {e}", dev.display()));
            }
        } else if let Some(dev) = &c.channel {
            if std::path::Path::new(dev).exists() {
                let f = File::options()
                    .read(true)
                    .write(true)
                    .open(dev)
                    .map_err(|e| format!("open {dev}: {e}"))?;
                make_raw(&f);
                return Ok(f);
            }
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "no agent channel: no virtio-serial port named {PORT_NAME} and no usable runv.channel= device after {}s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn make_raw(f: &File) {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    if let Ok(mut t) = tcgetattr(f.as_fd()) {
        cfmakeraw(&mut t);
        let _ = tcsetattr(f.as_fd(), SetArg::TCSANOW, &t);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_channels_name_a_cid_and_a_port() {
        assert_eq!(vsock_target("vsock:2:1234"), Some((2, 1234)));
        for other in [
            "/dev/hvc0",
            "vsock:2",
            "vsock:x:1",
            "vsock:2:99999999999",
            "",
        ] {
            assert_eq!(vsock_target(other), None, "{other}");
        }
    }
}
