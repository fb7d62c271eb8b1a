//! Configurations passed across the boundary as versioned JSON. Every field has a default so
//! that a plugin and a core of different patch versions understand each other.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const VM_CONFIG_VERSION: u32 = 1;

/// What to boot.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct VmConfig {
    pub version: u32,
    /// A name for the VM, unique on the host (the container id).
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub kernel_params: String,
    pub shared_dirs: Vec<SharedDir>,
    pub block_devices: Vec<BlockDevice>,
    pub network_interfaces: Vec<NetInterface>,
    /// A private directory for the VM's sockets and files; removed by the core.
    pub state_dir: PathBuf,
    /// Where the guest console goes.
    pub console_log: PathBuf,
    /// Where the driver writes its own diagnostics (e.g. the hypervisor's stderr).
    pub log_file: Option<PathBuf>,
    /// Driver-specific settings, e.g. `accel=tcg` (from `--accel` or the spec's
    /// `vm.hypervisor.parameters`).
    pub parameters: BTreeMap<String, String>,
    /// Set to boot a template VM: the guest RAM lives in this file, mapped shared, so that
    /// `save` leaves it there and writes only the device state. Only given to drivers with the
    /// `snapshot` capability. A shared directory or network interface whose host side is not
    /// known yet (a template has no container) has an empty `host_path` / `tap`.
    pub memory_file: Option<PathBuf>,
    /// Set to start the VM from the template in this directory (files
    /// [`TEMPLATE_MEMORY_FILE`] and [`TEMPLATE_STATE_FILE`]) instead of booting it; the rest
    /// of the config gives the clone's host-side settings (sockets, shares, taps). The core
    /// sets it only for drivers with the `snapshot` capability: a plugin built before this
    /// field existed ignores it, and it does not claim that capability.
    pub restore_from: Option<PathBuf>,
}

/// The guest RAM of a template, in its directory (see [`VmConfig::memory_file`]).
pub const TEMPLATE_MEMORY_FILE: &str = "memory";
/// The device state of a template, written by `save` into the template's directory.
pub const TEMPLATE_STATE_FILE: &str = "state";

/// A host directory shared into the guest, mounted there by tag.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct SharedDir {
    pub tag: String,
    pub host_path: PathBuf,
    pub readonly: bool,
}

/// A host file or block device given to the guest as a disk.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct BlockDevice {
    /// Identifier the guest sees as the disk serial.
    pub id: String,
    pub host_path: PathBuf,
    pub readonly: bool,
}

/// A network interface: a host tap device that the driver connects to a guest NIC.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct NetInterface {
    pub tap: String,
    pub mac: String,
    pub mtu: u32,
}

/// What a storage driver is asked to prepare.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct StorageRequest {
    pub version: u32,
    pub container_id: String,
    /// The bundle's rootfs directory (absolute).
    pub rootfs: PathBuf,
    pub readonly: bool,
    /// The container's private directory; the driver may keep its files under it.
    pub state_dir: PathBuf,
    pub options: BTreeMap<String, String>,
}

/// Where a prepared rootfs is.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RootfsSource {
    /// A directory to share into the VM.
    SharedDir { path: PathBuf },
    /// A block device or image file holding a file system of `fs_type`.
    Block { path: PathBuf, fs_type: String },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PreparedRootfs {
    #[serde(flatten)]
    pub source: RootfsSource,
    #[serde(default)]
    pub readonly: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_json_without_new_fields_still_parses() {
        let cfg: VmConfig = serde_json::from_str(r#"{"version":1,"vcpus":2}"#).unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert!(cfg.shared_dirs.is_empty());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let cfg: VmConfig =
            serde_json::from_str(r#"{"version":2,"memory_mib":64,"from_the_future":true}"#)
                .unwrap();
        assert_eq!(cfg.memory_mib, 64);
    }

    #[test]
    fn prepared_rootfs_round_trips() {
        let p = PreparedRootfs {
            source: RootfsSource::Block {
                path: "/dev/mapper/x".into(),
                fs_type: "ext4".into(),
            },
            readonly: true,
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""kind":"block""#), "{json}");
        assert_eq!(serde_json::from_str::<PreparedRootfs>(&json).unwrap(), p);
    }
}
