//! Boots real VMs with qemu (TCG on hosts without usable KVM) from `target/guest`, built by
//! `cargo xtask guest`. Few boots: each takes a few seconds under TCG.

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runv_api::{HypervisorClient, PluginModuleRef, Vm};
use runv_driver_qemu::QemuDriver;
use runv_proto::client::AgentClient;
use runv_proto::{Request, ResponseBody};

mod guest_vm;
use guest_vm::{Scratch, config, logs};

const AGENT_TIMEOUT: Duration = Duration::from_secs(90);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn agent(fd: OwnedFd, scratch: &Scratch) -> AgentClient {
    AgentClient::connect(fd, AGENT_TIMEOUT)
        .unwrap_or_else(|e| panic!("agent handshake: {e}\n{}", logs(scratch)))
}

#[test]
fn boot_pause_resume_shutdown_direct() {
    let scratch = Scratch::new("direct");
    let driver = QemuDriver::new();
    let vm = driver
        .start(&config(&scratch, "direct"))
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    let pid = vm.pid();
    assert_eq!(vm.pids(), vec![pid]);
    assert_eq!(vm.qmp_status().unwrap(), "running");

    // The guest agent says Hello over the virtio-serial port, and answers.
    let client = agent(vm.take_agent_channel().unwrap(), &scratch);
    assert!(
        vm.take_agent_channel().is_err(),
        "the channel is handed over once"
    );
    let pong = client.request(Request::Ping, REQUEST_TIMEOUT).unwrap();
    assert!(matches!(pong, ResponseBody::Pong { .. }), "{pong:?}");

    vm.pause().unwrap();
    assert_eq!(vm.qmp_status().unwrap(), "paused");
    vm.resume().unwrap();
    assert_eq!(vm.qmp_status().unwrap(), "running");
    let pong = client.request(Request::Ping, REQUEST_TIMEOUT).unwrap();
    assert!(
        matches!(pong, ResponseBody::Pong { .. }),
        "the guest answers after resume: {pong:?}"
    );

    let stats = vm.stats().unwrap();
    assert!(
        stats.host_rss_bytes > 0 && stats.host_pss_bytes > 0,
        "{stats:?}"
    );
    assert_eq!(stats.guest_memory_bytes, 256 << 20);

    // The graceful path: the agent powers the guest off (a reboot, ending qemu); stop only waits.
    let _ = client.request(Request::Shutdown, REQUEST_TIMEOUT);
    vm.stop(Duration::from_secs(60)).unwrap();
    let exit = vm.wait().unwrap();
    assert_eq!(
        (exit.code, exit.signal, exit.description.as_str()),
        (0, 0, "the guest shut down"),
        "{}",
        logs(&scratch)
    );
    assert!(vm.pids().is_empty());
    assert!(vm.stats().is_err());
    assert!(vm.pause().is_err());
    drop(vm);
    assert!(scratch.processes().is_empty(), "qemu still running");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

fn plugin_path() -> PathBuf {
    // The test binary is target/<profile>/deps/<name>; the cdylib built for the tests is next
    // to it (and uplifted to target/<profile>/ by a normal build).
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .map(|d| d.join("librunv_driver_qemu.so"))
        .find(|p| p.exists())
        .expect("librunv_driver_qemu.so was not built next to the test binary")
}

fn plugin() -> HypervisorClient {
    let module = abi_stable::library::lib_header_from_path(&plugin_path())
        .unwrap()
        .init_root_module::<PluginModuleRef>()
        .unwrap();
    HypervisorClient::new((module.new_hypervisor())().into_result().unwrap())
}

#[test]
fn boot_through_the_plugin_then_quit_while_paused() {
    let scratch = Scratch::new("plugin");
    let driver = plugin();
    assert_eq!(driver.info().name.as_str(), "qemu");
    driver.probe().unwrap();
    let vm = driver
        .start_vm(&config(&scratch, "plugin"))
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    assert_eq!(vm.pids().len(), 1);

    // Raw bytes from the guest: the agent's Hello control frame
    // (u32 LE length, u8 type, u32 id, JSON payload).
    let mut channel = std::fs::File::from(vm.take_agent_channel().unwrap());
    // The agent's magic comes first (protocol 2): the qemu virtio-serial port carries
    // nothing else.
    let mut magic = vec![0u8; runv_proto::AGENT_MAGIC.len()];
    channel
        .read_exact(&mut magic)
        .unwrap_or_else(|e| panic!("reading the agent channel: {e}\n{}", logs(&scratch)));
    assert_eq!(
        magic,
        runv_proto::AGENT_MAGIC,
        "the channel starts with the agent's magic"
    );
    let mut header = [0u8; 9];
    channel
        .read_exact(&mut header)
        .unwrap_or_else(|e| panic!("reading the agent channel: {e}\n{}", logs(&scratch)));
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    assert!(len < 4096, "frame length {len}");
    let mut payload = vec![0u8; len.saturating_sub(5).min(4096)];
    channel.read_exact(&mut payload).unwrap();
    let text = String::from_utf8_lossy(&payload);
    assert!(
        text.contains("hello"),
        "not a Hello frame: {header:?} {text}"
    );

    vm.pause().unwrap();
    // Nobody asked the guest to shut down: stop waits briefly, then QMP quit ends qemu (a
    // paused VM can still quit).
    vm.stop(Duration::from_millis(200)).unwrap();
    let exit = vm.wait().unwrap();
    assert_eq!((exit.code, exit.signal), (0, 0), "{exit:?}");
    assert!(exit.description.as_str().contains("QMP quit"), "{exit:?}");
    // A second stop and wait are fine.
    vm.stop(Duration::ZERO).unwrap();
    assert_eq!(vm.wait().unwrap(), exit);
    assert!(vm.console_log().ends_with("console.log"));
    drop(vm);
    assert!(scratch.processes().is_empty(), "qemu still running");
    let log = fs::read_to_string(scratch.0.join("qemu.log")).unwrap();
    assert!(log.contains("runv-driver-qemu: starting"), "{log}");
}

#[test]
fn missing_kernel_fails_with_qemus_message() {
    let scratch = Scratch::new("nokernel");
    let mut cfg = config(&scratch, "nokernel");
    cfg.kernel = scratch.0.join("no-such-vmlinux");
    let err = match QemuDriver::new().start(&cfg) {
        Err(e) => e,
        Ok(_) => panic!("a VM without a kernel started"),
    };
    assert!(
        err.starts_with("qemu") && err.contains("no-such-vmlinux") && err.contains("No such file"),
        "{err}"
    );
    assert!(scratch.processes().is_empty(), "qemu still running");
}

#[test]
fn dropping_the_handle_kills_qemu() {
    let scratch = Scratch::new("drop");
    let vm = QemuDriver::new()
        .start(&config(&scratch, "drop"))
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    let pid = vm.pid();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    drop(vm);
    assert!(scratch.processes().is_empty(), "qemu still running");
    let log = fs::read_to_string(scratch.0.join("qemu.log")).unwrap();
    assert!(log.contains("killed by the host"), "{log}");
}

#[test]
fn pc_machine_boots_too() {
    let scratch = Scratch::new("pc");
    let mut cfg = config(&scratch, "pc");
    cfg.parameters.insert("machine".into(), "pc".into());
    cfg.parameters.insert("accel".into(), "tcg".into());
    let vm = QemuDriver::new()
        .start(&cfg)
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    let client = agent(vm.take_agent_channel().unwrap(), &scratch);
    let pong = client.request(Request::Ping, REQUEST_TIMEOUT).unwrap();
    assert!(matches!(pong, ResponseBody::Pong { .. }), "{pong:?}");
    vm.stop(Duration::ZERO).unwrap();
    assert_eq!(vm.wait().unwrap().signal, 0);
    drop(vm);
    assert!(scratch.processes().is_empty(), "qemu still running");
    let log = fs::read_to_string(scratch.0.join("qemu.log")).unwrap();
    assert!(log.contains(" -M pc "), "{log}");
}

/// A capability set from /proc/PID/status (`CapBnd:` and the like), as a bit mask.
fn cap_set(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(line.trim(), 16).unwrap()
}

/// The ids of a `Uid:`/`Gid:`/`Groups:` line of /proc/PID/status.
fn ids(pid: u32, field: &str) -> Vec<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
fn qemu_sees_only_its_own_vm_in_its_jail() {
    let scratch = Scratch::new("jail");
    let share = scratch.0.join("share");
    fs::create_dir_all(&share).unwrap();
    fs::write(share.join("file"), b"shared").unwrap();
    let mut cfg = config(&scratch, "jail");
    cfg.shared_dirs.push(runv_api::SharedDir {
        tag: "data".into(),
        host_path: share.clone(),
        readonly: false,
    });
    let vm = QemuDriver::new()
        .start(&cfg)
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    let pid = vm.pid();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());

    // Its own mount namespace, whose root holds the VM's files and the system's programs.
    assert_ne!(
        fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    assert_eq!(fs::read(inside(&share.join("file"))).unwrap(), b"shared");
    // The state directory (its sockets) at a short path of its own.
    assert!(inside(&cfg.kernel).exists() && root.join("vm/qmp.sock").exists());
    assert!(!inside(&cfg.state_dir).exists());
    assert!(root.join("usr/bin").is_dir() && root.join("dev/null").exists());
    // Nothing else of the host: no /sys, /root, /home, secrets or other files here, and of
    // /proc only process directories (no sysctls), read-only.
    for absent in [
        "proc/sys",
        "proc/sysrq-trigger",
        "proc/kcore",
        "sys/kernel",
        "root",
        "home",
        "etc/shadow",
        "etc/passwd",
        "run",
    ] {
        assert!(!root.join(absent).exists(), "{absent} is visible to qemu");
    }
    let mut beside = fs::read_dir(inside(&scratch.0))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    beside.sort();
    assert!(!beside.contains(&"qemu.log".to_string()), "{beside:?}");
    // The share is data: a device node made in it cannot be opened through it.
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let share_mount = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == share.to_str())
        .unwrap_or_else(|| panic!("no mount of the share in\n{mountinfo}"));
    assert!(
        share_mount.contains("nodev") && share_mount.contains("nosuid"),
        "{share_mount}"
    );
    let proc_mount = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/proc"))
        .unwrap_or_else(|| panic!("no /proc in\n{mountinfo}"));
    assert!(
        proc_mount.contains(" ro,") && proc_mount.contains("subset=pid"),
        "{proc_mount}"
    );

    // The 9p file capabilities and nothing else: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
    // MKNOD, SETFCAP.
    let nine_p = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4 | 1 << 27 | 1 << 31;
    assert_eq!(cap_set(pid, "CapBnd:"), nine_p);
    assert_eq!(cap_set(pid, "CapEff:"), nine_p);
    // Not root: a user of its own, without supplementary groups.
    let uid = ids(pid, "Uid:");
    assert!(
        uid.iter().all(|&u| u == uid[0] && u >= 0x6000_0000),
        "{uid:?}"
    );
    assert_eq!(ids(pid, "Gid:"), uid);
    assert!(ids(pid, "Groups:").is_empty());

    // The guest still boots and answers.
    let client = agent(vm.take_agent_channel().unwrap(), &scratch);
    let pong = client.request(Request::Ping, REQUEST_TIMEOUT).unwrap();
    assert!(matches!(pong, ResponseBody::Pong { .. }), "{pong:?}");
    vm.stop(Duration::ZERO).unwrap();
    drop(vm);
    assert!(scratch.processes().is_empty(), "qemu still running");
}

#[test]
fn a_vm_without_shares_keeps_one_capability_and_jail_off_runs_qemu_as_before() {
    let scratch = Scratch::new("nocaps");
    let vm = QemuDriver::new()
        .start(&config(&scratch, "nocaps"))
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    // Only DAC_OVERRIDE, to open root's files bound in (/dev/kvm, disks, its state dir).
    assert_eq!(cap_set(vm.pid(), "CapBnd:"), 1 << 1);
    assert_eq!(cap_set(vm.pid(), "CapEff:"), 1 << 1);
    assert_ne!(ids(vm.pid(), "Uid:")[0], 0);
    drop(vm);

    let mut cfg = config(&scratch, "nojail");
    cfg.parameters.insert("jail".into(), "off".into());
    let vm = QemuDriver::new()
        .start(&cfg)
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    assert_eq!(
        fs::read_link(format!("/proc/{}/ns/mnt", vm.pid())).unwrap(),
        fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    drop(vm);
    assert!(scratch.processes().is_empty(), "qemu still running");
}
