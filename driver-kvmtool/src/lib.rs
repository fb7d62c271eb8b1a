//! The kvmtool hypervisor driver for runv: every container in its own `lkvm run`.
//!
//! * Binary: `parameters["kvmtool"]` (a path, or a name looked up in `PATH`), else
//!   `$RUNV_KVMTOOL`, else `lkvm` from `PATH`. kvmtool is not packaged by Debian 12; build it
//!   from source (see the README).
//! * KVM only: kvmtool has no emulation fallback. [`probe`](KvmtoolDriver) says why it cannot
//!   run when `/dev/kvm` does not open or the CPU lacks vmx/svm (a `/dev/kvm` such as the one of
//!   the `kvm_pvm` module opens but cannot boot a stock kernel).
//! * Kernel: lkvm boots a bzImage; when the config names an ELF `vmlinux`, the `vmlinuz` next
//!   to it is used, and the log says so.
//! * Terminals: `--console serial`. ttyS0 (the kernel console, `console=ttyS0` is added by
//!   lkvm) is lkvm's stdin/stdout, a pty whose output the driver appends to the console log.
//!   ttyS1 carries the agent channel: `--tty 1` gives it a pty of its own, the guest agent finds
//!   it through `runv.channel=/dev/ttyS1`, and the driver relays it to a socketpair whose other
//!   end is the agent channel (see [`vm`] for why a relay: lkvm's Ctrl-A escape).
//! * The guest ends the VM by rebooting (`runv.exit=reboot`): x86 kvmtool guests have no ACPI
//!   power-off.
//! * Shared directories: `--9p PATH,TAG`. kvmtool has no read-only 9p export: a read-only
//!   share is writable on the host side and only the guest's mount is read-only (the log says
//!   so). Block devices: `-d PATH[,ro]`; kvmtool derives a disk's serial from the host file
//!   (device, rdev and inode numbers) and cannot be given one, and the agent finds a disk by
//!   serial, so the driver computes each serial as kvmtool does and passes
//!   `runv.disk.<id>=<serial>` on the kernel command line, which the agent maps back (block
//!   rootfs, e.g. device-mapper snapshots). Taps: `-n mode=tap,tapif=NAME,guest_mac=MAC`.
//! * stop/pause/resume: `lkvm stop|pause|resume --name NAME`, with `HOME` set to the VM's state
//!   dir (lkvm's control socket is `$HOME/.lkvm/NAME.sock`), pause and resume confirmed with
//!   `lkvm list`.
//! * `parameters["start_timeout_ms"]`: how long `start_vm` waits for lkvm (default 30000).

pub mod cmdline;
pub mod vm;

use std::env;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use runv_api::{Capabilities, Hypervisor, PluginInfo, PluginKind, Vm, VmConfig, export_hypervisor};

pub use cmdline::{VmPaths, build_args, disk_serials, kernel_cmdline, resolve_kernel};
pub use vm::{KvmtoolVm, LOG_PREFIX, StartSpec, escape_term_input};

/// The kvmtool binary looked up in `PATH` by default.
pub const LKVM_BINARY: &str = "lkvm";
/// Environment variable naming the kvmtool binary (used by `probe`, which has no VM config).
pub const KVMTOOL_ENV: &str = "RUNV_KVMTOOL";
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// What this driver can do.
pub const CAPABILITIES: Capabilities = Capabilities::SHARED_DIR_ROOTFS
    .union(Capabilities::BLOCK_ROOTFS)
    .union(Capabilities::PAUSE);

pub use runv_api::find_in_path;

/// The lkvm binary: `parameter` (`parameters["kvmtool"]`), else `$RUNV_KVMTOOL`, else `lkvm`
/// from `PATH`.
pub fn lkvm_binary(parameter: Option<&str>) -> Result<PathBuf, String> {
    runv_api::find_program(parameter, Some(KVMTOOL_ENV), LKVM_BINARY, "kvmtool", || {
        format!(
            "lkvm not found in PATH (kvmtool is not packaged by Debian 12: build it from \
                 source, see the README; or name the binary with ${KVMTOOL_ENV} or the \
                 kvmtool=PATH hypervisor parameter)"
        )
    })
}

pub use runv_api::cpuinfo_has_virt_flag;

/// Why KVM cannot run kvmtool guests here, if it cannot. `kvm_device` is the result of opening
/// /dev/kvm read-write.
pub fn kvm_problem(kvm_device: Result<(), String>, hw_virt_flag: bool) -> Option<String> {
    match (kvm_device, hw_virt_flag) {
        (Ok(()), true) => None,
        (Err(e), _) => Some(format!(
            "KVM is not usable ({e}) and kvmtool has no emulation fallback"
        )),
        (Ok(()), false) => Some(
            "KVM is not usable: the CPU has no vmx/svm flag, so this /dev/kvm (e.g. the \
             kvm_pvm module's) cannot boot a stock kernel, and kvmtool has no emulation fallback"
                .to_string(),
        ),
    }
}

/// Whether this host can run kvmtool VMs with the default settings; every reason otherwise.
pub fn probe_host() -> Result<(), String> {
    let mut reasons = Vec::new();
    if let Err(e) = lkvm_binary(None) {
        reasons.push(e);
    }
    let kvm_device = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"));
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(problem) = kvm_problem(kvm_device, cpuinfo_has_virt_flag(&cpuinfo)) {
        reasons.push(problem);
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(reasons.join("; "))
    }
}

/// The kvmtool driver.
#[derive(Default)]
pub struct KvmtoolDriver;

impl KvmtoolDriver {
    /// Starts a VM and returns the concrete type (the plugin interface returns it boxed).
    pub fn start(&self, config: &VmConfig) -> Result<KvmtoolVm, String> {
        let param = |k: &str| config.parameters.get(k).map(String::as_str);
        let lkvm = lkvm_binary(param("kvmtool"))?;
        let start_timeout = match param("start_timeout_ms") {
            None => DEFAULT_START_TIMEOUT,
            Some(ms) => Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("invalid start_timeout_ms {ms:?}"))?,
            ),
        };
        let paths = VmPaths::new(config)?;
        fs::create_dir_all(&config.state_dir)
            .map_err(|e| format!("creating {}: {e}", config.state_dir.display()))?;
        if config.console_log.as_os_str().is_empty() {
            return Err("the VM config has no console_log".into());
        }
        let (kernel, note) = resolve_kernel(&config.kernel)?;
        let serials = disk_serials(config)?;
        let args = build_args(config, &kernel, &paths, &serials)?;
        let log = &paths.log_file;
        if let Some(note) = note {
            vm::log_line(log, &note);
        }
        for dir in config.shared_dirs.iter().filter(|d| d.readonly) {
            vm::log_line(
                log,
                &format!(
                    "warning: kvmtool has no read-only 9p export: {} (tag {}) is writable from \
                     the host side; only the guest's mount is read-only",
                    dir.host_path.display(),
                    dir.tag
                ),
            );
        }
        for (disk, (id, serial)) in config.block_devices.iter().zip(&serials) {
            vm::log_line(
                log,
                &format!(
                    "note: kvmtool cannot set a disk serial: {} ({id}) gets {serial}, from its \
                     device and inode numbers; the guest learns it from runv.disk.{id}",
                    disk.host_path.display(),
                ),
            );
        }
        for nic in config.network_interfaces.iter().filter(|n| n.mtu > 0) {
            vm::log_line(
                log,
                &format!(
                    "note: kvmtool has no NIC MTU option; {} MTU {} is set inside the guest",
                    nic.tap, nic.mtu
                ),
            );
        }
        vm::log_line(
            log,
            &format!(
                "starting {} {}",
                lkvm.display(),
                args.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
        KvmtoolVm::start(StartSpec {
            lkvm,
            args,
            paths,
            console_log: config.console_log.clone(),
            guest_memory_bytes: config.memory_mib.max(1) * 1024 * 1024,
            start_timeout,
        })
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

impl Hypervisor for KvmtoolDriver {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Hypervisor,
            name: "kvmtool".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "kvmtool (lkvm run): KVM only, agent on ttyS1".into(),
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

export_hypervisor!(|| Ok(KvmtoolDriver));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_lookup() {
        let err = lkvm_binary(Some("/nonexistent/lkvm")).unwrap_err();
        assert!(err.contains("/nonexistent/lkvm"), "{err}");
        let err = lkvm_binary(Some("no-such-lkvm-binary")).unwrap_err();
        assert!(err.contains("not found in PATH"), "{err}");
        assert!(lkvm_binary(Some("sh")).unwrap().is_absolute());
    }

    #[test]
    fn kvm_reasons() {
        assert_eq!(kvm_problem(Ok(()), true), None);
        let r = kvm_problem(Ok(()), false).unwrap();
        assert!(r.contains("vmx/svm") && r.contains("stock kernel"), "{r}");
        let r = kvm_problem(Err("/dev/kvm: No such file or directory".into()), true).unwrap();
        assert!(r.contains("No such file"), "{r}");
        assert!(cpuinfo_has_virt_flag("flags\t: fpu svm tsc\n"));
        assert!(!cpuinfo_has_virt_flag("flags\t: fpu nosvmx tsc\n"));
    }

    #[test]
    fn capabilities_are_honest() {
        let caps = KvmtoolDriver.info().capabilities;
        assert!(caps.contains(Capabilities::SHARED_DIR_ROOTFS));
        assert!(caps.contains(Capabilities::PAUSE));
        assert!(caps.contains(Capabilities::BLOCK_ROOTFS));
        assert!(!caps.contains(Capabilities::SNAPSHOT));
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--tty"), "--tty");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
