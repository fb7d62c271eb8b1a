//! The stable plugin ABI between the `runv` core and its driver plugins.
//!
//! A plugin is a `cdylib` named `librunv_<kind>_<name>.so` that depends on this crate alone and
//! exports one root module ([`PluginModuleRef`]) with [`export_hypervisor!`] or
//! [`export_storage!`]. Plugin authors implement the plain Rust traits [`Hypervisor`], [`Vm`]
//! and [`Storage`]; the adapters in this crate turn them into `abi_stable` trait objects, catch
//! every panic at the boundary and return it as an error, so a buggy plugin cannot abort the core.
//!
//! # ABI version policy
//!
//! The ABI version is this crate's package version, checked by `abi_stable` when the core loads
//! a plugin (in addition to a structural check of every type that crosses the boundary):
//!
//! * While the version is `0.y.z`, `y` is the major version: a plugin must be rebuilt against the
//!   same `0.y` as the core. A plugin built against another `0.y` is rejected with
//!   `IncompatibleVersionNumber`; one whose types differ is rejected with `AbiInstability`.
//! * abi_stable 0.11 accepts a plugin only when its `0.y.z` has the core's `y` and a `z` at
//!   least the core's, and only when every vtable and prefix type has at least the fields the
//!   core's has (a vtable with fewer methods is refused: "too many fields", checked with
//!   `tests/fixtures/prev-api`). So bumping `z` or appending a trait-object method turns every
//!   older plugin away: both are major changes here, whatever abi_stable's docs suggest.
//! * What old plugins must survive is therefore added to the versioned JSON (new fields with
//!   defaults) behind a capability bit the old plugin does not claim. Templates came that
//!   way: [`VmConfig::memory_file`] and [`VmConfig::restore_from`], used only with
//!   [`Capabilities::SNAPSHOT`], with `Vm::save` that was in the vtable from the start.
//!   `runv-cli/tests/plugin_discovery.rs` loads and cold-starts a plugin built against the
//!   runv-api before templates (`tests/fixtures/prev-api`).
//! * Capability bits are only ever added; an unknown bit is ignored by older cores.

mod abi;
mod adapter;
mod capabilities;
mod client;
mod config;
mod host;
pub mod tap;
pub mod vmm_process;

pub use abi::{
    HypervisorDriverAbi_TO, HypervisorDriverBox, PluginInfo, PluginKind, PluginModule,
    PluginModuleRef, Probe, StorageDriverAbi_TO, StorageDriverBox, VmExit, VmHandleAbi_TO,
    VmHandleBox, VmStats,
};
pub use adapter::{Hypervisor, Storage, Vm, hypervisor_box, storage_box};
pub use capabilities::Capabilities;
pub use client::{HypervisorClient, StorageClient, VmClient};
pub use config::{
    BlockDevice, NetInterface, PreparedRootfs, RootfsSource, SharedDir, StorageRequest,
    TEMPLATE_MEMORY_FILE, TEMPLATE_STATE_FILE, VM_CONFIG_VERSION, VmConfig,
};
pub use host::{
    AgentChannel, cpuinfo_has_virt_flag, find_in_path, find_program, parse_smaps_rollup,
};

/// Re-exported so that plugins use exactly the `abi_stable` this crate was built with.
pub use abi_stable;

/// Exports a hypervisor plugin's root module. `$ctor` is an expression of type
/// `fn() -> Result<T, String>` where `T: Hypervisor`.
#[macro_export]
macro_rules! export_hypervisor {
    ($ctor:expr) => {
        #[$crate::abi_stable::export_root_module]
        pub fn runv_plugin_root_module() -> $crate::PluginModuleRef {
            extern "C" fn new_hypervisor() -> $crate::abi_stable::std_types::RResult<
                $crate::HypervisorDriverBox,
                $crate::abi_stable::std_types::RString,
            > {
                $crate::hypervisor_box($ctor).into()
            }
            extern "C" fn new_storage() -> $crate::abi_stable::std_types::RResult<
                $crate::StorageDriverBox,
                $crate::abi_stable::std_types::RString,
            > {
                $crate::abi_stable::std_types::RErr("not a storage plugin".into())
            }
            $crate::abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix(
                $crate::PluginModule {
                    kind: $crate::PluginKind::Hypervisor,
                    new_hypervisor,
                    new_storage,
                },
            )
        }
    };
}

/// Exports a storage plugin's root module. `$ctor` is an expression of type
/// `fn() -> Result<T, String>` where `T: Storage`.
#[macro_export]
macro_rules! export_storage {
    ($ctor:expr) => {
        #[$crate::abi_stable::export_root_module]
        pub fn runv_plugin_root_module() -> $crate::PluginModuleRef {
            extern "C" fn new_hypervisor() -> $crate::abi_stable::std_types::RResult<
                $crate::HypervisorDriverBox,
                $crate::abi_stable::std_types::RString,
            > {
                $crate::abi_stable::std_types::RErr("not a hypervisor plugin".into())
            }
            extern "C" fn new_storage() -> $crate::abi_stable::std_types::RResult<
                $crate::StorageDriverBox,
                $crate::abi_stable::std_types::RString,
            > {
                $crate::storage_box($ctor).into()
            }
            $crate::abi_stable::prefix_type::PrefixTypeTrait::leak_into_prefix(
                $crate::PluginModule {
                    kind: $crate::PluginKind::Storage,
                    new_hypervisor,
                    new_storage,
                },
            )
        }
    };
}
