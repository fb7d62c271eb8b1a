//! The QEMU command line, built from a [`VmConfig`] by pure functions, and the choice of
//! accelerator from facts about the host.

use std::fs;
use std::path::{Path, PathBuf};

use runv_api::VmConfig;

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// The accelerator chosen for a VM and, when it is TCG although KVM was not ruled out by the
/// user, why (one line for the core to print as a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    /// Set when falling back to TCG because KVM is not usable on this host.
    pub fallback_reason: Option<String>,
}

/// What the accelerator choice depends on, read from the host by [`HostFacts::read`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `vmx` or `svm` is among the CPU flags in /proc/cpuinfo.
    pub hw_virt_flag: bool,
    /// /dev/kvm can be opened read-write; the error otherwise.
    pub kvm_device: Result<(), String>,
    /// The host TSC frequency in kHz, when known.
    pub tsc_khz: Option<u64>,
}

impl HostFacts {
    pub fn read() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm_device = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| format!("/dev/kvm: {e}"));
        let tsc_khz = fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .or_else(|| cpu_mhz_khz(&cpuinfo));
        Self {
            hw_virt_flag: cpuinfo_has_virt_flag(&cpuinfo),
            kvm_device,
            tsc_khz,
        }
    }
}

pub use runv_api::cpuinfo_has_virt_flag;

/// The first `cpu MHz` of /proc/cpuinfo, in kHz.
pub fn cpu_mhz_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("cpu MHz"))
        .filter_map(|l| l.split_once(':'))
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .find(|mhz| *mhz > 0.0)
        .map(|mhz| (mhz * 1000.0).round() as u64)
}

/// Chooses KVM or TCG. `requested` is `parameters["accel"]` (`kvm`, `tcg`, or unset/`auto`).
///
/// KVM is used only when the CPU advertises hardware virtualization (vmx/svm) *and* /dev/kvm
/// opens read-write: some hosts (e.g. with the `kvm_pvm` module) have a working /dev/kvm that
/// cannot boot a stock kernel, so the device alone is not enough. A forced `kvm` is honoured even
/// then (the user asked for it); a forced `tcg` always wins.
pub fn choose_accel(requested: Option<&str>, host: &HostFacts) -> Result<AccelChoice, String> {
    match requested.map(str::trim).filter(|s| !s.is_empty()) {
        Some("kvm") => Ok(AccelChoice {
            accel: Accel::Kvm,
            fallback_reason: None,
        }),
        Some("tcg") => Ok(AccelChoice {
            accel: Accel::Tcg,
            fallback_reason: None,
        }),
        None | Some("auto") => {
            let reason = match (&host.kvm_device, host.hw_virt_flag) {
                (Ok(()), true) => None,
                (Err(e), _) => Some(format!("KVM is not usable ({e}); using TCG (slow)")),
                (Ok(()), false) => Some(
                    "KVM is not usable (the CPU has no vmx/svm flag, so /dev/kvm cannot boot a \
                     stock kernel); using TCG (slow)"
                        .to_string(),
                ),
            };
            Ok(match reason {
                None => AccelChoice {
                    accel: Accel::Kvm,
                    fallback_reason: None,
                },
                Some(reason) => AccelChoice {
                    accel: Accel::Tcg,
                    fallback_reason: Some(reason),
                },
            })
        }
        Some(other) => Err(format!(
            "unknown accelerator {other:?} for the qemu driver (use kvm, tcg or auto)"
        )),
    }
}

/// The QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Machine {
    /// `-M microvm,acpi=on`: no PCI, no firmware; virtio-mmio devices described by ACPI
    /// (Debian's kernel finds them only that way). Boots fastest here.
    #[default]
    Microvm,
    /// `-M pc`: SeaBIOS and PCI; for kernels without virtio-mmio support.
    Pc,
}

impl Machine {
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim).filter(|s| !s.is_empty()) {
            None | Some("microvm") => Ok(Self::Microvm),
            Some("pc") => Ok(Self::Pc),
            Some(other) => Err(format!(
                "unknown machine type {other:?} for the qemu driver (use microvm or pc)"
            )),
        }
    }

    /// The name of a virtio device on this machine's transport.
    fn virtio(self, device: &str) -> String {
        match self {
            Self::Microvm => format!("virtio-{device}-device"),
            Self::Pc => format!("virtio-{device}-pci"),
        }
    }
}

/// Everything besides the [`VmConfig`] that shapes the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuOptions {
    pub accel: Accel,
    pub machine: Machine,
    /// Host TSC frequency; passed as `tsc_early_khz` to a microvm guest under TCG, where the
    /// kernel has no HPET/PM timer to calibrate against and otherwise hangs now and then.
    pub tsc_khz: Option<u64>,
    /// Open taps, one per network interface in order (`fd=`); without one, qemu attaches to
    /// the tap by name, which needs CAP_NET_ADMIN.
    pub tap_fds: Vec<i32>,
    /// TCG's translation cache in MiB (`parameters["tb_size"]`).
    pub tb_size_mib: u32,
    /// The agent channel is a vsock ([`crate::vsock`]) instead of a virtio-serial port.
    pub agent_vsock: Option<AgentVsock>,
}

/// A vhost-vsock device for the agent channel: its CID (claimed on `vhost_fd` already), the
/// fd qemu inherits, and the host port the agent connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentVsock {
    pub cid: u32,
    pub vhost_fd: i32,
    pub port: u32,
}

/// TCG's translation cache when the parameters name none.
pub const DEFAULT_TB_SIZE_MIB: u32 = 32;

/// Files the VM uses, derived from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub agent_socket: PathBuf,
    pub qmp_socket: PathBuf,
    pub log_file: PathBuf,
}

/// The guest port name the agent looks for.
pub const AGENT_PORT_NAME: &str = "org.runv.agent";
/// Default guest memory when the config says 0.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// Longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

impl VmPaths {
    /// The same sockets as qemu sees them when the state directory is at `dir` (its jail).
    pub fn seen_from(&self, dir: &Path) -> Self {
        let moved = |p: &Path| {
            p.file_name()
                .map(|n| dir.join(n))
                .unwrap_or_else(|| p.to_path_buf())
        };
        Self {
            agent_socket: moved(&self.agent_socket),
            qmp_socket: moved(&self.qmp_socket),
            log_file: self.log_file.clone(),
        }
    }

    pub fn new(config: &VmConfig) -> Result<Self, String> {
        if config.state_dir.as_os_str().is_empty() {
            return Err("the VM config has no state_dir".into());
        }
        let paths = Self {
            agent_socket: config.state_dir.join("agent.sock"),
            qmp_socket: config.state_dir.join("qmp.sock"),
            log_file: config
                .log_file
                .clone()
                .unwrap_or_else(|| config.state_dir.join("qemu.log")),
        };
        for socket in [&paths.agent_socket, &paths.qmp_socket] {
            if socket.as_os_str().len() > SUN_PATH_MAX {
                return Err(format!(
                    "the socket path {} is longer than {SUN_PATH_MAX} bytes; use a shorter \
                     state directory (--root)",
                    socket.display()
                ));
            }
        }
        Ok(paths)
    }
}

/// A path as a QEMU option value: UTF-8, with commas doubled (QEMU's escape in `-opt a=b,c=d`).
fn opt_path(path: &Path) -> Result<String, String> {
    let s = path
        .to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", path.display()))?;
    Ok(escape(s))
}

/// Escapes a value for QEMU's `key=value,key=value` option syntax.
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The kernel command line: what the driver needs, then the config's parameters (later ones win
/// for most parameters, so the user can override).
pub fn kernel_cmdline(config: &VmConfig, options: &QemuOptions) -> String {
    let mut params = vec![
        "console=ttyS0".to_string(),
        // qemu runs with -no-reboot: a guest reboot ends qemu, so the agent reboots to exit.
        "runv.exit=reboot".to_string(),
        // A guest panic ends the VM instead of hanging it.
        "panic=-1".to_string(),
    ];
    if let (Accel::Tcg, Machine::Microvm, Some(khz)) =
        (options.accel, options.machine, options.tsc_khz)
    {
        params.push(format!("tsc_early_khz={khz}"));
    }
    if let Some(v) = options.agent_vsock {
        params.push(crate::vsock::kernel_param(v.port));
    }
    let extra = config.kernel_params.trim();
    if !extra.is_empty() {
        params.push(extra.to_string());
    }
    params.join(" ")
}

/// The guest CPU under TCG: everything TCG emulates but the fast-string flags (see
/// `build_args`).
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// QEMU's seccomp filter: a guest that escapes into QEMU cannot call obsolete syscalls, gain
/// privileges (setuid/setgid/capset), fork or exec, or change scheduling or affinity. What
/// it can reach besides is limited by its jail (`jail.rs`). `spawn=deny` also rules out
/// `exec:` migration URIs: templates save and load their state through `fd:`.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The arguments for `qemu-system-x86_64` (without the program name).
pub fn build_args(
    config: &VmConfig,
    options: &QemuOptions,
    paths: &VmPaths,
) -> Result<Vec<String>, String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    let templating = config.memory_file.is_some() || config.restore_from.is_some();
    push(&["-sandbox", SANDBOX]);
    if !config.name.is_empty() {
        push(&["-name", &escape(&config.name)]);
    }
    let machine = match options.machine {
        Machine::Microvm => "microvm,acpi=on",
        Machine::Pc => "pc",
    };
    push(&["-M", machine]);
    match options.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // A 32 MiB translation cache instead of the default ~1 GiB reservation (of which ~53 MiB
        // gets resident): the biggest per-VM host memory cost under TCG (see BENCHMARKS.md).
        // Without ERMS and FSRM the guest kernel and libc copy and clear memory with `rep movsq`
        // / `rep stosq` or vector loops instead of `rep movsb` / `rep stosb`, which TCG runs one
        // byte per iteration: every copy in the guest (pipes, stdio, page clearing) was several
        // times slower (BENCHMARKS.md, exec).
        Accel::Tcg => push(&[
            "-accel",
            &format!("tcg,tb-size={}", options.tb_size_mib),
            "-cpu",
            TCG_CPU,
        ]),
    }
    let memory = if config.memory_mib == 0 {
        DEFAULT_MEMORY_MIB
    } else {
        config.memory_mib
    };
    let vcpus = config.vcpus.max(1);
    push(&["-m", &format!("{memory}M"), "-smp", &vcpus.to_string()]);

    if config.kernel.as_os_str().is_empty() {
        return Err("the VM config has no kernel".into());
    }
    // -kernel/-initrd take a plain path, not an option list: no comma escaping.
    let plain = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| format!("path {} is not UTF-8", p.display()))
    };
    push(&["-kernel", &plain(&config.kernel)?]);
    if let Some(initrd) = &config.initrd {
        push(&["-initrd", &plain(initrd)?]);
    }
    push(&["-append", &kernel_cmdline(config, options)]);

    // Guest console: the first serial port, appended to the console log.
    if !config.console_log.as_os_str().is_empty() {
        push(&[
            "-chardev",
            &format!(
                "file,id=console,path={},append=on",
                opt_path(&config.console_log)?
            ),
            "-serial",
            "chardev:console",
        ]);
    }

    // Agent channel: a vsock served by the host kernel, or a virtio-serial port.
    match options.agent_vsock {
        Some(v) => push(&[
            "-device",
            &format!(
                "{},guest-cid={},vhostfd={}",
                match options.machine {
                    Machine::Microvm => "vhost-vsock-device",
                    Machine::Pc => "vhost-vsock-pci",
                },
                v.cid,
                v.vhost_fd
            ),
        ]),
        None => push(&[
            "-device",
            &options.machine.virtio("serial"),
            "-chardev",
            &format!(
                "socket,id=agent,path={},server=on,wait=off",
                opt_path(&paths.agent_socket)?
            ),
            "-device",
            &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        ]),
    }

    // Free page reporting: the guest hands the host back the memory it does not use. QEMU
    // backs guest RAM with transparent huge pages, so a guest that touched a byte of every
    // 2 MiB holds all its RAM on the host; reported free 2 MiB blocks are discarded again.
    // Not for templates and clones: their RAM is a file, and QEMU 7.2 punches discarded
    // ranges out of the file itself, also under a clone's private mapping, which would
    // corrupt the template every other clone maps.
    if !templating {
        push(&[
            "-device",
            &format!(
                "{},free-page-reporting=on",
                options.machine.virtio("balloon")
            ),
        ]);
    }

    // QMP.
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_path(&paths.qmp_socket)?
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);

    for (i, dir) in config.shared_dirs.iter().enumerate() {
        if dir.tag.is_empty() {
            return Err(format!(
                "shared directory {} has no tag",
                dir.host_path.display()
            ));
        }
        let ro = if dir.readonly { ",readonly=on" } else { "" };
        push(&[
            "-fsdev",
            &format!(
                "local,id=fs{i},path={},security_model=none{ro},multidevs=remap",
                opt_path(&dir.host_path)?
            ),
            "-device",
            &format!(
                "{},fsdev=fs{i},mount_tag={}",
                options.machine.virtio("9p"),
                escape(&dir.tag)
            ),
        ]);
    }

    for (i, disk) in config.block_devices.iter().enumerate() {
        let ro = if disk.readonly { ",readonly=on" } else { "" };
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=blk{i},format=raw{ro}",
                opt_path(&disk.host_path)?
            ),
            "-device",
            &format!(
                "{},drive=blk{i},serial={}",
                options.machine.virtio("blk"),
                escape(&disk.id)
            ),
        ]);
    }

    for (i, nic) in config.network_interfaces.iter().enumerate() {
        // A template VM has NICs without a backend: its clones attach their own taps.
        let template_nic = nic.tap.is_empty() && config.memory_file.is_some();
        if nic.tap.is_empty() && !template_nic {
            return Err(format!("network interface {i} has no tap device"));
        }
        let mut device = options.machine.virtio("net");
        if !template_nic {
            device.push_str(&format!(",netdev=net{i}"));
        }
        if !nic.mac.is_empty() {
            device.push_str(&format!(",mac={}", escape(&nic.mac)));
        }
        if nic.mtu > 0 {
            device.push_str(&format!(",host_mtu={}", nic.mtu));
        }
        if !template_nic {
            let backend = match options.tap_fds.get(i) {
                Some(fd) => format!("fd={fd}"),
                None => format!("ifname={},script=no,downscript=no", escape(&nic.tap)),
            };
            push(&["-netdev", &format!("tap,id=net{i},{backend},vhost=off")]);
        }
        push(&["-device", &device]);
    }
    Ok(args)
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
            state_dir: "/run/runv/c1".into(),
            console_log: "/run/runv/c1/console.log".into(),
            ..Default::default()
        }
    }

    fn tcg_microvm() -> QemuOptions {
        QemuOptions {
            accel: Accel::Tcg,
            machine: Machine::Microvm,
            tsc_khz: Some(2_600_000),
            tap_fds: Vec::new(),
            tb_size_mib: DEFAULT_TB_SIZE_MIB,
            agent_vsock: None,
        }
    }

    fn args(config: &VmConfig, options: &QemuOptions) -> Vec<String> {
        build_args(config, options, &VmPaths::new(config).unwrap()).unwrap()
    }

    /// The value following `flag` each time it occurs.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn microvm_tcg_basics() {
        let a = args(&config(), &tcg_microvm());
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(a.iter().any(|x| x == flag), "{flag} missing: {a:?}");
        }
        assert_eq!(values(&a, "-sandbox"), [SANDBOX]);
        assert_eq!(values(&a, "-M"), ["microvm,acpi=on"]);
        assert_eq!(values(&a, "-accel"), ["tcg,tb-size=32"]);
        let small = QemuOptions {
            tb_size_mib: 16,
            ..tcg_microvm()
        };
        assert_eq!(
            values(&args(&config(), &small), "-accel"),
            ["tcg,tb-size=16"]
        );
        assert_eq!(values(&a, "-cpu"), ["max,-erms,-fsrm"]);
        assert_eq!(values(&a, "-m"), ["128M"]);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-kernel"), ["/k/vmlinux"]);
        assert_eq!(values(&a, "-initrd"), ["/k/initrd.img"]);
        assert_eq!(
            values(&a, "-append"),
            ["console=ttyS0 runv.exit=reboot panic=-1 tsc_early_khz=2600000 quiet"]
        );
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-serial-device"), "{devices:?}");
        assert!(devices.contains(&"virtserialport,chardev=agent,name=org.runv.agent"));
        assert!(devices.contains(&"virtio-balloon-device,free-page-reporting=on"));
        let chardevs = values(&a, "-chardev");
        assert!(
            chardevs.contains(&"socket,id=agent,path=/run/runv/c1/agent.sock,server=on,wait=off")
        );
        assert!(chardevs.contains(&"socket,id=qmp,path=/run/runv/c1/qmp.sock,server=on,wait=off"));
        assert!(chardevs.contains(&"file,id=console,path=/run/runv/c1/console.log,append=on"));
        assert_eq!(values(&a, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(values(&a, "-serial"), ["chardev:console"]);
    }

    #[test]
    fn a_vsock_agent_channel_replaces_the_serial_port() {
        let vsock = QemuOptions {
            accel: Accel::Kvm,
            agent_vsock: Some(AgentVsock {
                cid: 77,
                vhost_fd: 9,
                port: 1234,
            }),
            ..tcg_microvm()
        };
        let a = args(&config(), &vsock);
        let devices = values(&a, "-device");
        assert!(
            devices.contains(&"vhost-vsock-device,guest-cid=77,vhostfd=9"),
            "{devices:?}"
        );
        assert!(!devices.iter().any(|d| d.contains("serial")), "{devices:?}");
        assert!(
            !values(&a, "-chardev")
                .iter()
                .any(|c| c.contains("id=agent"))
        );
        assert!(values(&a, "-append")[0].contains(" runv.channel=vsock:2:1234"));
    }

    #[test]
    fn pc_uses_pci_devices_and_no_tsc_hint() {
        let opts = QemuOptions {
            machine: Machine::Pc,
            ..tcg_microvm()
        };
        let mut cfg = config();
        cfg.shared_dirs.push(SharedDir {
            tag: "rootfs".into(),
            host_path: "/b/rootfs".into(),
            readonly: false,
        });
        let a = args(&cfg, &opts);
        assert_eq!(values(&a, "-M"), ["pc"]);
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-serial-pci"), "{devices:?}");
        assert!(devices.contains(&"virtio-balloon-pci,free-page-reporting=on"));
        assert!(devices.contains(&"virtio-9p-pci,fsdev=fs0,mount_tag=rootfs"));
        assert!(!values(&a, "-append")[0].contains("tsc_early_khz"));
    }

    #[test]
    fn kvm_uses_host_cpu_and_no_tsc_hint() {
        let opts = QemuOptions {
            accel: Accel::Kvm,
            ..tcg_microvm()
        };
        let a = args(&config(), &opts);
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
        assert!(!values(&a, "-append")[0].contains("tsc_early_khz"));
    }

    #[test]
    fn shared_dirs_ro_and_rw() {
        let mut cfg = config();
        cfg.shared_dirs = vec![
            SharedDir {
                tag: "rootfs".into(),
                host_path: "/b/rootfs".into(),
                readonly: false,
            },
            SharedDir {
                tag: "vol1".into(),
                host_path: "/data/a,b".into(),
                readonly: true,
            },
        ];
        let a = args(&cfg, &tcg_microvm());
        assert_eq!(
            values(&a, "-fsdev"),
            [
                "local,id=fs0,path=/b/rootfs,security_model=none,multidevs=remap",
                "local,id=fs1,path=/data/a,,b,security_model=none,readonly=on,multidevs=remap",
            ]
        );
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-9p-device,fsdev=fs0,mount_tag=rootfs"));
        assert!(devices.contains(&"virtio-9p-device,fsdev=fs1,mount_tag=vol1"));
    }

    #[test]
    fn block_devices_and_taps() {
        let mut cfg = config();
        cfg.block_devices.push(BlockDevice {
            id: "rootfs".into(),
            host_path: "/dev/mapper/thin-c1".into(),
            readonly: true,
        });
        cfg.network_interfaces.push(NetInterface {
            tap: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1400,
        });
        let a = args(&cfg, &tcg_microvm());
        assert_eq!(
            values(&a, "-drive"),
            ["file=/dev/mapper/thin-c1,if=none,id=blk0,format=raw,readonly=on"]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=off"]
        );
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-blk-device,drive=blk0,serial=rootfs"));
        assert!(
            devices.contains(&"virtio-net-device,netdev=net0,mac=02:00:00:00:00:01,host_mtu=1400")
        );
        // The driver hands qemu the tap open: no CAP_NET_ADMIN needed to attach.
        let opts = QemuOptions {
            tap_fds: vec![7],
            ..tcg_microvm()
        };
        assert_eq!(
            values(&args(&cfg, &opts), "-netdev"),
            ["tap,id=net0,fd=7,vhost=off"]
        );
    }

    #[test]
    fn templates_and_clones_have_no_balloon() {
        let balloon = |cfg: &VmConfig| {
            values(&args(cfg, &tcg_microvm()), "-device")
                .iter()
                .any(|d| d.starts_with("virtio-balloon"))
        };
        let mut cfg = config();
        assert!(balloon(&cfg));
        cfg.memory_file = Some("/t/memory".into());
        assert!(!balloon(&cfg), "a template VM");
        // Their state goes through an fd: no spawning for them either.
        assert_eq!(values(&args(&cfg, &tcg_microvm()), "-sandbox"), [SANDBOX]);
        cfg.memory_file = None;
        cfg.restore_from = Some("/t".into());
        assert!(!balloon(&cfg), "a clone");
        assert_eq!(values(&args(&cfg, &tcg_microvm()), "-sandbox"), [SANDBOX]);
    }

    #[test]
    fn defaults_and_errors() {
        let mut cfg = config();
        cfg.memory_mib = 0;
        cfg.vcpus = 0;
        cfg.initrd = None;
        let a = args(&cfg, &tcg_microvm());
        assert_eq!(values(&a, "-m"), ["256M"]);
        assert_eq!(values(&a, "-smp"), ["1"]);
        assert!(values(&a, "-initrd").is_empty());

        let paths = VmPaths::new(&cfg).unwrap();
        cfg.kernel = PathBuf::new();
        assert!(build_args(&cfg, &tcg_microvm(), &paths).is_err());

        let mut long = config();
        long.state_dir = PathBuf::from(format!("/run/{}", "x".repeat(120)));
        let err = VmPaths::new(&long).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
    }

    #[test]
    fn log_file_defaults_to_the_state_dir() {
        let mut cfg = config();
        assert_eq!(
            VmPaths::new(&cfg).unwrap().log_file,
            Path::new("/run/runv/c1/qemu.log")
        );
        cfg.log_file = Some("/var/log/x.log".into());
        assert_eq!(
            VmPaths::new(&cfg).unwrap().log_file,
            Path::new("/var/log/x.log")
        );
    }

    const CPUINFO_NO_VIRT: &str = "processor\t: 0\ncpu MHz\t\t: 2600.000\n\
        flags\t\t: fpu vme tsc msr constant_tsc\n";
    const CPUINFO_SVM: &str = "processor\t: 0\ncpu MHz\t\t: 3000.5\nflags\t\t: fpu svm tsc\n";

    #[test]
    fn cpuinfo_parsing() {
        assert!(!cpuinfo_has_virt_flag(CPUINFO_NO_VIRT));
        assert!(cpuinfo_has_virt_flag(CPUINFO_SVM));
        assert!(cpuinfo_has_virt_flag("flags : vmx\n"));
        // "svm" must be a whole flag, not part of another.
        assert!(!cpuinfo_has_virt_flag("flags : nosvmx\n"));
        assert_eq!(cpu_mhz_khz(CPUINFO_NO_VIRT), Some(2_600_000));
        assert_eq!(cpu_mhz_khz(CPUINFO_SVM), Some(3_000_500));
        assert_eq!(cpu_mhz_khz("flags : x\n"), None);
    }

    fn host(flag: bool, kvm: bool) -> HostFacts {
        HostFacts {
            hw_virt_flag: flag,
            kvm_device: if kvm {
                Ok(())
            } else {
                Err("/dev/kvm: No such file or directory".into())
            },
            tsc_khz: None,
        }
    }

    #[test]
    fn accel_from_host_facts() {
        let c = choose_accel(None, &host(true, true)).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        assert_eq!(c.fallback_reason, None);

        // /dev/kvm opens but the CPU has no vmx/svm (kvm_pvm): TCG, with a reason.
        let c = choose_accel(None, &host(false, true)).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.fallback_reason.unwrap().contains("vmx/svm"));

        let c = choose_accel(Some("auto"), &host(true, false)).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.fallback_reason.unwrap().contains("No such file"));
    }

    #[test]
    fn accel_from_parameters_wins() {
        let c = choose_accel(Some("tcg"), &host(true, true)).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.fallback_reason, None);
        let c = choose_accel(Some("kvm"), &host(false, false)).unwrap();
        assert_eq!(c.accel, Accel::Kvm);
        assert!(choose_accel(Some("hvf"), &host(true, true)).is_err());
    }

    #[test]
    fn machine_parsing() {
        assert_eq!(Machine::parse(None).unwrap(), Machine::Microvm);
        assert_eq!(Machine::parse(Some("pc")).unwrap(), Machine::Pc);
        assert!(Machine::parse(Some("q35")).is_err());
    }
}
