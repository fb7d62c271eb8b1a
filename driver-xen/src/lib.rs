//! The Xen hypervisor driver for runv: every container in its own Xen domain, through the xl
//! toolstack.
//!
//! UNTESTED ON A XEN HOST: the machines runv is developed and tested on have no Xen. The
//! generated domain config and the argument handling are unit-tested; the lifecycle below
//! follows xl's documented behaviour.
//!
//! * Binary: `parameters["xl"]` (a path or a name in `PATH`), else `$RUNV_XL`, else `xl` from
//!   `PATH` (Debian: the xen-utils packages). The host must be a Xen dom0:
//!   `/proc/xen/capabilities` says `control_d`.
//! * Domain: `runv-<container id>`, `type` from `parameters["type"]` (`pvh`, the default, boots
//!   runv's ELF vmlinux through its PVH entry; `hvm`; `pv`), kernel/ramdisk/cmdline, memory,
//!   vcpus; `on_poweroff`/`on_reboot`/`on_crash` = `destroy`. The config is written to
//!   `<state_dir>/domain.cfg`.
//! * Kernel console: `console=hvc0` (the PV console), copied into the console log by
//!   `xl console -t pv`.
//! * Agent channel: `channel = [ "name=org.runv.agent,connection=socket,path=<state>/agent.sock" ]`;
//!   the device model listens there, the driver connects and hands the stream over. The guest
//!   sees the channel as the second PV console, /dev/hvc1, which the agent opens because of
//!   `runv.channel=/dev/hvc1`.
//! * Shared directories: `p9 = [ "tag=..,security_model=none,path=.." ]` (Xen 9pfs; xl has no
//!   read-only 9p export). Block devices: `disk = [ "format=raw,vdev=xvdX,access=ro|rw,
//!   target=.." ]`. NICs: Xen's netback makes its own vif in dom0, so the core's tap device cannot
//!   be used: `parameters["bridge"]` (or `vif_script`) says where the vif goes; without either,
//!   a VM with NICs is refused with that explanation.
//! * Guest side (not in runv's guest image yet): the agent mounts shared directories with
//!   `trans=virtio` and finds block devices by virtio serial; under Xen it needs `trans=xen`
//!   (module 9pnet_xen) and xen-blkfront disks. Block rootfs is therefore not offered.
//! * `xl create -F -p`, then `xl unpause`; `xl pause/unpause`; stop is `xl destroy`.

pub mod domcfg;
pub mod vm;

use std::env;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use runv_api::{Capabilities, Hypervisor, PluginInfo, PluginKind, Vm, VmConfig, export_hypervisor};

pub use domcfg::{DomainPaths, GuestType, XenOptions, domain_config, domain_name, kernel_cmdline};
pub use vm::{LOG_PREFIX, StartSpec, XenVm};

pub const XL_BINARY: &str = "xl";
/// Environment variable naming the xl binary (used by `probe`, which has no VM config).
pub const XL_ENV: &str = "RUNV_XL";
const CAPABILITIES_FILE: &str = "/proc/xen/capabilities";
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// What this driver can do.
pub const CAPABILITIES: Capabilities = Capabilities::SHARED_DIR_ROOTFS.union(Capabilities::PAUSE);

pub use runv_api::find_in_path;

/// The xl binary: `parameter`, else `$RUNV_XL`, else `xl` from `PATH`.
pub fn xl_binary(parameter: Option<&str>) -> Result<PathBuf, String> {
    runv_api::find_program(parameter, Some(XL_ENV), XL_BINARY, "xl", || {
        "xl not found (install xen-utils, e.g. xen-utils-4.17 on Debian 12)".into()
    })
}

/// Why this host is not a Xen dom0, from the contents of /proc/xen/capabilities.
pub fn dom0_problem(capabilities: Result<String, String>) -> Option<String> {
    match capabilities {
        Ok(text) if text.split_whitespace().any(|c| c == "control_d") => None,
        Ok(_) => Some(format!(
            "no Xen hypervisor running ({CAPABILITIES_FILE} missing or no control_d): this \
             host is a Xen guest, not dom0"
        )),
        Err(e) => Some(format!(
            "no Xen hypervisor running ({CAPABILITIES_FILE} missing or no control_d: {e})"
        )),
    }
}

/// Whether this host can run Xen domains; every reason otherwise.
pub fn probe_host() -> Result<(), String> {
    let mut reasons = Vec::new();
    let capabilities = fs::read_to_string(CAPABILITIES_FILE).map_err(|e| e.to_string());
    if let Some(problem) = dom0_problem(capabilities) {
        reasons.push(problem);
    }
    if let Err(e) = xl_binary(None) {
        reasons.push(e);
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

/// The host-side options from the config's parameters.
pub fn options(config: &VmConfig) -> Result<XenOptions, String> {
    let param = |k: &str| {
        config
            .parameters
            .get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    Ok(XenOptions {
        guest_type: GuestType::parse(param("type").as_deref())?,
        bridge: param("bridge"),
        vif_script: param("vif_script"),
    })
}

/// The Xen driver.
#[derive(Default)]
pub struct XenDriver;

impl XenDriver {
    /// Writes the domain config and starts the domain (the concrete type; the plugin interface
    /// returns it boxed).
    pub fn start(&self, config: &VmConfig) -> Result<XenVm, String> {
        let param = |k: &str| config.parameters.get(k).map(String::as_str);
        let xl = xl_binary(param("xl"))?;
        let start_timeout = match param("start_timeout_ms") {
            None => DEFAULT_START_TIMEOUT,
            Some(ms) => Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("invalid start_timeout_ms {ms:?}"))?,
            ),
        };
        if config.console_log.as_os_str().is_empty() {
            return Err("the VM config has no console_log".into());
        }
        let options = options(config)?;
        let paths = DomainPaths::new(config)?;
        let text = domain_config(config, &options, &paths)?;
        fs::create_dir_all(&config.state_dir)
            .map_err(|e| format!("creating {}: {e}", config.state_dir.display()))?;
        fs::write(&paths.config_file, &text)
            .map_err(|e| format!("writing {}: {e}", paths.config_file.display()))?;
        for dir in config.shared_dirs.iter().filter(|d| d.readonly) {
            vm::log_line(
                &paths.log_file,
                &format!(
                    "warning: xl has no read-only 9p export: {} (tag {}) is writable from the \
                     host side; only the guest's mount is read-only",
                    dir.host_path.display(),
                    dir.tag
                ),
            );
        }
        vm::log_line(
            &paths.log_file,
            &format!(
                "starting domain {} with {} create -F -p {}",
                paths.domain_name,
                xl.display(),
                paths.config_file.display()
            ),
        );
        XenVm::start(StartSpec {
            xl,
            paths,
            console_log: config.console_log.clone(),
            guest_memory_bytes: config.memory_mib.max(1) * 1024 * 1024,
            start_timeout,
        })
    }
}

impl Hypervisor for XenDriver {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Hypervisor,
            name: "xen".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "Xen domains through xl (PVH by default; untested without a Xen host)"
                .into(),
            capabilities: CAPABILITIES,
        }
    }

    fn probe(&self) -> Result<(), String> {
        probe_host()
    }

    fn start_vm(&self, config: VmConfig) -> Result<Box<dyn Vm>, String> {
        Ok(Box::new(self.start(&config)?))
    }
}

export_hypervisor!(|| Ok(XenDriver));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dom0_reasons() {
        assert_eq!(dom0_problem(Ok("control_d\n".into())), None);
        let r = dom0_problem(Ok(String::new())).unwrap();
        assert!(r.starts_with("no Xen hypervisor running"), "{r}");
        let r = dom0_problem(Err("No such file or directory (os error 2)".into())).unwrap();
        assert!(
            r.contains("/proc/xen/capabilities missing or no control_d"),
            "{r}"
        );
    }

    #[test]
    fn binary_lookup() {
        assert!(
            xl_binary(Some("/nonexistent/xl"))
                .unwrap_err()
                .contains("/nonexistent/xl")
        );
        assert!(
            xl_binary(Some("no-such-xl"))
                .unwrap_err()
                .contains("not found in PATH")
        );
        assert!(xl_binary(Some("sh")).unwrap().is_absolute());
    }

    #[test]
    fn parameters() {
        let mut cfg = VmConfig::default();
        assert_eq!(options(&cfg).unwrap(), XenOptions::default());
        cfg.parameters.insert("type".into(), "hvm".into());
        cfg.parameters.insert("bridge".into(), " xenbr0 ".into());
        cfg.parameters.insert("vif_script".into(), "".into());
        let o = options(&cfg).unwrap();
        assert_eq!(o.guest_type, GuestType::Hvm);
        assert_eq!(o.bridge.as_deref(), Some("xenbr0"));
        assert_eq!(o.vif_script, None);
        cfg.parameters.insert("type".into(), "kvm".into());
        assert!(options(&cfg).is_err());
    }

    #[test]
    fn start_refuses_bad_configs_before_running_xl() {
        let dir = std::env::temp_dir().join(format!("runv-xen-start-{}", std::process::id()));
        let mut cfg = VmConfig {
            name: "c1".into(),
            kernel: "/k/vmlinux".into(),
            state_dir: dir.join("state"),
            console_log: dir.join("console.log"),
            ..Default::default()
        };
        // `true` stands in for xl: the config is refused before xl runs.
        cfg.parameters.insert("xl".into(), "true".into());
        cfg.parameters
            .insert("start_timeout_ms".into(), "soon".into());
        assert!(
            XenDriver
                .start(&cfg)
                .map(drop)
                .unwrap_err()
                .contains("start_timeout_ms")
        );
        cfg.parameters.remove("start_timeout_ms");
        cfg.network_interfaces.push(runv_api::NetInterface {
            tap: "rvtap0".into(),
            ..Default::default()
        });
        assert!(
            XenDriver
                .start(&cfg)
                .map(drop)
                .unwrap_err()
                .contains("bridge=")
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn capabilities_are_honest() {
        let caps = XenDriver.info().capabilities;
        assert!(caps.contains(Capabilities::PAUSE | Capabilities::SHARED_DIR_ROOTFS));
        assert!(!caps.contains(Capabilities::BLOCK_ROOTFS));
    }
}
