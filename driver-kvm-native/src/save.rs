//! Saving a VM (a template, once its agent is ready): pause it, freeze its devices so that
//! guest memory stays as it is, and write every vCPU, KVM's interrupt controllers, PIT and
//! clock, COM1 and the virtio devices to the state file. The RAM is already in the template's
//! memory file (mapped shared). The VM stays paused; `resume` thaws it.

use std::path::Path;

use runv_api::Vm;

use crate::snapshot::vcpu_state::{self, Features};
use crate::snapshot::{self, VmState, vm_state};
use crate::vm::{KvmVm, lock};

pub fn save(vm: &KvmVm, dir: &Path) -> Result<(), String> {
    vm.with_machine(|m| {
        if m.ram_in_file {
            Ok(())
        } else {
            Err(
                "this VM's RAM is not in a memory file (it was not started as a template), \
                 so its state alone cannot be restored"
                    .into(),
            )
        }
    })?;
    vm.pause()?;
    let state = vm.with_machine(|m| {
        // Devices first: once frozen they no longer write guest memory or their queues.
        let devices = m
            .transports
            .iter()
            .map(|t| {
                let mut t = lock(t);
                t.freeze();
                t.save()
            })
            .collect();
        let serial = m.bus.serial_state().into();
        let kvm = vm_state::save(&m.vm)?;
        let msr_list = m
            .kvm
            .get_msr_index_list()
            .map_err(|e| format!("reading KVM's MSR list: {e}"))?;
        let features = Features::of(&m.kvm);
        let vcpus = m
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, fd)| vcpu_state::save(&lock(fd), i as u8, msr_list.as_slice(), features))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            format: snapshot::FORMAT.into(),
            version: snapshot::VERSION,
            memory_mib: m.memory_mib,
            vcpus,
            kvm,
            serial,
            devices,
        })
    })?;
    state.write(dir)
}
