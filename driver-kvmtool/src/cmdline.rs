//! The `lkvm run` command line, built from a [`VmConfig`] by pure functions.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use runv_api::VmConfig;

/// Default guest memory when the config says 0.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// kvmtool refuses less than this.
pub const MIN_MEMORY_MIB: u64 = 64;
/// The guest device the agent talks on: the second 8250 UART, which `--tty 1` ties to a pty.
pub const AGENT_TTY: &str = "/dev/ttyS1";
/// The kvmtool terminal number of that UART.
pub const AGENT_TERM: u32 = 1;

/// Longest path a unix socket address can hold (sun_path is 108 bytes with the NUL).
const SUN_PATH_MAX: usize = 107;

/// Files the VM uses, derived from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// `HOME` for every lkvm command of this VM: lkvm keeps its control socket in
    /// `$HOME/.lkvm/<name>.sock`, so each VM gets a private one in its state dir.
    pub home: PathBuf,
    /// The name given to `lkvm run --name` and to `lkvm stop/pause/resume --name`.
    pub guest_name: String,
    /// `<home>/.lkvm/<guest_name>.sock`, made by lkvm.
    pub control_socket: PathBuf,
    pub log_file: PathBuf,
}

impl VmPaths {
    pub fn new(config: &VmConfig) -> Result<Self, String> {
        if config.state_dir.as_os_str().is_empty() {
            return Err("the VM config has no state_dir".into());
        }
        let home = config.state_dir.clone();
        let dir = home.join(".lkvm");
        // "/" + name + ".sock" must fit.
        let room = SUN_PATH_MAX.saturating_sub(dir.as_os_str().len() + 1 + ".sock".len());
        if room < 4 {
            return Err(format!(
                "the state directory {} is too long for lkvm's control socket; use a shorter \
                 --root",
                config.state_dir.display()
            ));
        }
        let guest_name = guest_name(&config.name, room);
        Ok(Self {
            control_socket: dir.join(format!("{guest_name}.sock")),
            home,
            guest_name,
            log_file: config
                .log_file
                .clone()
                .unwrap_or_else(|| config.state_dir.join("kvmtool.log")),
        })
    }
}

/// A kvmtool guest name from the container name: characters other than `[A-Za-z0-9_.-]`
/// become `_`, at most `max` bytes, never empty.
pub fn guest_name(name: &str, max: usize) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if cleaned.is_empty() || cleaned.starts_with('.') {
        format!("runv{}", cleaned)
            .chars()
            .take(max.max(4))
            .collect()
    } else {
        cleaned
    }
}

/// The kernel lkvm gets. lkvm boots a bzImage, not an ELF `vmlinux`: when the config names an
/// ELF file, the `vmlinuz` beside it is used instead, and the second value says so (one line
/// for the log).
pub fn resolve_kernel(kernel: &Path) -> Result<(PathBuf, Option<String>), String> {
    if kernel.as_os_str().is_empty() {
        return Err("the VM config has no kernel".into());
    }
    let mut magic = [0u8; 4];
    File::open(kernel)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| format!("kernel {}: {e}", kernel.display()))?;
    if &magic != b"\x7fELF" {
        return Ok((kernel.to_path_buf(), None));
    }
    let bzimage = kernel.with_file_name("vmlinuz");
    if bzimage.is_file() {
        let note = format!(
            "{} is an ELF vmlinux, which lkvm cannot boot; using the bzImage {} next to it",
            kernel.display(),
            bzimage.display()
        );
        Ok((bzimage, Some(note)))
    } else {
        Err(format!(
            "{} is an ELF vmlinux and lkvm boots only a bzImage: no {} next to it (give the \
             kernel as --kernel PATH/vmlinuz)",
            kernel.display(),
            bzimage.display()
        ))
    }
}

/// virtio-blk's serial field, in bytes.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// The serial kvmtool gives a disk, which it cannot be told: `disk_image__get_serial` prints
/// the host file's `st_dev`, `st_rdev` and `st_ino` in decimal, one after the other, and
/// answers the guest's request for it only when that fits virtio-blk's 20 bytes.
pub fn kvmtool_serial(dev: u64, rdev: u64, ino: u64) -> Option<String> {
    let serial = format!("{dev}{rdev}{ino}");
    (serial.len() <= VIRTIO_BLK_ID_BYTES).then_some(serial)
}

/// Each block device's id and the serial kvmtool will give it (from the host file, as
/// kvmtool computes it). The guest learns the pairs from `runv.disk.<id>=<serial>` (see
/// [`kernel_cmdline`]) and so finds a disk by id as it does on drivers that set serials.
pub fn disk_serials(config: &VmConfig) -> Result<Vec<(String, String)>, String> {
    config
        .block_devices
        .iter()
        .map(|disk| {
            if disk.id.is_empty()
                || !disk
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            {
                return Err(format!(
                    "disk {} has id {:?}; kvmtool's disks need ids of [A-Za-z0-9_-]",
                    disk.host_path.display(),
                    disk.id
                ));
            }
            let meta = std::fs::metadata(&disk.host_path)
                .map_err(|e| format!("disk {}: {e}", disk.host_path.display()))?;
            let serial = kvmtool_serial(meta.dev(), meta.rdev(), meta.ino()).ok_or_else(|| {
                format!(
                    "kvmtool would give disk {} a serial longer than {VIRTIO_BLK_ID_BYTES} \
                     bytes (device {}, rdev {}, inode {}), which the guest cannot read",
                    disk.host_path.display(),
                    meta.dev(),
                    meta.rdev(),
                    meta.ino()
                )
            })?;
            Ok((disk.id.clone(), serial))
        })
        .collect()
}

/// The guest kernel's whole command line; lkvm gets `--nodefaults` and passes it unchanged.
///
/// Without `--nodefaults`, lkvm prepends its own x86 defaults, which include
/// `earlyprintk=serial`. The x86 kernel's early-console parser (`setup_early_printk`) steps past
/// the end of that value and keeps scanning the rest of the command line, so the `ttyS1` in
/// `runv.channel=/dev/ttyS1` made it move the boot console onto the agent's UART: kernel log
/// lines arrived on the agent channel. Owning the whole command line is the robust fix: no
/// lkvm default can add an early console (or anything else) behind our back, and no
/// `earlyprintk` is given at all. A virtio console for the agent is no way out: kvmtool's
/// virtio console and its ttyS0 share terminal 0, and with `--console virtio` kvmtool adds
/// `console=hvc0`, putting the kernel log on it.
pub fn kernel_cmdline(config: &VmConfig, disk_serials: &[(String, String)]) -> String {
    let mut params = vec![
        // lkvm's x86 defaults (kvmtool 3.18, `kvm__arch_set_cmdline`: no ACPI or IOAPIC,
        // legacy PCI config access, a bare i8042 whose reset line ends the VM), without
        // `earlyprintk=serial`.
        "noapic noacpi pci=conf1 reboot=k i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 \
         i8042.noaux=1"
            .to_string(),
        // The kernel console on the first UART only, which is lkvm's stdin/stdout (the
        // console log). `--console serial` would add this without `--nodefaults`.
        "console=ttyS0".to_string(),
        // The agent's channel: the second UART (raw mode, set by the agent).
        format!("runv.channel={AGENT_TTY}"),
        // x86 kvmtool guests have no ACPI (noacpi), so power-off cannot end the VM; a reboot
        // (reboot=k, through the i8042) ends lkvm.
        "runv.exit=reboot".to_string(),
        // A guest panic ends the VM at once.
        "panic=-1".to_string(),
    ];
    // kvmtool cannot set disk serials: the agent maps ids to the serials kvmtool gives.
    for (id, serial) in disk_serials {
        params.push(format!("runv.disk.{id}={serial}"));
    }
    let extra = config.kernel_params.trim();
    if !extra.is_empty() {
        params.push(extra.to_string());
    }
    params.join(" ")
}

fn utf8(path: &Path) -> Result<&str, String> {
    path.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", path.display()))
}

/// lkvm splits `--9p` and `-d` values at the first comma: a comma in a path cannot be passed.
fn no_comma<'a>(what: &str, value: &'a str) -> Result<&'a str, String> {
    if value.contains(',') {
        Err(format!(
            "{what} {value:?} contains a comma, which lkvm's option syntax cannot carry"
        ))
    } else {
        Ok(value)
    }
}

/// The arguments for `lkvm` (without the program name), starting with `run`. `kernel` is the
/// resolved bzImage (see [`resolve_kernel`]), `disk_serials` from [`disk_serials`].
pub fn build_args(
    config: &VmConfig,
    kernel: &Path,
    paths: &VmPaths,
    disk_serials: &[(String, String)],
) -> Result<Vec<String>, String> {
    let mut args: Vec<String> = vec!["run".into()];
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let memory = match config.memory_mib {
        0 => DEFAULT_MEMORY_MIB,
        m => m.max(MIN_MEMORY_MIB),
    };
    push(&[
        "--name",
        &paths.guest_name,
        "-m",
        &memory.to_string(),
        "-c",
        &config.vcpus.max(1).to_string(),
        "-k",
        utf8(kernel)?,
    ]);
    if let Some(initrd) = &config.initrd {
        push(&["-i", utf8(initrd)?]);
    }
    push(&[
        // The whole kernel command line is ours (see [`kernel_cmdline`] for why).
        "--nodefaults",
        "-p",
        &kernel_cmdline(config, disk_serials),
        // Terminal 0 (ttyS0, the kernel console) is lkvm's stdin/stdout, a pty the driver
        // copies into the console log; terminal 1 (ttyS1, the agent) gets its own pty, which
        // lkvm names on stderr.
        "--console",
        "serial",
        "--tty",
        &AGENT_TERM.to_string(),
    ]);

    for dir in &config.shared_dirs {
        if dir.tag.is_empty() {
            return Err(format!(
                "shared directory {} has no tag",
                dir.host_path.display()
            ));
        }
        let path = no_comma("shared directory", utf8(&dir.host_path)?)?;
        let tag = no_comma("9p tag", &dir.tag)?;
        push(&["--9p", &format!("{path},{tag}")]);
    }

    for disk in &config.block_devices {
        let path = no_comma("disk", utf8(&disk.host_path)?)?;
        let ro = if disk.readonly { ",ro" } else { "" };
        push(&["-d", &format!("{path}{ro}")]);
    }

    if config.network_interfaces.is_empty() {
        // Without -n, lkvm adds a user-mode NIC with its own DHCP.
        push(&["-n", "mode=none"]);
    }
    for (i, nic) in config.network_interfaces.iter().enumerate() {
        if nic.tap.is_empty() {
            return Err(format!("network interface {i} has no tap device"));
        }
        let mut value = format!("mode=tap,tapif={}", no_comma("tap name", &nic.tap)?);
        if !nic.mac.is_empty() {
            value.push_str(&format!(",guest_mac={}", no_comma("MAC", &nic.mac)?));
        }
        push(&["-n", &value]);
    }
    Ok(args)
}

/// The state lkvm reports for `name` in the output of `lkvm list`, e.g. `running` or `paused`.
pub fn list_state<'a>(list_output: &'a str, name: &str) -> Option<&'a str> {
    list_output.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_pid, n, state) = (fields.next()?, fields.next()?, fields.next()?);
        (n == name).then_some(state)
    })
}

/// The pty lkvm assigned to terminal `term`, from a line of its stderr
/// (` Info: Assigned terminal 1 to pty /dev/pts/3`).
pub fn assigned_pty(line: &str, term: u32) -> Option<PathBuf> {
    let marker = format!("Assigned terminal {term} to pty ");
    let rest = &line[line.find(&marker)? + marker.len()..];
    let path = rest.split_whitespace().next()?;
    path.starts_with('/').then(|| PathBuf::from(path))
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
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd.img".into()),
            kernel_params: "quiet".into(),
            state_dir: "/run/runv/c1/vm".into(),
            console_log: "/run/runv/c1/console.log".into(),
            ..Default::default()
        }
    }

    fn args(config: &VmConfig) -> Vec<String> {
        let paths = VmPaths::new(config).unwrap();
        build_args(config, &config.kernel, &paths, &[]).unwrap()
    }

    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn basics() {
        let a = args(&config());
        assert_eq!(a[0], "run");
        assert_eq!(values(&a, "--name"), ["c1"]);
        assert_eq!(values(&a, "-m"), ["128"]);
        assert_eq!(values(&a, "-c"), ["2"]);
        assert_eq!(values(&a, "-k"), ["/k/vmlinuz"]);
        assert_eq!(values(&a, "-i"), ["/k/initrd.img"]);
        let cmdline = values(&a, "-p")[0];
        assert!(
            cmdline.ends_with(" runv.channel=/dev/ttyS1 runv.exit=reboot panic=-1 quiet"),
            "{cmdline}"
        );
        // The whole command line is ours, and nothing but the agent's own parameter names
        // the agent's UART (an early console would take it).
        assert!(a.contains(&"--nodefaults".to_string()));
        assert!(!cmdline.contains("earlyprintk"), "{cmdline}");
        assert_eq!(cmdline.matches("ttyS1").count(), 1, "{cmdline}");
        assert_eq!(
            cmdline
                .split_whitespace()
                .filter(|p| p.starts_with("console="))
                .collect::<Vec<_>>(),
            ["console=ttyS0"]
        );
        assert!(cmdline.contains("reboot=k"), "{cmdline}");
        assert_eq!(values(&a, "--console"), ["serial"]);
        assert_eq!(values(&a, "--tty"), ["1"]);
        assert_eq!(values(&a, "-n"), ["mode=none"]);
        assert!(values(&a, "-d").is_empty() && values(&a, "--9p").is_empty());
    }

    #[test]
    fn defaults() {
        let mut cfg = config();
        cfg.memory_mib = 0;
        cfg.vcpus = 0;
        cfg.initrd = None;
        cfg.kernel_params = "  ".into();
        let a = args(&cfg);
        assert_eq!(values(&a, "-m"), ["256"]);
        assert_eq!(values(&a, "-c"), ["1"]);
        assert!(values(&a, "-i").is_empty());
        assert!(values(&a, "-p")[0].ends_with(" runv.exit=reboot panic=-1"));
        cfg.memory_mib = 32;
        assert_eq!(values(&args(&cfg), "-m"), ["64"]);
    }

    #[test]
    fn shares_disks_and_taps() {
        let mut cfg = config();
        cfg.shared_dirs.push(SharedDir {
            tag: "rootfs".into(),
            host_path: "/b/rootfs".into(),
            readonly: false,
        });
        cfg.block_devices = vec![
            BlockDevice {
                id: "rootfs".into(),
                host_path: "/dev/mapper/thin-c1".into(),
                readonly: true,
            },
            BlockDevice {
                id: "data".into(),
                host_path: "/img/data.raw".into(),
                readonly: false,
            },
        ];
        cfg.network_interfaces.push(NetInterface {
            tap: "rvtap0".into(),
            mac: "02:00:00:00:00:01".into(),
            mtu: 1400,
        });
        let a = args(&cfg);
        assert_eq!(values(&a, "--9p"), ["/b/rootfs,rootfs"]);
        assert_eq!(
            values(&a, "-d"),
            ["/dev/mapper/thin-c1,ro", "/img/data.raw"]
        );
        assert_eq!(
            values(&a, "-n"),
            ["mode=tap,tapif=rvtap0,guest_mac=02:00:00:00:00:01"]
        );
    }

    #[test]
    fn disk_serials_as_kvmtool_makes_them() {
        // /dev/mapper/x on devtmpfs (0:5), a dm device (254:3), inode 412.
        assert_eq!(kvmtool_serial(5, 65027, 412).as_deref(), Some("565027412"));
        assert_eq!(kvmtool_serial(u64::MAX, 0, 1), None);
        let mut cfg = config();
        let dir = std::env::temp_dir().join(format!("runv-kvmtool-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("rootfs.img");
        std::fs::write(&image, b"").unwrap();
        cfg.block_devices.push(BlockDevice {
            id: "rootfs".into(),
            host_path: image.clone(),
            readonly: false,
        });
        let serials = disk_serials(&cfg).unwrap();
        let meta = std::fs::metadata(&image).unwrap();
        let want = format!("{}{}{}", meta.dev(), meta.rdev(), meta.ino());
        assert_eq!(serials, [("rootfs".to_string(), want.clone())]);
        let paths = VmPaths::new(&cfg).unwrap();
        let a = build_args(&cfg, &cfg.kernel, &paths, &serials).unwrap();
        assert!(
            values(&a, "-p")[0].contains(&format!(" runv.disk.rootfs={want} ")),
            "{a:?}"
        );
        cfg.block_devices[0].id = "a b".into();
        assert!(disk_serials(&cfg).unwrap_err().contains("id"));
        cfg.block_devices[0].id = "rootfs".into();
        cfg.block_devices[0].host_path = dir.join("missing");
        assert!(disk_serials(&cfg).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commas_and_missing_fields_are_errors() {
        let mut cfg = config();
        cfg.shared_dirs.push(SharedDir {
            tag: "vol".into(),
            host_path: "/data/a,b".into(),
            readonly: false,
        });
        let paths = VmPaths::new(&cfg).unwrap();
        let err = build_args(&cfg, &cfg.kernel, &paths, &[]).unwrap_err();
        assert!(err.contains("comma"), "{err}");
        cfg.shared_dirs[0].host_path = "/data".into();
        cfg.shared_dirs[0].tag.clear();
        assert!(build_args(&cfg, &cfg.kernel, &paths, &[]).is_err());
        let mut cfg = config();
        cfg.network_interfaces.push(NetInterface::default());
        assert!(build_args(&cfg, &cfg.kernel, &paths, &[]).is_err());
        let mut cfg = config();
        cfg.state_dir = PathBuf::new();
        assert!(VmPaths::new(&cfg).is_err());
    }

    #[test]
    fn paths_and_names() {
        let p = VmPaths::new(&config()).unwrap();
        assert_eq!(p.home, Path::new("/run/runv/c1/vm"));
        assert_eq!(p.control_socket, Path::new("/run/runv/c1/vm/.lkvm/c1.sock"));
        assert_eq!(p.log_file, Path::new("/run/runv/c1/vm/kvmtool.log"));
        assert_eq!(guest_name("a/b c", 20), "a_b_c");
        assert_eq!(guest_name("", 20), "runv");
        assert_eq!(guest_name("..x", 20), "runv..x");
        assert_eq!(guest_name(&"x".repeat(100), 10).len(), 10);

        let mut long = config();
        long.name = "n".repeat(200);
        let p = VmPaths::new(&long).unwrap();
        assert!(p.control_socket.as_os_str().len() <= SUN_PATH_MAX);
        long.state_dir = PathBuf::from(format!("/{}", "d".repeat(110)));
        assert!(VmPaths::new(&long).unwrap_err().contains("too long"));
    }

    #[test]
    fn kernel_choice() {
        let dir = std::env::temp_dir().join(format!("runv-kvmtool-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01").unwrap();
        let err = resolve_kernel(&elf).unwrap_err();
        assert!(err.contains("bzImage"), "{err}");
        let bz = dir.join("vmlinuz");
        std::fs::write(&bz, b"MZ\0\0bzimage").unwrap();
        let (k, note) = resolve_kernel(&elf).unwrap();
        assert_eq!(k, bz);
        assert!(note.unwrap().contains("ELF"));
        assert_eq!(resolve_kernel(&bz).unwrap(), (bz.clone(), None));
        assert!(resolve_kernel(&dir.join("missing")).is_err());
        assert!(resolve_kernel(Path::new("")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parsing_lkvm_output() {
        let list = "  PID NAME                 STATE\n------------------------------------\n\
                    4242 c1                   paused\n 4243 c10                  running\n";
        assert_eq!(list_state(list, "c1"), Some("paused"));
        assert_eq!(list_state(list, "c10"), Some("running"));
        assert_eq!(list_state(list, "c2"), None);
        assert_eq!(
            assigned_pty("  Info: Assigned terminal 1 to pty /dev/pts/7", 1),
            Some(PathBuf::from("/dev/pts/7"))
        );
        assert_eq!(
            assigned_pty("  Info: Assigned terminal 2 to pty /dev/pts/7", 1),
            None
        );
        assert_eq!(assigned_pty("Warning: something", 1), None);
    }
}
