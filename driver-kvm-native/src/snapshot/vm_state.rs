//! The VM-wide state KVM keeps in the kernel: the two PICs and the IOAPIC, the PIT, and the
//! KVM clock (the guest's kvmclock time base).

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data, kvm_irqchip,
    kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::blob::Blob;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KvmState {
    pub pic_master: Blob,
    pub pic_slave: Blob,
    pub ioapic: Blob,
    pub pit: Blob,
    /// The kvmclock value (ns) at save. Restored as it is: the clone's monotonic clock goes
    /// on from the template's instead of jumping by the template's age (its wall clock is set
    /// by the agent from the host's).
    pub clock_ns: u64,
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "the master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "the slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "the IOAPIC"),
];

pub fn save(vm: &VmFd) -> Result<KvmState, String> {
    let mut chips = Vec::with_capacity(CHIPS.len());
    for (id, name) in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|e| format!("reading {name}: {e}"))?;
        chips.push(Blob::of(&chip));
    }
    let pit = vm.get_pit2().map_err(|e| format!("reading the PIT: {e}"))?;
    let clock = vm
        .get_clock()
        .map_err(|e| format!("reading the KVM clock: {e}"))?;
    let [pic_master, pic_slave, ioapic] = <[Blob; 3]>::try_from(chips).expect("three chips");
    Ok(KvmState {
        pic_master,
        pic_slave,
        ioapic,
        pit: Blob::of(&pit),
        clock_ns: clock.clock,
    })
}

/// Loads `state` into a VM made by [`crate::vm::new_vm`], before its vCPUs run.
pub fn restore(vm: &VmFd, state: &KvmState) -> Result<(), String> {
    let blobs = [&state.pic_master, &state.pic_slave, &state.ioapic];
    let mut chips = Vec::with_capacity(CHIPS.len());
    for ((id, name), blob) in CHIPS.into_iter().zip(blobs) {
        let chip: kvm_irqchip = blob.to(name)?;
        // The id decides which chip KVM writes: it must be the one this blob was read from.
        if chip.chip_id != id {
            return Err(format!(
                "{name}: the state file holds chip {} in its place",
                chip.chip_id
            ));
        }
        chips.push((chip, name));
    }
    let pit: kvm_pit_state2 = state.pit.to("the PIT")?;
    vm.set_pit2(&pit)
        .map_err(|e| format!("setting the PIT: {e}"))?;
    for (chip, name) in &chips {
        vm.set_irqchip(chip)
            .map_err(|e| format!("setting {name}: {e}"))?;
    }
    // No flags: KVM_CLOCK_REALTIME would move the clock on by the time since the save.
    let clock = kvm_clock_data {
        clock: state.clock_ns,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(|e| format!("setting the KVM clock: {e}"))
}
