//! The xl domain configuration, built from a [`VmConfig`] by pure functions.

use std::path::{Path, PathBuf};

use runv_api::VmConfig;

/// The channel name the agent's port carries (the agent finds it as /dev/hvc1, see below).
pub const AGENT_CHANNEL_NAME: &str = "org.runv.agent";
/// The guest device of the agent channel: the first xl `channel` is the second PV console.
pub const AGENT_DEVICE: &str = "/dev/hvc1";
/// Default guest memory when the config says 0.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

/// The Xen guest type (xl's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestType {
    /// PVH: no device emulation, boots the ELF vmlinux through its PVH entry (Debian's kernel
    /// has it). The default.
    #[default]
    Pvh,
    /// HVM: a fully virtualized machine with a QEMU device model (direct kernel boot).
    Hvm,
    /// Classic PV (needs a PV-capable kernel and a host Xen that still offers PV).
    Pv,
}

impl GuestType {
    /// `parameters["type"]`: `pvh` (default), `hvm` or `pv`.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim).filter(|s| !s.is_empty()) {
            None | Some("pvh") => Ok(Self::Pvh),
            Some("hvm") => Ok(Self::Hvm),
            Some("pv") => Ok(Self::Pv),
            Some(other) => Err(format!(
                "unknown Xen guest type {other:?} (use pvh, hvm or pv)"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pvh => "pvh",
            Self::Hvm => "hvm",
            Self::Pv => "pv",
        }
    }
}

/// Host-side choices that shape the config besides the [`VmConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XenOptions {
    pub guest_type: GuestType,
    /// dom0 bridge for the guest NICs (`parameters["bridge"]`).
    pub bridge: Option<String>,
    /// vif hotplug script instead of a bridge (`parameters["vif_script"]`).
    pub vif_script: Option<String>,
}

/// Names and files of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPaths {
    /// The Xen domain name: `runv-<container name>`.
    pub domain_name: String,
    /// The generated xl config.
    pub config_file: PathBuf,
    /// The host end of the agent channel (a unix socket the device model listens on).
    pub agent_socket: PathBuf,
    pub log_file: PathBuf,
}

impl DomainPaths {
    pub fn new(config: &VmConfig) -> Result<Self, String> {
        if config.state_dir.as_os_str().is_empty() {
            return Err("the VM config has no state_dir".into());
        }
        let paths = Self {
            domain_name: domain_name(&config.name),
            config_file: config.state_dir.join("domain.cfg"),
            agent_socket: config.state_dir.join("agent.sock"),
            log_file: config
                .log_file
                .clone()
                .unwrap_or_else(|| config.state_dir.join("xen.log")),
        };
        if paths.agent_socket.as_os_str().len() > SUN_PATH_MAX {
            return Err(format!(
                "the socket path {} is longer than {SUN_PATH_MAX} bytes; use a shorter state \
                 directory (--root)",
                paths.agent_socket.display()
            ));
        }
        Ok(paths)
    }
}

/// `runv-` and the container name, characters other than `[A-Za-z0-9_.-]` replaced by `_`,
/// at most 64 characters (Xen domain names are host-wide, so the prefix keeps runv's apart).
pub fn domain_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = if cleaned.is_empty() {
        "vm".to_string()
    } else {
        cleaned
    };
    format!("runv-{cleaned}").chars().take(64).collect()
}

/// A value for a double-quoted xl config string: no quotes, backslashes or control characters.
fn quoted(what: &str, value: &str) -> Result<String, String> {
    if value
        .chars()
        .any(|c| c == '"' || c == '\\' || c == '\'' || c.is_control())
    {
        return Err(format!(
            "{what} {value:?} contains a quote, backslash or control character, which the xl \
             config cannot carry"
        ));
    }
    Ok(format!("\"{value}\""))
}

/// A value inside a comma-separated device spec (`key=value,key=value`).
fn spec_value<'a>(what: &str, value: &'a str) -> Result<&'a str, String> {
    if value.contains(',') || value.contains('=') {
        Err(format!(
            "{what} {value:?} contains a comma or '=', which an xl device spec cannot carry"
        ))
    } else {
        Ok(value)
    }
}

fn utf8(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", path.display()))
}

/// The kernel command line: the console, the agent's channel, then the config's parameters.
pub fn kernel_cmdline(config: &VmConfig) -> String {
    let mut params = vec![
        // The PV console (xenconsoled), copied into the console log by `xl console`.
        "console=hvc0".to_string(),
        // The agent finds no virtio-serial port under Xen; its fallback names the device.
        format!("runv.channel={AGENT_DEVICE}"),
        "panic=-1".to_string(),
    ];
    let extra = config.kernel_params.trim();
    if !extra.is_empty() {
        params.push(extra.to_string());
    }
    params.join(" ")
}

/// The xl domain config (the file `xl create` reads).
pub fn domain_config(
    config: &VmConfig,
    options: &XenOptions,
    paths: &DomainPaths,
) -> Result<String, String> {
    if config.kernel.as_os_str().is_empty() {
        return Err("the VM config has no kernel".into());
    }
    let memory = match config.memory_mib {
        0 => DEFAULT_MEMORY_MIB,
        m => m,
    };
    let mut lines = vec![
        format!(
            "# Generated by runv's Xen driver for container {:?}; rewritten on every start.",
            config.name
        ),
        format!("name = {}", quoted("domain name", &paths.domain_name)?),
        format!("type = \"{}\"", options.guest_type.as_str()),
        format!("kernel = {}", quoted("kernel", utf8(&config.kernel)?)?),
    ];
    if let Some(initrd) = &config.initrd {
        lines.push(format!("ramdisk = {}", quoted("initrd", utf8(initrd)?)?));
    }
    lines.extend([
        format!(
            "cmdline = {}",
            quoted("kernel command line", &kernel_cmdline(config))?
        ),
        format!("memory = {memory}"),
        format!("maxmem = {memory}"),
        format!("vcpus = {}", config.vcpus.max(1)),
        // Every way the guest can end ends the domain: the driver reports how.
        "on_poweroff = \"destroy\"".to_string(),
        "on_reboot = \"destroy\"".to_string(),
        "on_crash = \"destroy\"".to_string(),
    ]);

    let socket = spec_value("agent socket path", utf8(&paths.agent_socket)?)?;
    lines.push(format!(
        "channel = [ {} ]",
        quoted(
            "channel",
            &format!("name={AGENT_CHANNEL_NAME},connection=socket,path={socket}")
        )?
    ));

    if !config.shared_dirs.is_empty() {
        let mut items = Vec::new();
        for dir in &config.shared_dirs {
            if dir.tag.is_empty() {
                return Err(format!(
                    "shared directory {} has no tag",
                    dir.host_path.display()
                ));
            }
            let spec = format!(
                "tag={},security_model=none,path={}",
                spec_value("9p tag", &dir.tag)?,
                spec_value("shared directory", utf8(&dir.host_path)?)?
            );
            items.push(quoted("p9", &spec)?);
        }
        lines.push(format!("p9 = [ {} ]", items.join(", ")));
    }

    if !config.block_devices.is_empty() {
        if config.block_devices.len() > 26 {
            return Err("more than 26 block devices".into());
        }
        let mut items = Vec::new();
        for (i, disk) in config.block_devices.iter().enumerate() {
            let access = if disk.readonly { "ro" } else { "rw" };
            // target= must come last: xl takes the rest of the spec as the path.
            let spec = format!(
                "format=raw,vdev=xvd{},access={access},target={}",
                char::from(b'a' + i as u8),
                utf8(&disk.host_path)?
            );
            items.push(quoted("disk", &spec)?);
        }
        lines.push(format!("disk = [ {} ]", items.join(", ")));
    }

    if !config.network_interfaces.is_empty() {
        let attach = match (&options.bridge, &options.vif_script) {
            (Some(bridge), _) => format!("bridge={}", spec_value("bridge", bridge)?),
            (None, Some(script)) => format!("script={}", spec_value("vif script", script)?),
            (None, None) => {
                return Err(format!(
                    "the Xen driver cannot use the tap device {}: Xen's netback makes its own \
                     vif device in dom0's root network namespace. Set the hypervisor parameter \
                     bridge=<dom0 bridge> (or vif_script=<script>) to attach the guest NIC",
                    config.network_interfaces[0].tap
                ));
            }
        };
        let mut items = Vec::new();
        for nic in &config.network_interfaces {
            let mut spec = String::new();
            if !nic.mac.is_empty() {
                spec.push_str(&format!("mac={},", spec_value("MAC", &nic.mac)?));
            }
            spec.push_str(&attach);
            if nic.mtu > 0 {
                spec.push_str(&format!(",mtu={}", nic.mtu));
            }
            items.push(quoted("vif", &spec)?);
        }
        lines.push(format!("vif = [ {} ]", items.join(", ")));
    }
    lines.push(String::new());
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_api::{BlockDevice, NetInterface, SharedDir};

    fn config() -> VmConfig {
        VmConfig {
            version: 1,
            name: "c1".into(),
            vcpus: 2,
            memory_mib: 128,
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd.img".into()),
            kernel_params: "quiet".into(),
            state_dir: "/run/runv/c1/vm".into(),
            console_log: "/run/runv/c1/console.log".into(),
            ..Default::default()
        }
    }

    fn generate(config: &VmConfig, options: &XenOptions) -> Result<String, String> {
        domain_config(config, options, &DomainPaths::new(config).unwrap())
    }

    #[test]
    fn pvh_basics() {
        let text = generate(&config(), &XenOptions::default()).unwrap();
        let expected = [
            "name = \"runv-c1\"",
            "type = \"pvh\"",
            "kernel = \"/k/vmlinux\"",
            "ramdisk = \"/k/initrd.img\"",
            "cmdline = \"console=hvc0 runv.channel=/dev/hvc1 panic=-1 quiet\"",
            "memory = 128",
            "maxmem = 128",
            "vcpus = 2",
            "on_poweroff = \"destroy\"",
            "on_reboot = \"destroy\"",
            "on_crash = \"destroy\"",
            "channel = [ \"name=org.runv.agent,connection=socket,path=/run/runv/c1/vm/agent.sock\" ]",
        ];
        for line in expected {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        for absent in ["p9 =", "disk =", "vif ="] {
            assert!(!text.lines().any(|l| l.starts_with(absent)), "{text}");
        }
    }

    #[test]
    fn devices() {
        let mut cfg = config();
        cfg.shared_dirs.push(SharedDir {
            tag: "rootfs".into(),
            host_path: "/b/rootfs".into(),
            readonly: false,
        });
        cfg.block_devices = vec![
            BlockDevice {
                id: "rootfs".into(),
                host_path: "/dev/mapper/thin,c1".into(),
                readonly: true,
            },
            BlockDevice {
                id: "data".into(),
                host_path: "/img/d.raw".into(),
                readonly: false,
            },
        ];
        cfg.network_interfaces.push(NetInterface {
            tap: "rvtap0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1400,
        });
        let options = XenOptions {
            guest_type: GuestType::Hvm,
            bridge: Some("xenbr0".into()),
            vif_script: None,
        };
        let text = generate(&cfg, &options).unwrap();
        assert!(text.contains("type = \"hvm\""));
        assert!(
            text.contains("p9 = [ \"tag=rootfs,security_model=none,path=/b/rootfs\" ]"),
            "{text}"
        );
        assert!(text.contains(
            "disk = [ \"format=raw,vdev=xvda,access=ro,target=/dev/mapper/thin,c1\", \
             \"format=raw,vdev=xvdb,access=rw,target=/img/d.raw\" ]"
        ));
        assert!(text.contains("vif = [ \"mac=02:00:00:00:00:01,bridge=xenbr0,mtu=1400\" ]"));

        let script = XenOptions {
            bridge: None,
            vif_script: Some("vif-route".into()),
            ..options
        };
        assert!(
            generate(&cfg, &script)
                .unwrap()
                .contains("vif = [ \"mac=02:00:00:00:00:01,script=vif-route,mtu=1400\" ]")
        );
        let err = generate(&cfg, &XenOptions::default()).unwrap_err();
        assert!(err.contains("bridge=") && err.contains("rvtap0"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        let mut cfg = config();
        cfg.kernel_params = "init=\"/x\"".into();
        assert!(generate(&cfg, &XenOptions::default()).is_err());
        let mut cfg = config();
        cfg.shared_dirs.push(SharedDir {
            tag: "v".into(),
            host_path: "/a,b".into(),
            readonly: false,
        });
        assert!(
            generate(&cfg, &XenOptions::default())
                .unwrap_err()
                .contains("comma")
        );
        let mut cfg = config();
        cfg.kernel = PathBuf::new();
        assert!(generate(&cfg, &XenOptions::default()).is_err());
        let mut cfg = config();
        cfg.state_dir = PathBuf::from(format!("/{}", "s".repeat(110)));
        assert!(DomainPaths::new(&cfg).unwrap_err().contains("longer than"));
    }

    #[test]
    fn defaults_and_names() {
        let mut cfg = config();
        cfg.memory_mib = 0;
        cfg.vcpus = 0;
        cfg.initrd = None;
        let text = generate(&cfg, &XenOptions::default()).unwrap();
        assert!(text.contains("memory = 256") && text.contains("vcpus = 1"));
        assert!(!text.contains("ramdisk"));
        assert_eq!(domain_name("a b/c"), "runv-a_b_c");
        assert_eq!(domain_name(""), "runv-vm");
        assert_eq!(domain_name(&"x".repeat(100)).len(), 64);
        let p = DomainPaths::new(&config()).unwrap();
        assert_eq!(p.config_file, Path::new("/run/runv/c1/vm/domain.cfg"));
        assert_eq!(p.log_file, Path::new("/run/runv/c1/vm/xen.log"));
    }

    #[test]
    fn guest_types() {
        assert_eq!(GuestType::parse(None).unwrap(), GuestType::Pvh);
        assert_eq!(GuestType::parse(Some("hvm")).unwrap(), GuestType::Hvm);
        assert_eq!(GuestType::parse(Some(" pv ")).unwrap(), GuestType::Pv);
        assert!(GuestType::parse(Some("kvm")).is_err());
    }
}
