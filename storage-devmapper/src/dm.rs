//! Device-mapper itself, through the `devicemapper` crate's ioctls on `/dev/mapper/control`.
//!
//! udev: the crate synchronises with udev (a SysV semaphore cookie that udev's
//! `95-dm-notify.rules` releases) only where udev runs, and skips it where `/run/udev/control`
//! is missing (since 0.34.8). Devices are created with [`DmOptions::private`]'s udev flags:
//! udev's subsystem, disk and "other" rules leave the containers' disks alone (no blkid probe,
//! no `/dev/disk/by-uuid` links, which would clash since every snapshot carries its base's
//! filesystem UUID), while device-mapper's own rules still make `/dev/mapper/<name>` where
//! udev runs. Where it does not, [`crate::node`] makes the node.

use std::io;
use std::path::PathBuf;

use devicemapper::{DM, DevId, DmError, DmName, DmOptions};

use crate::names::valid_name;
use crate::node;

pub const DM_CONTROL: &str = "/dev/mapper/control";

pub struct Dm(DM);

/// One line for a device-mapper error: the crate's text for a failed ioctl carries both
/// ioctl headers in Debug form, so only the errno is kept.
fn describe(what: &str, e: DmError) -> String {
    let reason = match &e {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
            io::Error::from(**errno).to_string()
        }
        _ => e.to_string(),
    };
    format!("devmapper storage: {what}: {reason}")
}

/// The errno of a failed ioctl, if that is what `e` is.
fn errno(e: &DmError) -> Option<i32> {
    match e {
        DmError::Core(devicemapper::errors::Error::Ioctl(_, _, _, errno)) => {
            io::Error::from(**errno).raw_os_error()
        }
        _ => None,
    }
}

fn dm_name(n: &str) -> Result<&DmName, String> {
    valid_name(n)?;
    DmName::new(n).map_err(|e| format!("devmapper storage: name {n:?}: {e}"))
}

impl Dm {
    pub fn open() -> Result<Self, String> {
        DM::new()
            .map(Dm)
            .map_err(|e| describe(&format!("opening {DM_CONTROL}"), e))
    }

    /// Whether a device named `n` exists (loaded or not).
    pub fn exists(&self, n: &str) -> Result<bool, String> {
        match self.0.device_info(&DevId::Name(dm_name(n)?)) {
            Ok(_) => Ok(true),
            Err(e) if errno(&e) == Some(nix::libc::ENXIO) => Ok(false),
            Err(e) => Err(describe(&format!("looking up {n}"), e)),
        }
    }

    /// Creates, loads and resumes a device with one target, and returns its /dev/mapper node.
    /// A device that fails to load is removed again.
    pub fn activate(
        &self,
        n: &str,
        sectors: u64,
        target: &str,
        params: String,
    ) -> Result<PathBuf, String> {
        let name = dm_name(n)?;
        let id = DevId::Name(name);
        self.0
            .device_create(name, None, DmOptions::private())
            .map_err(|e| describe(&format!("creating {n}"), e))?;
        let table = [(0, sectors, target.to_string(), params)];
        let loaded = self
            .0
            .table_load(&id, &table, DmOptions::private())
            .and_then(|_| self.0.device_suspend(&id, DmOptions::private()));
        let info = match loaded {
            Ok(info) => info,
            Err(e) => {
                let _ = self.0.device_remove(&id, DmOptions::private());
                return Err(describe(&format!("loading {n} ({target})"), e));
            }
        };
        let dev = info.device();
        node::make(n, dev.major, dev.minor)
    }

    /// Removes the device `n`, if it exists, and its /dev/mapper node.
    pub fn deactivate(&self, n: &str) -> Result<(), String> {
        if self.exists(n)? {
            self.0
                .device_remove(&DevId::Name(dm_name(n)?), DmOptions::private())
                .map_err(|e| describe(&format!("removing {n}"), e))?;
        }
        node::remove(n)
    }

    /// Sends `msg` to the target of device `n` (a thin pool's `create_thin`, `delete`, ...).
    pub fn message(&self, n: &str, msg: &str) -> Result<(), String> {
        self.0
            .target_msg(&DevId::Name(dm_name(n)?), None, msg)
            .map(drop)
            .map_err(|e| describe(&format!("message {msg:?} to {n}"), e))
    }

    /// The names of the targets this kernel has (loaded modules).
    pub fn targets(&self) -> Result<Vec<String>, String> {
        self.0
            .list_versions()
            .map(|v| v.into_iter().map(|(name, ..)| name).collect())
            .map_err(|e| describe("listing targets", e))
    }
}
