//! Building a VM from a [`VmConfig`] and running it inside the calling process.

use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
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
}

impl Shared {
    fn outcome(&self) -> MutexGuard<'_, Outcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct KvmVm {
    shared: Arc<Shared>,
    agent: runv_api::AgentChannel,
    console_log: PathBuf,
    memory_bytes: u64,
    vcpus: usize,
    vcpu_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

fn kvm_err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl KvmVm {
    pub fn start(config: &VmConfig) -> Result<Self, String> {
        if !config.shared_dirs.is_empty() {
            return Err(
                "the kvm-native driver cannot share host directories (it has no 9p or \
                 virtio-fs device): give the container a block rootfs"
                    .into(),
            );
        }
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(format!(
                "{} vCPUs asked for; the kvm-native driver runs 1..={MAX_VCPUS}",
                config.vcpus
            ));
        }
        let vcpu_count = config.vcpus as u8;
        control::install_kick_handler()?;

        let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
        let vm = new_vm(&kvm)?;

        let ranges = layout::ram_ranges(config.memory_mib)?;
        let mem = layout::guest_memory(config.memory_mib)?;
        // SAFETY: the supervisor thread owns `mem` and drops it only after `vm`.
        unsafe { register_memory(&vm, &mem) }?;

        let control = Arc::new(Control::default());
        let (agent_host, agent_guest) =
            UnixStream::pair().map_err(|e| format!("socketpair for the agent channel: {e}"))?;

        let mut devices: Vec<Box<dyn virtio::VirtioDevice>> =
            vec![Box::new(virtio::Console::new(agent_guest)?)];
        for disk in &config.block_devices {
            let file = OpenOptions::new()
                .read(true)
                .write(!disk.readonly)
                .open(&disk.host_path)
                .map_err(|e| format!("opening the disk {}: {e}", disk.host_path.display()))?;
            devices.push(Box::new(virtio::Block::new(file, disk.readonly, &disk.id)?));
        }
        for nic in &config.network_interfaces {
            let mac = crate::tap::parse_mac(&nic.mac)?;
            let mtu = u16::try_from(nic.mtu).unwrap_or(u16::MAX);
            devices.push(Box::new(virtio::Net::new(
                crate::tap::open(&nic.tap)?,
                mac,
                mtu,
            )));
        }
        let mut slots = Vec::new();
        let mut described = Vec::new();
        for (index, device) in devices.into_iter().enumerate() {
            let (base, gsi) = layout::virtio_slot(index)?;
            let irq = Arc::new(EventFd::new(nix::libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
            vm.register_irqfd(&irq, gsi)
                .map_err(kvm_err("registering a virtio irqfd"))?;
            let transport = MmioTransport::new(device, mem.clone(), irq)?;
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
        let com1_irq = Arc::new(EventFd::new(nix::libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
        vm.register_irqfd(&com1_irq, layout::SERIAL_GSI)
            .map_err(kvm_err("registering the serial irqfd"))?;
        let transports: Vec<_> = slots.iter().map(|s| s.transport.clone()).collect();
        let bus = Arc::new(Bus::new(console, com1_irq, control.clone(), slots));

        let vcpus = (0..vcpu_count)
            .map(|i| vcpu::create(&kvm, &vm, i, vcpu_count, entry))
            .collect::<Result<Vec<_>, _>>()?;

        let events = EventLoop::new(transports)?;
        let stop_events = events.stop_event();
        let shared = Arc::new(Shared {
            control: control.clone(),
            outcome: Mutex::new(Outcome::default()),
            ended: Condvar::new(),
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
        for (i, fd) in vcpus.into_iter().enumerate() {
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
        let vcpu_threads = Arc::new(Mutex::new(threads));

        // The supervisor: once something asks the VM to end, get every vCPU out of KVM_RUN,
        // stop the device thread, and free the VM (its memory and fds go with `vm`).
        let supervisor_shared = shared.clone();
        let supervisor_threads = vcpu_threads.clone();
        spawn(
            "kvm-supervisor".into(),
            Box::new(move || {
                let reason = supervisor_shared.control.wait_exit_requested();
                let threads: Vec<JoinHandle<()>> = std::mem::take(
                    &mut *supervisor_threads.lock().unwrap_or_else(|e| e.into_inner()),
                );
                supervisor_shared
                    .control
                    .kick_until(&threads, KICK_TIMEOUT, |running, _| running == 0);
                for t in threads {
                    let _ = t.join();
                }
                let _ = stop_events.write(1);
                let _ = event_thread.join();
                drop(bus);
                drop(vm);
                drop(mem);
                supervisor_shared.outcome().exit = Some(reason);
                supervisor_shared.ended.notify_all();
            }),
        )?;

        Ok(Self {
            shared,
            agent: runv_api::AgentChannel::new(OwnedFd::from(agent_host)),
            console_log: config.console_log.clone(),
            memory_bytes: config.memory_mib << 20,
            vcpus: vcpu_count as usize,
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
        let threads = self.vcpu_threads.lock().unwrap_or_else(|e| e.into_inner());
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
        self.shared.control.set_paused(false);
        Ok(())
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

    /// The VMM is this process: there is no separate VMM process to account for or kill.
    fn pids(&self) -> Vec<u32> {
        Vec::new()
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
