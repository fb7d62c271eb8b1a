//! The core's side of the boundary: thin wrappers that turn ABI results into `Result`s and
//! JSON back into typed configs.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use abi_stable::std_types::RStr;

use crate::abi::{HypervisorDriverBox, PluginInfo, StorageDriverBox, VmExit, VmHandleBox, VmStats};
use crate::config::{PreparedRootfs, StorageRequest, VmConfig};

fn probe_to_result(available: bool, reason: String) -> Result<(), String> {
    if available { Ok(()) } else { Err(reason) }
}

pub struct HypervisorClient {
    inner: HypervisorDriverBox,
    info: PluginInfo,
}

impl HypervisorClient {
    pub fn new(inner: HypervisorDriverBox) -> Self {
        let info = inner.describe();
        Self { inner, info }
    }

    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    pub fn probe(&self) -> Result<(), String> {
        let probe = self.inner.probe();
        probe_to_result(probe.available, probe.reason.into())
    }

    pub fn start_vm(&self, config: &VmConfig) -> Result<VmClient, String> {
        let json = serde_json::to_string(config).map_err(|e| format!("encoding VM config: {e}"))?;
        let vm = self
            .inner
            .start_vm(RStr::from_str(&json))
            .into_result()
            .map_err(String::from)?;
        Ok(VmClient { inner: vm })
    }

    /// Starts a VM from a template: `start_vm` with [`VmConfig::restore_from`], asked only of
    /// a driver with the `snapshot` capability (a plugin built before templates existed would
    /// ignore the field and boot).
    pub fn restore_vm(
        &self,
        config: &VmConfig,
        template_dir: &std::path::Path,
    ) -> Result<VmClient, String> {
        if !self
            .info
            .capabilities
            .contains(crate::Capabilities::SNAPSHOT)
        {
            return Err(format!(
                "driver {} does not support restoring a VM from a template (no snapshot \
                 capability)",
                self.info.name
            ));
        }
        let mut config = config.clone();
        config.restore_from = Some(template_dir.to_path_buf());
        self.start_vm(&config)
    }
}

pub struct VmClient {
    inner: VmHandleBox,
}

impl VmClient {
    pub fn take_agent_channel(&self) -> Result<OwnedFd, String> {
        let fd = self
            .inner
            .take_agent_fd()
            .into_result()
            .map_err(String::from)?;
        if fd < 0 {
            return Err(format!("driver returned an invalid agent channel fd {fd}"));
        }
        // SAFETY: the ABI contract hands over ownership of a freshly opened descriptor that the
        // plugin no longer uses; it is wrapped exactly once here.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn console_log(&self) -> PathBuf {
        PathBuf::from(self.inner.console_log().as_str())
    }

    pub fn pause(&self) -> Result<(), String> {
        self.inner.pause().into_result().map_err(String::from)
    }

    pub fn resume(&self) -> Result<(), String> {
        self.inner.resume().into_result().map_err(String::from)
    }

    pub fn stop(&self, timeout: Duration) -> Result<(), String> {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.inner.stop(ms).into_result().map_err(String::from)
    }

    pub fn wait(&self) -> Result<VmExit, String> {
        self.inner.wait().into_result().map_err(String::from)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.inner.pids().into_vec()
    }

    pub fn stats(&self) -> Result<VmStats, String> {
        self.inner.stats().into_result().map_err(String::from)
    }

    pub fn save(&self, path: &std::path::Path) -> Result<(), String> {
        let path = path.to_string_lossy();
        self.inner
            .save(RStr::from_str(&path))
            .into_result()
            .map_err(String::from)
    }
}

pub struct StorageClient {
    inner: StorageDriverBox,
    info: PluginInfo,
}

impl StorageClient {
    pub fn new(inner: StorageDriverBox) -> Self {
        let info = inner.describe();
        Self { inner, info }
    }

    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    pub fn probe(&self) -> Result<(), String> {
        let probe = self.inner.probe();
        probe_to_result(probe.available, probe.reason.into())
    }

    pub fn prepare(&self, request: &StorageRequest) -> Result<PreparedRootfs, String> {
        let json = encode_request(request)?;
        let out = self
            .inner
            .prepare(RStr::from_str(&json))
            .into_result()
            .map_err(String::from)?;
        serde_json::from_str(out.as_str()).map_err(|e| {
            format!(
                "storage driver {} returned invalid JSON: {e}",
                self.info.name
            )
        })
    }

    pub fn cleanup(&self, request: &StorageRequest) -> Result<(), String> {
        let json = encode_request(request)?;
        self.inner
            .cleanup(RStr::from_str(&json))
            .into_result()
            .map_err(String::from)
    }
}

fn encode_request(request: &StorageRequest) -> Result<String, String> {
    serde_json::to_string(request).map_err(|e| format!("encoding storage request: {e}"))
}
