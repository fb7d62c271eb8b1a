//! The plain Rust traits plugin authors implement, and the adapters that expose them through
//! the ABI. Every call is wrapped in `catch_unwind`: a panic inside a plugin becomes an error.

use std::any::Any;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RErr, ROk, RResult, RStr, RString, RVec};

use crate::abi::{
    HypervisorDriverAbi, HypervisorDriverAbi_TO, HypervisorDriverBox, PluginInfo, Probe,
    StorageDriverAbi, StorageDriverAbi_TO, StorageDriverBox, VmExit, VmHandleAbi, VmHandleAbi_TO,
    VmHandleBox, VmStats,
};
use crate::config::{PreparedRootfs, StorageRequest, VmConfig};

/// A hypervisor driver.
pub trait Hypervisor: Send + Sync + 'static {
    fn info(&self) -> PluginInfo;
    /// `Ok` when the driver can start VMs on this host, else why not, in words a person can act
    /// on (e.g. "qemu-system-x86_64 not found in PATH; install the qemu-system-x86 package").
    fn probe(&self) -> Result<(), String>;
    fn start_vm(&self, config: VmConfig) -> Result<Box<dyn Vm>, String>;
    /// Starts a VM from the template in `template_dir` (see [`VmConfig::memory_file`] and
    /// [`Vm::save`]) with `config`'s host-side settings. Drivers with the `snapshot`
    /// capability implement it. It reaches the plugin as `start_vm` with
    /// [`VmConfig::restore_from`] set: no new method in the ABI's vtable (see the crate docs).
    fn restore_vm(&self, _config: VmConfig, _template_dir: &Path) -> Result<Box<dyn Vm>, String> {
        Err("restoring a VM from a template is not supported by this driver".into())
    }
}

/// A running VM.
pub trait Vm: Send + Sync + 'static {
    /// The agent channel, a connected byte stream. Called once.
    fn take_agent_channel(&self) -> Result<OwnedFd, String>;
    fn console_log(&self) -> PathBuf;
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    /// Graceful power-off, forced after `timeout`.
    fn stop(&self, timeout: Duration) -> Result<(), String>;
    fn wait(&self) -> Result<VmExit, String>;
    fn pids(&self) -> Vec<u32>;
    fn stats(&self) -> Result<VmStats, String>;
    /// Writes the device state of the paused-for-it VM into `dir`
    /// ([`crate::TEMPLATE_STATE_FILE`]); the RAM stays in [`VmConfig::memory_file`].
    fn save(&self, _dir: &Path) -> Result<(), String> {
        Err("saving VM state is not supported by this driver".into())
    }
}

/// A storage driver.
pub trait Storage: Send + Sync + 'static {
    fn info(&self) -> PluginInfo;
    fn probe(&self) -> Result<(), String>;
    fn prepare(&self, request: &StorageRequest) -> Result<PreparedRootfs, String>;
    fn cleanup(&self, request: &StorageRequest) -> Result<(), String>;
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(message)) => RErr(message.into()),
        Err(payload) => {
            RErr(format!("{what}: plugin panicked: {}", panic_message(&*payload)).into())
        }
    }
}

fn probe_result(result: RResult<(), RString>) -> Probe {
    match result {
        ROk(()) => Probe {
            available: true,
            reason: RString::new(),
        },
        RErr(reason) => Probe {
            available: false,
            reason,
        },
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, json: RStr<'_>) -> Result<T, String> {
    serde_json::from_str(json.as_str()).map_err(|e| format!("invalid {what} JSON: {e}"))
}

/// Builds the ABI object for a hypervisor plugin; used by [`crate::export_hypervisor!`].
pub fn hypervisor_box<T: Hypervisor>(
    ctor: fn() -> Result<T, String>,
) -> Result<HypervisorDriverBox, RString> {
    let adapter = guarded("creating the driver", || {
        let driver = ctor()?;
        let info = driver.info();
        Ok(HypervisorAdapter { driver, info })
    })
    .into_result()?;
    Ok(HypervisorDriverAbi_TO::from_value(adapter, TD_Opaque))
}

/// Builds the ABI object for a storage plugin; used by [`crate::export_storage!`].
pub fn storage_box<T: Storage>(
    ctor: fn() -> Result<T, String>,
) -> Result<StorageDriverBox, RString> {
    let adapter = guarded("creating the driver", || {
        let driver = ctor()?;
        let info = driver.info();
        Ok(StorageAdapter { driver, info })
    })
    .into_result()?;
    Ok(StorageDriverAbi_TO::from_value(adapter, TD_Opaque))
}

struct HypervisorAdapter<T> {
    driver: T,
    info: PluginInfo,
}

impl<T: Hypervisor> HypervisorDriverAbi for HypervisorAdapter<T> {
    fn describe(&self) -> PluginInfo {
        self.info.clone()
    }

    fn probe(&self) -> Probe {
        probe_result(guarded("probe", || self.driver.probe()))
    }

    fn start_vm(&self, config_json: RStr<'_>) -> RResult<VmHandleBox, RString> {
        guarded("start_vm", || {
            let config: VmConfig = parse_json("VM config", config_json)?;
            let vm = match config.restore_from.clone() {
                Some(dir) => self.driver.restore_vm(config, &dir)?,
                None => self.driver.start_vm(config)?,
            };
            Ok(VmHandleAbi_TO::from_value(VmAdapter { vm }, TD_Opaque))
        })
    }
}

struct VmAdapter {
    vm: Box<dyn Vm>,
}

impl VmHandleAbi for VmAdapter {
    fn take_agent_fd(&self) -> RResult<i32, RString> {
        guarded("take_agent_fd", || {
            Ok(self.vm.take_agent_channel()?.into_raw_fd())
        })
    }

    fn console_log(&self) -> RString {
        guarded("console_log", || Ok(self.vm.console_log()))
            .map(|p| RString::from(p.to_string_lossy().into_owned()))
            .unwrap_or_default()
    }

    fn pause(&self) -> RResult<(), RString> {
        guarded("pause", || self.vm.pause())
    }

    fn resume(&self) -> RResult<(), RString> {
        guarded("resume", || self.vm.resume())
    }

    fn stop(&self, timeout_ms: u64) -> RResult<(), RString> {
        guarded("stop", || self.vm.stop(Duration::from_millis(timeout_ms)))
    }

    fn wait(&self) -> RResult<VmExit, RString> {
        guarded("wait", || self.vm.wait())
    }

    fn pids(&self) -> RVec<u32> {
        guarded("pids", || Ok(self.vm.pids()))
            .map(RVec::from)
            .unwrap_or_default()
    }

    fn stats(&self) -> RResult<VmStats, RString> {
        guarded("stats", || self.vm.stats())
    }

    fn save(&self, path: RStr<'_>) -> RResult<(), RString> {
        guarded("save", || self.vm.save(Path::new(path.as_str())))
    }
}

struct StorageAdapter<T> {
    driver: T,
    info: PluginInfo,
}

impl<T: Storage> StorageDriverAbi for StorageAdapter<T> {
    fn describe(&self) -> PluginInfo {
        self.info.clone()
    }

    fn probe(&self) -> Probe {
        probe_result(guarded("probe", || self.driver.probe()))
    }

    fn prepare(&self, request_json: RStr<'_>) -> RResult<RString, RString> {
        guarded("prepare", || {
            let request: StorageRequest = parse_json("storage request", request_json)?;
            let prepared = self.driver.prepare(&request)?;
            serde_json::to_string(&prepared)
                .map(RString::from)
                .map_err(|e| format!("encoding the prepared rootfs: {e}"))
        })
    }

    fn cleanup(&self, request_json: RStr<'_>) -> RResult<(), RString> {
        guarded("cleanup", || {
            let request: StorageRequest = parse_json("storage request", request_json)?;
            self.driver.cleanup(&request)
        })
    }
}
