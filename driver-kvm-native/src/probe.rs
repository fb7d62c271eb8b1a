//! Whether this host's KVM can run the driver's guests, and why not.

use kvm_ioctls::{Cap, Kvm};

/// The KVM features the VMM relies on.
const REQUIRED: [(Cap, &str); 6] = [
    (Cap::Irqchip, "in-kernel IOAPIC/PIC (KVM_CAP_IRQCHIP)"),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
    (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
    (Cap::Pit2, "in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID (KVM_CAP_EXT_CPUID)"),
];

/// `Ok` when /dev/kvm opens, has every feature the VMM uses, and the CPU has hardware
/// virtualization; else every reason in one line.
pub fn probe_host() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm does not open ({e}): load kvm-intel or kvm-amd, or run where hardware virtualization is available"))?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(cap, _)| !kvm.check_extension(*cap))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!("this KVM lacks {}", missing.join(", ")));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !runv_api::cpuinfo_has_virt_flag(&cpuinfo) {
        return Err(
            "KVM is not usable: the CPU has no vmx/svm flag, so this /dev/kvm (e.g. the \
             kvm_pvm module's) cannot boot a stock kernel"
                .into(),
        );
    }
    Ok(())
}
