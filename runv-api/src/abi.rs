//! The types that cross the plugin boundary. Everything here is `#[repr(C)]` and `StableAbi`.

// `#[sabi_trait]` expands to impls that this lint flags; they are abi_stable's, not ours.
#![allow(non_local_definitions)]

use abi_stable::{
    StableAbi, declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, RResult, RStr, RString, RVec},
};

use crate::Capabilities;

#[repr(u8)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Debug)]
pub enum PluginKind {
    Hypervisor,
    Storage,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hypervisor => "hypervisor",
            Self::Storage => "storage",
        }
    }
}

/// Who a driver is and what it can do.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginInfo {
    pub kind: PluginKind,
    /// Short name used with `--driver` / `--storage`, e.g. `qemu`.
    pub name: RString,
    pub version: RString,
    pub description: RString,
    pub capabilities: Capabilities,
}

/// Whether a driver can run on this host; when not, a reason a person can act on.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct Probe {
    pub available: bool,
    pub reason: RString,
}

/// How a VM ended.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct VmExit {
    /// Exit code of the hypervisor (process), when it exited normally.
    pub code: i32,
    /// Signal that killed the hypervisor process, or 0.
    pub signal: i32,
    /// e.g. "guest powered off", "killed by SIGKILL".
    pub description: RString,
}

/// Host resources a VM uses.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmStats {
    /// Resident set size of the host processes that make up the VM, in bytes.
    pub host_rss_bytes: u64,
    /// Proportional set size of those processes, in bytes (0 when unknown).
    pub host_pss_bytes: u64,
    /// Guest RAM configured, in bytes.
    pub guest_memory_bytes: u64,
}

/// A hypervisor driver, as seen through the ABI.
#[sabi_trait]
pub trait HypervisorDriverAbi: Send + Sync {
    fn describe(&self) -> PluginInfo;
    fn probe(&self) -> Probe;
    /// `config_json` is a [`crate::VmConfig`] in JSON.
    #[sabi(last_prefix_field)]
    fn start_vm(&self, config_json: RStr<'_>) -> RResult<VmHandleBox, RString>;
}

/// A running VM, as seen through the ABI. Methods take `&self` so that one thread can `wait`
/// while others pause or stop it.
#[sabi_trait]
pub trait VmHandleAbi: Send + Sync {
    /// Hands over the agent channel (a connected byte stream) as an owned file descriptor.
    /// Only the first call succeeds.
    fn take_agent_fd(&self) -> RResult<i32, RString>;
    fn console_log(&self) -> RString;
    fn pause(&self) -> RResult<(), RString>;
    fn resume(&self) -> RResult<(), RString>;
    /// Asks the VM to power off; kills it when it has not after `timeout_ms`.
    fn stop(&self, timeout_ms: u64) -> RResult<(), RString>;
    /// Blocks until the VM has ended.
    fn wait(&self) -> RResult<VmExit, RString>;
    fn pids(&self) -> RVec<u32>;
    fn stats(&self) -> RResult<VmStats, RString>;
    #[sabi(last_prefix_field)]
    fn save(&self, path: RStr<'_>) -> RResult<(), RString>;
}

/// A storage driver, as seen through the ABI.
#[sabi_trait]
pub trait StorageDriverAbi: Send + Sync {
    fn describe(&self) -> PluginInfo;
    fn probe(&self) -> Probe;
    /// `request_json` is a [`crate::StorageRequest`]; the result a [`crate::PreparedRootfs`].
    fn prepare(&self, request_json: RStr<'_>) -> RResult<RString, RString>;
    /// Undoes `prepare` for a container; `request_json` is the same request.
    #[sabi(last_prefix_field)]
    fn cleanup(&self, request_json: RStr<'_>) -> RResult<(), RString>;
}

pub type HypervisorDriverBox = HypervisorDriverAbi_TO<'static, RBox<()>>;
pub type VmHandleBox = VmHandleAbi_TO<'static, RBox<()>>;
pub type StorageDriverBox = StorageDriverAbi_TO<'static, RBox<()>>;

/// The root module every plugin exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    pub kind: PluginKind,
    pub new_hypervisor: extern "C" fn() -> RResult<HypervisorDriverBox, RString>,
    #[sabi(last_prefix_field)]
    pub new_storage: extern "C" fn() -> RResult<StorageDriverBox, RString>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "runv_plugin";
    const NAME: &'static str = "runv_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
