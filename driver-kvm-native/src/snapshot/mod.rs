//! The saved state of a paused VM (a template's `state` file): every vCPU, the in-kernel
//! interrupt controllers, PIT and clock, COM1 and the virtio-mmio devices. Guest RAM is not in
//! it: a template's RAM is its memory file (see [`crate::memory`]).
//!
//! One JSON document, written atomically (a temporary file renamed into place) and versioned:
//! a file of another format or version is refused, not guessed at. It is untrusted input on
//! the way back in: every size is checked before KVM or a device sees it.

pub mod blob;
pub mod vcpu_state;
pub mod vm_state;

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use crate::virtio::state::TransportState;
pub use vcpu_state::VcpuState;
pub use vm_state::KvmState;

/// What the `format` field says: this driver's state, not another's.
pub const FORMAT: &str = "runv-kvm-native-vm-state";
/// Bumped whenever the meaning of a field changes.
pub const VERSION: u32 = 1;
/// A state file is a few tens of KiB per vCPU: anything far larger is not ours.
const MAX_STATE_BYTES: u64 = 16 << 20;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub format: String,
    pub version: u32,
    pub memory_mib: u64,
    pub vcpus: Vec<VcpuState>,
    pub kvm: KvmState,
    pub serial: SerialSnapshot,
    /// In bus order: the console, the disks, the NICs.
    pub devices: Vec<TransportState>,
}

/// COM1's registers (vm-superio's `SerialState`, which has no serde of its own).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl VmState {
    /// Writes the state to `dir/state` atomically: a reader finds the old file or the whole
    /// new one.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(runv_api::TEMPLATE_STATE_FILE);
        let tmp = dir.join(format!(".{}.tmp", runv_api::TEMPLATE_STATE_FILE));
        let json = serde_json::to_vec(self).map_err(|e| format!("encoding the VM state: {e}"))?;
        let result = (|| -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("writing the VM state {}: {e}", path.display())
        })
    }

    /// Reads and checks `dir/state`: format, version, and counts this driver can use.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(runv_api::TEMPLATE_STATE_FILE);
        let what = |e: String| format!("the VM state {}: {e}", path.display());
        let len = fs::metadata(&path).map_err(|e| what(e.to_string()))?.len();
        if len > MAX_STATE_BYTES {
            return Err(what(format!(
                "{len} bytes, more than {MAX_STATE_BYTES} (not a state file)"
            )));
        }
        let bytes = fs::read(&path).map_err(|e| what(e.to_string()))?;
        Self::parse(&bytes).map_err(what)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        // The header first, so that another format or version is named as such rather than
        // reported as a missing field.
        #[derive(Deserialize)]
        struct Header {
            format: Option<String>,
            version: Option<u32>,
        }
        let header: Header =
            serde_json::from_slice(bytes).map_err(|e| format!("not a VM state: {e}"))?;
        if header.format.as_deref() != Some(FORMAT) {
            return Err(format!(
                "format {:?}, expected {FORMAT:?}",
                header.format.unwrap_or_default()
            ));
        }
        if header.version != Some(VERSION) {
            let found = header.version.map_or("missing".into(), |v| v.to_string());
            return Err(format!(
                "version {found}, this driver reads version {VERSION}: remove the template and \
                 make it again"
            ));
        }
        let state: Self = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if state.vcpus.is_empty() || state.vcpus.len() > crate::vm::MAX_VCPUS as usize {
            return Err(format!(
                "{} vCPUs, expected 1 to {}",
                state.vcpus.len(),
                crate::vm::MAX_VCPUS
            ));
        }
        let most = crate::layout::max_virtio_devices();
        if state.devices.is_empty() || state.devices.len() > most {
            return Err(format!(
                "{} devices, expected 1 to {most}",
                state.devices.len()
            ));
        }
        crate::layout::ram_ranges(state.memory_mib)?;
        Ok(state)
    }
}
