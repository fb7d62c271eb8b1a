//! Container state under `--root`: `<root>/<id>/state.json` (the OCI state plus runv's own
//! details), written atomically and changed under a file lock. A dead monitor reads as
//! `stopped`, whatever the file says.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::container_id;

pub const DEFAULT_ROOT: &str = "/run/runv";
pub const STATE_FILE: &str = "state.json";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const LOCK_FILE: &str = "lock";

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// runv's details beside the OCI fields.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct RunvDetails {
    pub driver: String,
    pub driver_file: String,
    pub storage: Option<String>,
    pub rootfs: String,
    /// Start time of the monitor (field 22 of /proc/PID/stat), to tell a reused PID apart.
    pub monitor_start_time: u64,
    pub exit_status: Option<i32>,
    pub console_log: String,
    pub vm_pids: Vec<u32>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct ContainerState {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    /// The monitor's PID (stands for the container on the host).
    pub pid: i32,
    pub bundle: String,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// RFC 3339.
    pub created: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub runv: RunvDetails,
}

impl ContainerState {
    /// The status as the world sees it: a container whose monitor is gone is stopped.
    pub fn effective_status(&self) -> Status {
        match self.status {
            Status::Stopped => Status::Stopped,
            _ if self.pid > 0 && process_alive(self.pid, self.runv.monitor_start_time) => {
                self.status
            }
            Status::Creating if self.pid == 0 => Status::Creating,
            _ => Status::Stopped,
        }
    }

    /// runc's `state` JSON.
    pub fn to_runc_json(&self) -> serde_json::Value {
        let status = self.effective_status();
        let pid = if status == Status::Stopped {
            0
        } else {
            self.pid
        };
        serde_json::json!({
            "ociVersion": self.oci_version,
            "id": self.id,
            "pid": pid,
            "status": status.as_str(),
            "bundle": self.bundle,
            "rootfs": self.runv.rootfs,
            "created": self.created,
            "owner": self.owner,
            "annotations": self.annotations,
            "runv": self.runv,
        })
    }

    /// The OCI state handed to hooks on stdin.
    pub fn to_oci_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": self.oci_version,
            "id": self.id,
            "status": self.effective_status().as_str(),
            "pid": self.pid,
            "bundle": self.bundle,
            "annotations": self.annotations,
        })
    }
}

/// Start time of a process (clock ticks since boot), or None if it does not exist.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn process_state_char(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

pub fn process_alive(pid: i32, start_time: u64) -> bool {
    match process_start_time(pid) {
        Some(t) if start_time == 0 || t == start_time => process_state_char(pid) != Some('Z'),
        _ => false,
    }
}

#[derive(Clone)]
pub struct Store {
    root: PathBuf,
}

/// A held lock on one container's state; released on drop.
pub struct Locked {
    _lock: Flock<File>,
}

impl Store {
    pub fn new(root: Option<&Path>) -> Self {
        Store {
            root: root.map_or_else(|| PathBuf::from(DEFAULT_ROOT), Path::to_path_buf),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Makes the container's directory; fails if the id is taken.
    pub fn create_dir(&self, id: &str) -> anyhow::Result<PathBuf> {
        container_id::validate(id)?;
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating state root {}", self.root.display()))?;
        let dir = self.dir(id);
        match fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container with id {id:?} already exists")
            }
            Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }

    pub fn lock(&self, id: &str) -> anyhow::Result<Locked> {
        let path = self.dir(id).join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))?;
        Ok(Locked { _lock: lock })
    }

    pub fn load(&self, id: &str) -> anyhow::Result<ContainerState> {
        container_id::validate(id)?;
        let path = self.dir(id).join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container {id:?} does not exist")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn save(&self, state: &ContainerState) -> anyhow::Result<()> {
        let dir = self.dir(&state.id);
        let tmp = dir.join(".state.json.tmp");
        let path = dir.join(STATE_FILE);
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        serde_json::to_writer_pretty(&mut f, state)?;
        f.write_all(b"\n")?;
        f.sync_all().ok();
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Applies `change` to the saved state under the lock.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut ContainerState),
    ) -> anyhow::Result<ContainerState> {
        let _lock = self.lock(id)?;
        let mut state = self.load(id)?;
        change(&mut state);
        self.save(&state)?;
        Ok(state)
    }

    /// Every container id with a state directory.
    pub fn ids(&self) -> anyhow::Result<Vec<String>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.root.display())),
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().join(STATE_FILE).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub fn remove(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_start_time_guards_reuse() {
        let pid = std::process::id() as i32;
        let t = process_start_time(pid).unwrap();
        assert!(process_alive(pid, t));
        assert!(!process_alive(pid, t + 1));
        assert!(!process_alive(i32::MAX, 0));
    }

    #[test]
    fn dead_monitor_reads_as_stopped() {
        let state = ContainerState {
            oci_version: "1.1.0".into(),
            id: "x".into(),
            status: Status::Running,
            pid: i32::MAX,
            bundle: "/b".into(),
            annotations: HashMap::new(),
            created: String::new(),
            owner: String::new(),
            runv: RunvDetails::default(),
        };
        assert_eq!(state.effective_status(), Status::Stopped);
        assert_eq!(state.to_runc_json()["pid"], 0);
    }
}
