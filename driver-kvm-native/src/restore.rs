//! Starting a VM from a template instead of booting it: the template's RAM file mapped
//! private, KVM's interrupt controllers, PIT and clock, each vCPU, COM1 and the virtio
//! devices put back from the state file, around the clone's own host side (its agent socket,
//! console log, disks and taps). The guest then runs on where the template was paused.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_ioctls::Kvm;
use runv_api::VmConfig;

use crate::control::{self, Control};
use crate::devices::Bus;
use crate::memory::{self, Backing};
use crate::snapshot::vcpu_state::{self, Features};
use crate::snapshot::{VmState, vm_state};
use crate::virtio::{MmioTransport, TYPE_BLOCK, TYPE_CONSOLE, net::TYPE_NET};
use crate::vm::{
    Built, KvmVm, Machine, attach, check_config, com1, devices_for, kvm_err, lock, new_vm,
    register_memory,
};

pub fn restore(config: &VmConfig, template_dir: &Path) -> Result<KvmVm, String> {
    let vcpu_count = check_config(config)?;
    let state = VmState::read(template_dir)?;
    if state.memory_mib != config.memory_mib || state.vcpus.len() != usize::from(vcpu_count) {
        return Err(format!(
            "the template is a VM of {} vCPUs and {} MiB, this one has {} and {} MiB",
            state.vcpus.len(),
            state.memory_mib,
            vcpu_count,
            config.memory_mib
        ));
    }
    control::install_kick_handler()?;
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let memory_file = template_dir.join(runv_api::TEMPLATE_MEMORY_FILE);
    let mem = memory::guest_memory(config.memory_mib, Backing::Clone(&memory_file))?;
    let vm = new_vm(&kvm)?;
    // SAFETY: `mem` goes into the `Machine`, which drops it only after `vm` (and on an error
    // return it outlives `vm`, declared after it).
    unsafe { register_memory(&vm, &mem) }?;
    vm_state::restore(&vm, &state.kvm)?;

    // The vCPUs before the devices: a restored device may raise an interrupt, which needs the
    // local APICs in their saved state to land in.
    let features = Features::of(&kvm);
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (i, saved) in state.vcpus.iter().enumerate() {
        let index = i as u8;
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err(&format!("creating vCPU {index}")))?;
        vcpu_state::restore(&fd, index, saved, features)?;
        vcpus.push(Arc::new(Mutex::new(fd)));
    }

    let control = Arc::new(Control::default());
    let (agent_host, agent_guest) =
        UnixStream::pair().map_err(|e| format!("socketpair for the agent channel: {e}"))?;
    let devices = devices_for(config, agent_guest, &control)?;
    let ours: Vec<u32> = devices.iter().map(|d| d.device_type()).collect();
    let theirs: Vec<u32> = state.devices.iter().map(|d| d.device_type).collect();
    if ours != theirs {
        return Err(format!(
            "the template has {}, this VM has {}",
            describe(&theirs),
            describe(&ours)
        ));
    }
    let (slots, _) = attach(&vm, devices, |index, device, irq| {
        MmioTransport::restore(device, mem.clone(), irq, &state.devices[index])
            .map_err(|e| format!("virtio device {index}: {e}"))
    })?;
    let (console, com1_irq) = com1(&vm, config)?;
    let transports: Vec<_> = slots.iter().map(|s| s.transport.clone()).collect();
    let serial = (&state.serial).into();
    let bus = Arc::new(Bus::restore(
        console,
        com1_irq,
        control.clone(),
        slots,
        &serial,
    )?);
    for t in &transports {
        lock(t).raise_owed_interrupts();
    }
    KvmVm::launch(
        Built {
            machine: Machine {
                vcpus,
                vm,
                kvm,
                bus,
                transports,
                memory_mib: config.memory_mib,
                // A clone's RAM is a private copy: what it writes is in no file.
                ram_in_file: false,
                _mem: mem,
            },
            control,
            agent: agent_host,
        },
        config,
    )
}

/// "a console, 1 disk and 2 NICs".
fn describe(types: &[u32]) -> String {
    let count = |t: u32| types.iter().filter(|&&x| x == t).count();
    let other = types
        .iter()
        .filter(|t| ![TYPE_CONSOLE, TYPE_BLOCK, TYPE_NET].contains(t))
        .count();
    let mut s = format!(
        "{} console(s), {} disk(s) and {} NIC(s)",
        count(TYPE_CONSOLE),
        count(TYPE_BLOCK),
        count(TYPE_NET)
    );
    if other > 0 {
        s.push_str(&format!(" and {other} other device(s)"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_sets_are_described() {
        assert_eq!(
            describe(&[TYPE_CONSOLE, TYPE_BLOCK, TYPE_NET, TYPE_NET]),
            "1 console(s), 1 disk(s) and 2 NIC(s)"
        );
        assert_eq!(
            describe(&[9]),
            "0 console(s), 0 disk(s) and 0 NIC(s) and 1 other device(s)"
        );
    }
}
