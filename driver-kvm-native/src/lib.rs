//! The native KVM hypervisor driver for runv: an in-process VMM on rust-vmm crates.
//!
//! The VM runs inside the calling process (the container's monitor): one thread per vCPU,
//! one device thread, one supervisor that tears the VM down when it ends.
//!
//! * Boot: an ELF vmlinux through its PVH entry, or a bzImage through the 64-bit boot
//!   protocol (`linux-loader`); the kernel console goes to COM1 (`vm-superio`), which the
//!   console log receives.
//! * Devices: virtio-mmio (`virtio-queue`), described to the kernel by ACPI tables
//!   (`acpi_tables`) because the stock Debian kernel cannot take them from its command line:
//!   a virtio console (hvc0) is the agent channel, one virtio-blk per block device (the
//!   rootfs found by its serial), one virtio-net per tap the core made, one virtio-fs per
//!   shared directory where `virtiofsd` is installed ([`virtiofsd`]; elsewhere, and for
//!   templates, the core turns a directory rootfs into an image for this driver).
//! * The guest ends the VM by rebooting (`runv.exit=reboot`, `reboot=k`): the i8042 reset.
//! * pause/resume park the vCPUs between two KVM_RUNs.
//! * The vCPU and device threads run under seccomp allow-lists ([`sandbox`]).
//! * Templates ([`save`], [`restore`]): a template VM's RAM is a file mapped shared, `save`
//!   writes the rest of the machine to a state file ([`snapshot`]); a clone maps the file
//!   private and picks up from the state file with its own host side. Its disks go into the
//!   template's empty disk slots (the guest sees their size change).

pub mod acpi;
pub mod boot;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod probe;
pub mod restore;
pub mod sandbox;
pub mod save;
pub mod snapshot;
pub mod tap;
pub mod vcpu;
pub mod virtio;
pub mod virtiofsd;
pub mod vm;

use runv_api::{Capabilities, Hypervisor, PluginInfo, PluginKind, Vm, VmConfig, export_hypervisor};

pub use vm::KvmVm;

/// What this driver can do on any host.
pub const CAPABILITIES: Capabilities = Capabilities::BLOCK_ROOTFS
    .union(Capabilities::PAUSE)
    .union(Capabilities::SNAPSHOT)
    .union(Capabilities::TEMPLATE_DISKS)
    .union(Capabilities::NO_TEMPLATE_SHARES);

/// What this driver can do here: share directories where virtiofsd is installed.
pub fn capabilities() -> Capabilities {
    match virtiofsd::find(None) {
        Some(Ok(_)) => CAPABILITIES.union(Capabilities::SHARED_DIR_ROOTFS),
        _ => CAPABILITIES,
    }
}

pub struct KvmNativeDriver;

impl Hypervisor for KvmNativeDriver {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Hypervisor,
            name: "kvm-native".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "in-process VMM on rust-vmm crates (KVM only)".into(),
            capabilities: capabilities(),
        }
    }

    fn probe(&self) -> Result<(), String> {
        probe::probe_host()
    }

    fn start_vm(&self, config: VmConfig) -> Result<Box<dyn Vm>, String> {
        Ok(Box::new(KvmVm::start(&config)?))
    }

    fn restore_vm(
        &self,
        config: VmConfig,
        template_dir: &std::path::Path,
    ) -> Result<Box<dyn Vm>, String> {
        Ok(Box::new(restore::restore(&config, template_dir)?))
    }
}

export_hypervisor!(|| Ok(KvmNativeDriver));
