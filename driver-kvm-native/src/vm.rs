//! Building a VM from a [`VmConfig`] and running it inside the calling process. Restoring
//! one from a template is in [`crate::restore`], saving one in [`crate::save`].

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use runv_api::{Vm, VmConfig, VmExit, VmStats};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, MmioDevice};
use crate::boot::{self, BootSpec};
use crate::control::{self, Control};
use crate::cpu;
use crate::devices::{Bus, MmioSlot};
use crate::event_loop::EventLoop;
use crate::exit::ExitReason;
use crate::layout;
use crate::memory::{self, Backing};
use crate::vcpu;
use crate::virtio::{self, MmioTransport};

/// The virtio-mmio register offset of QueueNotify.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// The most vCPUs this driver gives a guest (APIC ids fit a byte; the MADT lists them all).
pub const MAX_VCPUS: u32 = 64;
/// How long a forced stop waits for the vCPUs to leave KVM_RUN.
const KICK_TIMEOUT: Duration = Duration::from_secs(5);

/// The kernel command line this driver needs, before the core's parameters.
pub fn kernel_cmdline(extra: &str) -> String {
    let mut line = String::from(
        // ttyS0 is the console log; the agent talks over the virtio console (hvc0) and ends
        // the VM by rebooting, which reaches the i8042 reset line (`reboot=k`).
        "console=ttyS0 8250.nr_uarts=1 reboot=k panic=-1 pci=off \
         runv.exit=reboot runv.channel=/dev/hvc0",
    );
    let extra = extra.trim();
    if !extra.is_empty() {
        line.push(' ');
        line.push_str(extra);
    }
    line
}

#[derive(Default)]
struct Outcome {
    exit: Option<ExitReason>,
}

struct Shared {
    control: Arc<Control>,
    outcome: Mutex<Outcome>,
    ended: Condvar,
    /// What `save` reads; the supervisor takes it once the VM's threads are gone.
    machine: Mutex<Option<Machine>>,
}

impl Shared {
    fn outcome(&self) -> MutexGuard<'_, Outcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn machine(&self) -> MutexGuard<'_, Option<Machine>> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The VM's kernel objects and devices. The fields drop in this order, which matters: the
/// vCPUs and the VM go before the guest memory they point into.
pub(crate) struct Machine {
    pub(crate) vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    pub(crate) vm: VmFd,
    pub(crate) kvm: Kvm,
    pub(crate) bus: Arc<Bus>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) memory_mib: u64,
    /// The guest RAM is a template's memory file (mapped shared): only then can `save`
    /// make a template, whose RAM is that file.
    pub(crate) ram_in_file: bool,
    /// Held, not read: the devices have their own handles, and this one keeps the RAM mapped
    /// until everything above is gone.
    pub(crate) _mem: GuestMemoryMmap,
}

/// A VM built (booting or restored) and not yet running.
pub(crate) struct Built {
    pub(crate) machine: Machine,
    pub(crate) control: Arc<Control>,
    pub(crate) agent: UnixStream,
}

pub struct KvmVm {
    shared: Arc<Shared>,
    agent: runv_api::AgentChannel,
    console_log: PathBuf,
    memory_bytes: u64,
    vcpus: usize,
    vcpu_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

pub(crate) fn kvm_err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every VM of this driver needs from its config, booted or restored.
pub(crate) fn check_config(config: &VmConfig) -> Result<u8, String> {
    let templated = config.memory_file.is_some() || config.restore_from.is_some();
    if !config.shared_dirs.is_empty() && templated {
        return Err(
            "a kvm-native template or clone cannot share host directories (virtio-fs \
             needs the guest RAM shared with virtiofsd, a clone's is private): give it a \
             block rootfs"
                .into(),
        );
    }
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(format!(
            "{} vCPUs asked for; the kvm-native driver runs 1..={MAX_VCPUS}",
            config.vcpus
        ));
    }
    Ok(config.vcpus as u8)
}

/// The devices on the virtio-mmio bus, in bus order: the console (the agent channel), each
/// disk, each NIC. A template's disks and NICs have no host side yet (empty path or tap):
/// they become an empty disk slot and a NIC without a tap, which its clones fill.
pub(crate) fn devices_for(
    config: &VmConfig,
    agent_guest: UnixStream,
    control: &Arc<Control>,
) -> Result<Vec<Box<dyn virtio::VirtioDevice>>, String> {
    let template = config.memory_file.is_some() && config.restore_from.is_none();
    let mut devices: Vec<Box<dyn virtio::VirtioDevice>> =
        vec![Box::new(virtio::Console::new(agent_guest)?)];
    for disk in &config.block_devices {
        if template && disk.host_path.as_os_str().is_empty() {
            devices.push(Box::new(virtio::Block::empty(&disk.id)?));
            continue;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.readonly)
            .open(&disk.host_path)
            .map_err(|e| format!("opening the disk {}: {e}", disk.host_path.display()))?;
        devices.push(Box::new(virtio::Block::new(file, disk.readonly, &disk.id)?));
    }
    for (i, share) in config.shared_dirs.iter().enumerate() {
        devices.push(Box::new(share_device(config, i, share, control)?));
    }
    for nic in &config.network_interfaces {
        let mac = crate::tap::parse_mac(&nic.mac)?;
        let mtu = u16::try_from(nic.mtu).unwrap_or(u16::MAX);
        let tap = if template && nic.tap.is_empty() {
            None
        } else {
            Some(crate::tap::open(&nic.tap)?)
        };
        devices.push(Box::new(virtio::Net::new(tap, mac, mtu)));
    }
    Ok(devices)
}

/// The virtio-fs device for a shared directory, with its daemon.
fn share_device(
    config: &VmConfig,
    index: usize,
    share: &runv_api::SharedDir,
    control: &Arc<Control>,
) -> Result<virtio::Fs, String> {
    let binary = crate::virtiofsd::find(config.parameters.get("virtiofsd").map(String::as_str))
        .unwrap_or_else(|| {
            Err(format!(
                "sharing {} needs virtiofsd, which this host lacks (or {} is off)",
                share.host_path.display(),
                crate::virtiofsd::ENV
            ))
        })?;
    let socket = config.state_dir.join(format!("fs{index}.sock"));
    virtio::Fs::new(
        &share.tag,
        &share.host_path,
        share.readonly,
        &virtio::FsBackend {
            binary: &binary,
            socket: &socket,
            log: config.log_file.as_deref(),
        },
        control.clone(),
    )
}

/// Puts `devices` on the bus: a window, a GSI (irqfd) and a queue-notify ioeventfd per queue
/// each. `transport` makes each device's transport (new, or restored from its saved state).
pub(crate) fn attach(
    vm: &VmFd,
    devices: Vec<Box<dyn virtio::VirtioDevice>>,
    mut transport: impl FnMut(
        usize,
        Box<dyn virtio::VirtioDevice>,
        Arc<EventFd>,
    ) -> Result<MmioTransport, String>,
) -> Result<(Vec<MmioSlot>, Vec<MmioDevice>), String> {
    let mut slots = Vec::new();
    let mut described = Vec::new();
    for (index, device) in devices.into_iter().enumerate() {
        let (base, gsi) = layout::virtio_slot(index)?;
        let irq = Arc::new(EventFd::new(nix::libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
        vm.register_irqfd(&irq, gsi)
            .map_err(kvm_err("registering a virtio irqfd"))?;
        let transport = transport(index, device, irq)?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(
                event,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                queue as u32,
            )
            .map_err(kvm_err("registering a virtqueue ioeventfd"))?;
        }
        described.push(MmioDevice {
            base,
            size: layout::VIRTIO_MMIO_SIZE,
            gsi,
        });
        slots.push(MmioSlot {
            base,
            size: layout::VIRTIO_MMIO_STRIDE,
            transport: Arc::new(Mutex::new(transport)),
        });
    }
    Ok((slots, described))
}

/// COM1's output (the console log, appended to) and its interrupt line.
pub(crate) fn com1(vm: &VmFd, config: &VmConfig) -> Result<(File, Arc<EventFd>), String> {
    let console = File::options()
        .create(true)
        .append(true)
        .open(&config.console_log)
        .map_err(|e| {
            format!(
                "opening the console log {}: {e}",
                config.console_log.display()
            )
        })?;
    let irq = Arc::new(EventFd::new(nix::libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
    vm.register_irqfd(&irq, layout::SERIAL_GSI)
        .map_err(kvm_err("registering the serial irqfd"))?;
    Ok((console, irq))
}

impl KvmVm {
    /// Boots a VM; with [`VmConfig::memory_file`], a template VM whose RAM is that file.
    pub fn start(config: &VmConfig) -> Result<Self, String> {
        let vcpu_count = check_config(config)?;
        control::install_kick_handler()?;

        let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
        let ranges = layout::ram_ranges(config.memory_mib)?;
        let backing = match &config.memory_file {
            Some(path) => Backing::Template(path),
            None if !config.shared_dirs.is_empty() => Backing::Shared,
            None => Backing::Anonymous,
        };
        // Before the VM, so that on an early return it is dropped after the VM.
        let mem = memory::guest_memory(config.memory_mib, backing)?;
        let vm = new_vm(&kvm)?;
        // SAFETY: `mem` goes into the `Machine`, which drops it only after `vm` (and on an
        // error return it outlives `vm`, declared after it).
        unsafe { register_memory(&vm, &mem) }?;

        let control = Arc::new(Control::default());
        let (agent_host, agent_guest) =
            UnixStream::pair().map_err(|e| format!("socketpair for the agent channel: {e}"))?;
        let devices = devices_for(config, agent_guest, &control)?;
        let (slots, described) = attach(&vm, devices, |_, device, irq| {
            MmioTransport::new(device, mem.clone(), irq)
        })?;

        let tables = acpi::build(layout::ACPI_ADDR, vcpu_count, &described)?;
        acpi::write(&mem, &tables)?;
        let cmdline = kernel_cmdline(&config.kernel_params);
        let entry = boot::load(
            &mem,
            &ranges,
            &BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                rsdp_addr: tables.rsdp_addr,
            },
        )?;
        cpu::write_boot_tables(&mem, entry)?;

        let (console, com1_irq) = com1(&vm, config)?;
        let transports: Vec<_> = slots.iter().map(|s| s.transport.clone()).collect();
        let bus = Arc::new(Bus::new(console, com1_irq, control.clone(), slots));

        let vcpus = (0..vcpu_count)
            .map(|i| vcpu::create(&kvm, &vm, i, vcpu_count, entry).map(|v| Arc::new(Mutex::new(v))))
            .collect::<Result<Vec<_>, _>>()?;
        Self::launch(
            Built {
                machine: Machine {
                    vcpus,
                    vm,
                    kvm,
                    bus,
                    transports,
                    memory_mib: config.memory_mib,
                    ram_in_file: config.memory_file.is_some(),
                    _mem: mem,
                },
                control,
                agent: agent_host,
            },
            config,
        )
    }

    /// Starts the threads of a built VM: a vCPU thread each, the device thread, and the
    /// supervisor that tears the VM down once something asks it to end.
    pub(crate) fn launch(built: Built, config: &VmConfig) -> Result<Self, String> {
        let Built {
            machine,
            control,
            agent,
        } = built;
        let vcpu_count = machine.vcpus.len();
        let events = EventLoop::new(machine.transports.clone())?;
        let stop_events = events.stop_event();
        let bus = machine.bus.clone();
        let vcpu_fds = machine.vcpus.clone();
        let shared = Arc::new(Shared {
            control: control.clone(),
            outcome: Mutex::new(Outcome::default()),
            ended: Condvar::new(),
            machine: Mutex::new(Some(machine)),
        });
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(f)
                .map_err(|e| format!("starting thread {name}: {e}"))
        };
        let filters = crate::sandbox::filters()?;
        let (device_filter, device_control) = (filters.devices, control.clone());
        let event_thread = spawn(
            "kvm-devices".into(),
            Box::new(move || match crate::sandbox::apply(&device_filter) {
                Ok(()) => events.run(),
                Err(e) => device_control.request_exit(crate::exit::ExitReason::HostError(format!(
                    "device thread: {e}"
                ))),
            }),
        )?;
        let mut threads = Vec::new();
        for (i, fd) in vcpu_fds.into_iter().enumerate() {
            let (bus, vcpu_control) = (bus.clone(), control.clone());
            let filter = filters.vcpu.clone();
            let run = move || vcpu::run(fd, i as u8, bus, vcpu_control, &filter);
            match spawn(format!("kvm-vcpu{i}"), Box::new(run)) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    control.request_exit(ExitReason::HostError(e.clone()));
                    control.kick_until(&threads, KICK_TIMEOUT, |running, _| running == 0);
                    let _ = stop_events.write(1);
                    return Err(e);
                }
            }
        }
        drop(bus);
        let vcpu_threads = Arc::new(Mutex::new(threads));

        // The supervisor: once something asks the VM to end, get every vCPU out of KVM_RUN,
        // stop the device thread, and free the VM (its memory and fds go with the machine).
        let supervisor_shared = shared.clone();
        let supervisor_threads = vcpu_threads.clone();
        spawn(
            "kvm-supervisor".into(),
            Box::new(move || {
                let reason = supervisor_shared.control.wait_exit_requested();
                let threads: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&supervisor_threads));
                supervisor_shared
                    .control
                    .kick_until(&threads, KICK_TIMEOUT, |running, _| running == 0);
                for t in threads {
                    let _ = t.join();
                }
                let _ = stop_events.write(1);
                let _ = event_thread.join();
                drop(supervisor_shared.machine().take());
                supervisor_shared.outcome().exit = Some(reason);
                supervisor_shared.ended.notify_all();
            }),
        )?;

        Ok(Self {
            shared,
            agent: runv_api::AgentChannel::new(OwnedFd::from(agent)),
            console_log: config.console_log.clone(),
            memory_bytes: config.memory_mib << 20,
            vcpus: vcpu_count,
            vcpu_threads,
        })
    }

    /// Waits up to `timeout` for the VM to have ended.
    fn wait_ended(&self, timeout: Duration) -> bool {
        let outcome = self.shared.outcome();
        let (outcome, _) = self
            .shared
            .ended
            .wait_timeout_while(outcome, timeout, |o| o.exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        outcome.exit.is_some()
    }

    /// Runs `f` on the machine of a VM that has not ended.
    pub(crate) fn with_machine<T>(
        &self,
        f: impl FnOnce(&Machine) -> Result<T, String>,
    ) -> Result<T, String> {
        match self.shared.machine().as_ref() {
            Some(m) => f(m),
            None => Err("the VM has ended".into()),
        }
    }
}

/// A KVM VM with the in-kernel IOAPIC, PIC, local APICs and PIT.
pub fn new_vm(kvm: &Kvm) -> Result<VmFd, String> {
    let vm = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR)
        .map_err(kvm_err("setting the TSS address"))?;
    vm.create_irq_chip().map_err(kvm_err(
        "creating the in-kernel IOAPIC, PIC and local APICs",
    ))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("creating the in-kernel PIT"))?;
    Ok(vm)
}

/// Hands every region of `mem` to KVM as a memory slot.
///
/// # Safety
///
/// `mem` must stay mapped as long as `vm` exists: the guest reads and writes it.
pub unsafe fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), String> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| format!("guest memory region {slot}: {e}"))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`, which
        // the caller keeps mapped for as long as the VM exists.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("registering guest memory with KVM"))?;
    }
    Ok(())
}

impl Vm for KvmVm {
    fn take_agent_channel(&self) -> Result<OwnedFd, String> {
        self.agent.take()
    }

    fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    fn pause(&self) -> Result<(), String> {
        let control = &self.shared.control;
        control.set_paused(true);
        let threads = lock(&self.vcpu_threads);
        let n = self.vcpus;
        if control.kick_until(&threads, KICK_TIMEOUT, |running, parked| {
            parked == running && running <= n
        }) {
            Ok(())
        } else {
            control.set_paused(false);
            Err("the vCPUs did not stop within 5 s".into())
        }
    }

    fn resume(&self) -> Result<(), String> {
        // Devices a save froze serve the guest again before it runs.
        let _ = self.with_machine(|m| {
            for t in &m.transports {
                lock(t).thaw();
            }
            Ok(())
        });
        self.shared.control.set_paused(false);
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<(), String> {
        crate::save::save(self, dir)
    }

    /// The graceful part is the core's (it asks the agent to end the guest, which reboots);
    /// after `timeout` the VM is stopped from outside.
    fn stop(&self, timeout: Duration) -> Result<(), String> {
        if self.wait_ended(timeout) {
            return Ok(());
        }
        self.shared.control.request_exit(ExitReason::StoppedByHost);
        if self.wait_ended(KICK_TIMEOUT * 2) {
            Ok(())
        } else {
            Err("the VM's vCPUs did not stop".into())
        }
    }

    fn wait(&self) -> Result<VmExit, String> {
        let outcome = self.shared.outcome();
        let outcome = self
            .shared
            .ended
            .wait_while(outcome, |o| o.exit.is_none())
            .unwrap_or_else(|e| e.into_inner());
        let reason = outcome.exit.clone().unwrap_or(ExitReason::StoppedByHost);
        Ok(VmExit {
            code: i32::from(!reason.is_clean()),
            signal: 0,
            description: reason.to_string().into(),
        })
    }

    /// The VMM is this process; only the virtio-fs daemons are processes of their own.
    fn pids(&self) -> Vec<u32> {
        self.with_machine(|m| {
            Ok(m.transports
                .iter()
                .filter_map(|t| lock(t).device_process())
                .collect())
        })
        .unwrap_or_default()
    }

    fn stats(&self) -> Result<VmStats, String> {
        if self.shared.outcome().exit.is_some() {
            return Err("the VM has exited".into());
        }
        let text = std::fs::read_to_string("/proc/self/smaps_rollup")
            .map_err(|e| format!("reading /proc/self/smaps_rollup: {e}"))?;
        let (rss, pss) = runv_api::parse_smaps_rollup(&text);
        Ok(VmStats {
            host_rss_bytes: rss,
            host_pss_bytes: pss,
            guest_memory_bytes: self.memory_bytes,
        })
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.shared.control.request_exit(ExitReason::StoppedByHost);
        self.wait_ended(KICK_TIMEOUT * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_console_channel_and_exit() {
        let line = kernel_cmdline("  quiet ");
        assert!(line.starts_with("console=ttyS0 "));
        assert!(line.contains("runv.channel=/dev/hvc0"));
        assert!(line.contains("runv.exit=reboot") && line.contains("reboot=k"));
        assert!(line.ends_with(" quiet"));
        assert!(!kernel_cmdline("").ends_with(' '));
    }
}
