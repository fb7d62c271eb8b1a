//! One thread per vCPU: configure it, then run it until the VM ends.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::boot::Entry;
use crate::control::{self, Control};
use crate::cpu;
use crate::devices::Bus;
use crate::exit::ExitReason;

/// KVM_SYSTEM_EVENT types (include/uapi/linux/kvm.h).
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Creates vCPU `index` of `count` and loads its boot state: the boot vCPU enters the kernel,
/// the others wait for the kernel's INIT/SIPI in the in-kernel local APIC.
pub fn create(kvm: &Kvm, vm: &VmFd, index: u8, count: u8, entry: Entry) -> Result<VcpuFd, String> {
    let what = |step: &str, e: kvm_ioctls::Error| format!("vCPU {index}: {step}: {e}");
    let vcpu = vm
        .create_vcpu(u64::from(index))
        .map_err(|e| what("creating", e))?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| what("reading the supported CPUID", e))?;
    vcpu.set_cpuid2(&cpu::cpuid(supported, index, count))
        .map_err(|e| what("setting CPUID", e))?;
    let msrs = cpu::boot_msrs()?;
    let written = vcpu.set_msrs(&msrs).map_err(|e| what("setting MSRs", e))?;
    if written != msrs.as_slice().len() {
        return Err(format!(
            "vCPU {index}: KVM took {written} of {} boot MSRs",
            msrs.as_slice().len()
        ));
    }
    let lapic = vcpu.get_lapic().map_err(|e| what("reading the LAPIC", e))?;
    vcpu.set_lapic(&cpu::lapic_lints(lapic))
        .map_err(|e| what("setting the LAPIC", e))?;
    if index == 0 {
        vcpu.set_fpu(&cpu::fpu())
            .map_err(|e| what("setting the FPU", e))?;
        vcpu.set_regs(&cpu::regs(entry))
            .map_err(|e| what("setting registers", e))?;
        let sregs = vcpu
            .get_sregs()
            .map_err(|e| what("reading segment registers", e))?;
        vcpu.set_sregs(&cpu::sregs(sregs, entry))
            .map_err(|e| what("setting segment registers", e))?;
    }
    Ok(vcpu)
}

/// Runs the vCPU until the VM ends, then says why if it was this vCPU that ended it.
///
/// The fd sits behind a mutex so that `save` can read the vCPU's state from another thread
/// while this one is parked (the thread's seccomp filter allows no ioctl but KVM_RUN). Before
/// parking for a pause, the vCPU finishes the port or MMIO access of its last exit (see
/// [`drain`]): KVM completes it only on the next KVM_RUN, and until then the registers do not
/// say it happened.
pub fn run(
    vcpu: Arc<Mutex<VcpuFd>>,
    index: u8,
    bus: Arc<Bus>,
    control: Arc<Control>,
    filter: &seccompiler::BpfProgram,
) {
    control::unblock_kick();
    control.vcpu_started();
    if let Err(e) = crate::sandbox::apply(filter) {
        control.request_exit(ExitReason::HostError(format!("vCPU {index}: {e}")));
    }
    while control.vcpu_may_run(|| drain(&mut lock(&vcpu), index, &bus, &control)) {
        let mut fd = lock(&vcpu);
        let result = fd.run();
        handle(result, index, &bus, &control);
    }
    control.vcpu_stopped();
}

fn lock(vcpu: &Mutex<VcpuFd>) -> MutexGuard<'_, VcpuFd> {
    vcpu.lock().unwrap_or_else(|e| e.into_inner())
}

/// Completes a pending port or MMIO access without running guest code: KVM_RUN with
/// `immediate_exit` finishes it and returns EINTR, unless finishing it needs another exit
/// (the next element of a `rep ins`), which is served here in turn.
pub fn drain(vcpu: &mut VcpuFd, index: u8, bus: &Bus, control: &Control) {
    vcpu.set_kvm_immediate_exit(1);
    loop {
        match vcpu.run() {
            Err(e) if e.errno() == nix::libc::EINTR || e.errno() == nix::libc::EAGAIN => break,
            Err(e) => {
                handle(Err(e), index, bus, control);
                break;
            }
            exit => handle(exit, index, bus, control),
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

fn handle(
    result: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    index: u8,
    bus: &Bus,
    control: &Control,
) {
    match result {
        Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
        Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
        Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
        Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
        Ok(VcpuExit::Hlt) => control.request_exit(ExitReason::Halted { vcpu: index }),
        Ok(VcpuExit::Shutdown) => control.request_exit(ExitReason::TripleFault { vcpu: index }),
        Ok(VcpuExit::SystemEvent(kind, _)) => control.request_exit(match kind {
            SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestPoweredOff,
            SYSTEM_EVENT_RESET => ExitReason::GuestRebooted,
            SYSTEM_EVENT_CRASH => ExitReason::GuestCrashed,
            other => ExitReason::GuestSystemEvent(other),
        }),
        Ok(VcpuExit::FailEntry(reason, cpu)) => control.request_exit(ExitReason::FailEntry {
            vcpu: cpu,
            hardware_reason: reason,
        }),
        Ok(VcpuExit::InternalError) => {
            control.request_exit(ExitReason::InternalError { vcpu: index })
        }
        Ok(VcpuExit::Intr) => {}
        Ok(other) => control.request_exit(ExitReason::Unexpected {
            vcpu: index,
            exit: format!("{other:?}"),
        }),
        Err(e) if e.errno() == nix::libc::EINTR || e.errno() == nix::libc::EAGAIN => {
            // A kick: loop around to look at the run state.
        }
        Err(e) => control.request_exit(ExitReason::KvmRun {
            vcpu: index,
            error: e.to_string(),
        }),
    }
}
