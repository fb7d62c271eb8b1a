//! The QEMU hypervisor driver for runv: every container in its own `qemu-system-x86_64`.
//!
//! * Machine: `microvm` with ACPI by default (fastest boot measured here; Debian's kernel finds
//!   virtio-mmio devices only through ACPI), `pc` with `parameters["machine"] = "pc"`.
//! * Accelerator: KVM when the CPU has vmx/svm and /dev/kvm opens read-write, TCG otherwise
//!   ([`choose_accel`]); `parameters["accel"]` = `kvm` | `tcg` | `auto` forces it.
//! * `parameters["qemu"]`: the qemu binary (default: `qemu-system-x86_64` from `PATH`).
//! * `parameters["start_timeout_ms"]`: how long `start_vm` waits for qemu (default 30000).
//! * `parameters["tb_size"]`: TCG's translation cache in MiB (default 32).
//! * `parameters["jail"]` = `on` (default) | `off`: qemu in its own mount namespace with only
//!   its VM's files, as an unprivileged user with only the capabilities its devices need
//!   (`jail.rs`); `parameters["uid"]`: that user (default: one of its own per VM).
//! * Agent channel: with KVM where the host has `/dev/vhost-vsock`, a vsock the agent connects
//!   to from the guest ([`vsock`]); else a virtio-serial port named `org.runv.agent`, backed by
//!   a unix socket in the state dir that the driver connects to and hands over.
//!   `parameters["channel"]` = `auto` (default) | `vsock` | `serial` forces it (templates and
//!   clones always use virtio-serial).
//! * QMP on `<state_dir>/qmp.sock`, for pause/resume/quit; qemu's stderr and the driver's own
//!   diagnostics (lines starting with `runv-driver-qemu:`) go to the log file.

mod cmdline;
mod jail;
mod qmp;
mod tap;
mod template;
mod vm;
pub mod vsock;

use std::env;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use runv_api::{Capabilities, Hypervisor, PluginInfo, PluginKind, Vm, VmConfig, export_hypervisor};

pub use cmdline::{
    AGENT_PORT_NAME, Accel, AccelChoice, HostFacts, Machine, QemuOptions, VmPaths, build_args,
    choose_accel, cpu_mhz_khz, cpuinfo_has_virt_flag, escape, kernel_cmdline,
};
pub use qmp::Qmp;
pub use vm::{LOG_PREFIX, QemuVm, last_qemu_line};

/// The qemu binary looked up in `PATH` when `parameters["qemu"]` is not set.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

pub use runv_api::find_in_path;

/// The qemu binary for a VM: `parameters["qemu"]` or `qemu-system-x86_64` from `PATH`.
pub fn qemu_binary(parameter: Option<&str>) -> Result<PathBuf, String> {
    runv_api::find_program(parameter, None, QEMU_BINARY, "qemu", || {
        format!("{QEMU_BINARY} not found in PATH (install the qemu-system-x86 package)")
    })
}

/// Accelerators `qemu -accel help` lists (Debian ships TCG as a loadable module; without it,
/// `tcg` is missing from the list).
pub fn listed_accelerators(qemu: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(qemu)
        .args(["-accel", "help"])
        .output()
        .map_err(|e| format!("running {} -accel help: {e}", qemu.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} -accel help failed: {}",
            qemu.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1) // "Accelerators supported in QEMU binary:"
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Whether this host can run VMs with the default settings; the reason otherwise.
pub fn probe_host() -> Result<(), String> {
    let qemu = qemu_binary(None)?;
    let accels = listed_accelerators(&qemu)?;
    let choice = choose_accel(None, &HostFacts::read())?;
    if !accels.iter().any(|a| a == choice.accel.as_str()) {
        return Err(match choice.accel {
            Accel::Tcg => format!(
                "{} lacks the TCG accelerator, needed because {} (install the package with \
                 qemu's accel-tcg-x86_64.so module, e.g. qemu-system-x86 on Debian)",
                qemu.display(),
                choice
                    .fallback_reason
                    .as_deref()
                    .unwrap_or("KVM is not usable")
                    .trim_end_matches("; using TCG (slow)")
            ),
            Accel::Kvm => format!("{} was built without KVM support", qemu.display()),
        });
    }
    Ok(())
}

/// The QEMU driver.
pub struct QemuDriver {
    host: HostFacts,
}

impl QemuDriver {
    pub fn new() -> Self {
        Self {
            host: HostFacts::read(),
        }
    }

    /// Starts a VM and returns the concrete type (the plugin interface returns it boxed).
    pub fn start(&self, config: &VmConfig) -> Result<QemuVm, String> {
        self.start_or_restore(config, None)
    }

    /// Starts a VM from the template in `template_dir`, with `config`'s host-side settings
    /// (the shape must be the template's; the core keys templates by it).
    pub fn restore(&self, config: &VmConfig, template_dir: &Path) -> Result<QemuVm, String> {
        let vm = self.start_or_restore(config, Some(template_dir))?;
        // On error `vm` is dropped, which kills and reaps qemu.
        template::load(&vm, template_dir)?;
        Ok(vm)
    }

    fn start_or_restore(
        &self,
        config: &VmConfig,
        template_dir: Option<&Path>,
    ) -> Result<QemuVm, String> {
        let param = |k: &str| config.parameters.get(k).map(String::as_str);
        let qemu = qemu_binary(param("qemu"))?;
        let choice = choose_accel(param("accel"), &self.host)?;
        let machine = Machine::parse(param("machine"))?;
        let start_timeout = match param("start_timeout_ms") {
            None => DEFAULT_START_TIMEOUT,
            Some(ms) => Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("invalid start_timeout_ms {ms:?}"))?,
            ),
        };
        let paths = VmPaths::new(config)?;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| format!("creating {}: {e}", config.state_dir.display()))?;
        let taps = config
            .network_interfaces
            .iter()
            .filter(|nic| !nic.tap.is_empty())
            .map(|nic| tap::open(&nic.tap))
            .collect::<Result<Vec<_>, _>>()?;
        let mut options = QemuOptions {
            accel: choice.accel,
            machine,
            tsc_khz: self.host.tsc_khz,
            tap_fds: taps.iter().map(AsRawFd::as_raw_fd).collect(),
            tb_size_mib: match param("tb_size") {
                None => cmdline::DEFAULT_TB_SIZE_MIB,
                Some(mib) => mib
                    .parse()
                    .ok()
                    .filter(|m| (1..=4096).contains(m))
                    .ok_or_else(|| format!("invalid tb_size {mib:?} (MiB, 1 to 4096)"))?,
            },
            agent_vsock: None,
        };
        let templating = template_dir.is_some() || config.memory_file.is_some();
        let vsock_wanted = match param("channel") {
            Some("serial") => false,
            Some("vsock") if templating => {
                return Err("channel=vsock: templates and clones use virtio-serial".into());
            }
            Some("vsock") if !vsock::available() => {
                return Err(format!("channel=vsock: this host has no {}", vsock::DEVICE));
            }
            Some("vsock") => true,
            // vhost needs KVM's ioeventfds; templates migrate no vhost state.
            None | Some("auto") => vsock::available() && choice.accel == Accel::Kvm && !templating,
            Some(other) => {
                return Err(format!("invalid channel {other:?} (auto, vsock or serial)"));
            }
        };
        let mut fds: Vec<OwnedFd> = taps;
        let agent_vsock = if vsock_wanted {
            let (v, vhost) = vsock::Vsock::new(std::process::id())?;
            options.agent_vsock = Some(cmdline::AgentVsock {
                cid: v.cid,
                vhost_fd: vhost.as_raw_fd(),
                port: v.port,
            });
            fds.push(vhost);
            Some(v)
        } else {
            None
        };
        let jail = match param("jail") {
            Some("off") => None,
            None | Some("on") => Some(self.jail(config, template_dir)?),
            Some(other) => return Err(format!("invalid jail {other:?} (on or off)")),
        };
        let qemu_paths = match jail {
            Some(_) => paths.seen_from(Path::new(jail::STATE_DIR)),
            None => paths.clone(),
        };
        let mut args = build_args(config, &options, &qemu_paths)?;
        let memory_mib = if config.memory_mib == 0 {
            cmdline::DEFAULT_MEMORY_MIB
        } else {
            config.memory_mib
        };
        match (template_dir, &config.memory_file) {
            (Some(dir), _) => template::memory_args(
                &mut args,
                &dir.join(runv_api::TEMPLATE_MEMORY_FILE),
                memory_mib,
                false,
                true,
            )?,
            (None, Some(file)) => template::memory_args(&mut args, file, memory_mib, true, false)?,
            (None, None) => {}
        }

        if let Some(reason) = &choice.fallback_reason {
            vm::log_line(&paths.log_file, &format!("warning: {reason}"));
        }
        vm::log_line(
            &paths.log_file,
            &format!(
                "starting {} {}",
                qemu.display(),
                args.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        QemuVm::start(
            &qemu,
            &args,
            jail,
            fds,
            agent_vsock,
            paths,
            config.console_log.clone(),
            config.memory_mib.max(1) * 1024 * 1024,
            start_timeout,
            template_dir.is_some(),
        )
    }

    /// qemu's jail (`jail.rs`): its root is mounted on `<state_dir>/jail`, in qemu's own
    /// mount namespace. The console log is made here (root's alone) so that it can be bound.
    fn jail(&self, config: &VmConfig, template_dir: Option<&Path>) -> Result<jail::Jail, String> {
        // The real path: the state dir may be a /proc/<pid>/fd alias, which names a mount of
        // this namespace, not of qemu's.
        let root = std::fs::canonicalize(&config.state_dir)
            .map_err(|e| format!("resolving {}: {e}", config.state_dir.display()))?
            .join("jail");
        match std::fs::DirBuilder::new().mode(0o700).create(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("creating {}: {e}", root.display())),
        }
        if !config.console_log.as_os_str().is_empty() {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&config.console_log)
                .map_err(|e| format!("creating {}: {e}", config.console_log.display()))?;
        }
        let id = match config.parameters.get("uid") {
            Some(uid) => uid
                .parse()
                .map_err(|_| format!("invalid uid {uid:?} (a number)"))?,
            None => jail::ID_BASE + std::process::id(),
        };
        jail::Jail::new(config, &root, template_dir.as_slice(), (id, id))
    }
}

impl Default for QemuDriver {
    fn default() -> Self {
        Self::new()
    }
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,./:@%+".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

impl Hypervisor for QemuDriver {
    fn info(&self) -> PluginInfo {
        let accel = match choose_accel(None, &self.host) {
            Ok(AccelChoice {
                accel: Accel::Kvm, ..
            }) => "KVM".to_string(),
            Ok(AccelChoice {
                fallback_reason: Some(reason),
                ..
            }) => format!("TCG: {}", reason.trim_end_matches("; using TCG (slow)")),
            _ => "TCG".to_string(),
        };
        PluginInfo {
            kind: PluginKind::Hypervisor,
            name: "qemu".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: format!("QEMU microvm ({accel})").into(),
            capabilities: Capabilities::SHARED_DIR_ROOTFS
                | Capabilities::BLOCK_ROOTFS
                | Capabilities::PAUSE
                | Capabilities::SNAPSHOT
                | if vsock::available() {
                    Capabilities::VSOCK
                } else {
                    Capabilities::NONE
                },
        }
    }

    fn probe(&self) -> Result<(), String> {
        probe_host()
    }

    fn start_vm(&self, config: VmConfig) -> Result<Box<dyn Vm>, String> {
        Ok(Box::new(self.start(&config)?))
    }

    fn restore_vm(&self, config: VmConfig, template_dir: &Path) -> Result<Box<dyn Vm>, String> {
        Ok(Box::new(self.restore(&config, template_dir)?))
    }
}

export_hypervisor!(|| Ok(QemuDriver::new()));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("-M"), "-M");
        assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn binary_lookup() {
        let err = qemu_binary(Some("/nonexistent/qemu")).unwrap_err();
        assert!(err.contains("/nonexistent/qemu"), "{err}");
        let err = qemu_binary(Some("no-such-qemu-binary")).unwrap_err();
        assert!(err.contains("not found in PATH"), "{err}");
        // `sh` is everywhere; a bare name is looked up in PATH.
        assert!(qemu_binary(Some("sh")).unwrap().is_absolute());
    }
}
