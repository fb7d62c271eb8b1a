//! Container state under `--root`: `<root>/<id>/state.json` (the OCI state plus runv's own
//! details), written atomically and changed under a file lock. A dead monitor reads as
//! `stopped`, whatever the file says.
//!
//! Everything here is private to root whatever the caller's umask: directories 0700, files
//! 0600 (the state dir holds the control and VMM sockets, and a world-reachable QMP socket is
//! root's memory for anyone).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::container_id;

pub const DEFAULT_ROOT: &str = "/run/runv";
pub const STATE_FILE: &str = "state.json";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const LOCK_FILE: &str = "lock";
/// Taken by `delete` (not the state lock: the monitor needs that one to record the exit
/// while `delete` waits for it).
const DELETE_LOCK_FILE: &str = "delete.lock";
/// Where the logs of failed creates are kept, under the root. Not a valid place for a
/// container: `create` refuses this id.
pub const FAILED_DIR: &str = ".failed";
/// How many failed creates keep their logs (the root is usually tmpfs, that is RAM).
const FAILED_KEEP: usize = 16;
pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// `state.json` is absent: the container does not exist. runc's wording, which engines
/// (containerd, podman) look for.
#[derive(Debug)]
pub struct NotExist;

impl std::fmt::Display for NotExist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("container does not exist")
    }
}

impl std::error::Error for NotExist {}

/// The state dir exists but its `state.json` is missing, empty or unreadable.
#[derive(Debug)]
pub struct Damaged(pub String);

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Damaged {}

/// Makes `path` a directory with mode 0700 (exactly: the umask cannot widen it, and a
/// stricter umask would leave root without write bits it does not need but tools expect).
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Writes `bytes` to `path` atomically with mode 0600: a temporary file beside it, fsync,
/// rename, fsync of the directory. A crash leaves the old file or the new one, never a
/// truncated one.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a state file needs a name")?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

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
    /// Start times of `vm_pids` (as `monitor_start_time`), so a reused PID is never killed.
    pub vm_start_times: Vec<u64>,
    /// A pod member: the id of the pod's sandbox container, whose VM it runs in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_sandbox: Option<String>,
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

    /// One entry of `list --format json`: exactly runc's fields (annotations only when there
    /// are some, as runc's `omitempty`).
    pub fn to_list_json(&self) -> serde_json::Value {
        let mut j = self.to_runc_json();
        if let Some(obj) = j.as_object_mut() {
            obj.remove("runv");
            if self.annotations.is_empty() {
                obj.remove("annotations");
            }
        }
        j
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
        if id == FAILED_DIR {
            bail!("invalid container id {id:?}: runv keeps the logs of failed creates there");
        }
        // A root we make is root's alone (as runc's); an existing one is left as it is.
        if !self.root.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(&self.root)
                .with_context(|| format!("creating state root {}", self.root.display()))?;
        }
        let dir = self.dir(id);
        match private_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container with given ID already exists: {id}")
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
            .mode(FILE_MODE)
            .open(&path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))?;
        Ok(Locked { _lock: lock })
    }

    /// Serializes `delete`s of one container. None when the container's directory is gone
    /// (before or while waiting: a concurrent delete removed it), so the caller knows there
    /// is nothing left to do.
    pub fn delete_lock(&self, id: &str) -> anyhow::Result<Option<Locked>> {
        use std::os::unix::fs::MetadataExt;
        container_id::validate(id)?;
        if id == FAILED_DIR {
            return Ok(None);
        }
        let path = self.dir(id).join(DELETE_LOCK_FILE);
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("opening lock {}", path.display()));
            }
        };
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))?;
        // The holder before us may have removed the directory, and a new container with the
        // same id may even exist: the lock is ours only if it is still the file at `path`.
        let ours = lock.metadata()?;
        match fs::metadata(&path) {
            Ok(m) if m.dev() == ours.dev() && m.ino() == ours.ino() => {
                Ok(Some(Locked { _lock: lock }))
            }
            _ => Ok(None),
        }
    }

    /// The saved state. Errors: [`NotExist`] when there is no such container, [`Damaged`] when
    /// its directory exists with a missing, empty or corrupt `state.json`.
    pub fn load(&self, id: &str) -> anyhow::Result<ContainerState> {
        container_id::validate(id)?;
        let dir = self.dir(id);
        let path = dir.join(STATE_FILE);
        let hint = format!("`runv delete --force {id}` removes it");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if id == FAILED_DIR || !dir.is_dir() {
                    return Err(NotExist.into());
                }
                return Err(Damaged(format!(
                    "container {id} has no state ({} is missing: a create was interrupted?); {hint}",
                    path.display()
                ))
                .into());
            }
            Err(e) => {
                return Err(Damaged(format!(
                    "container {id}: cannot read {}: {e}; {hint}",
                    path.display()
                ))
                .into());
            }
        };
        serde_json::from_str(&text).map_err(|e| {
            Damaged(format!(
                "container {id}: {} is damaged ({e}); {hint}",
                path.display()
            ))
            .into()
        })
    }

    pub fn save(&self, state: &ContainerState) -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(state)?;
        bytes.push(b'\n');
        write_private(&self.dir(&state.id).join(STATE_FILE), &bytes)
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

    /// Every container id with a state directory, damaged or half-made ones included (they
    /// hold resources until `delete --force`, so they must not be hidden).
    pub fn ids(&self) -> anyhow::Result<Vec<String>> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.root.display())),
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|id| id != FAILED_DIR && container_id::validate(id).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Copies the logs of a container whose create failed to `<root>/.failed/<id>-<time>/`
    /// (its state dir is about to go) and returns that directory, or None if there was no
    /// log worth keeping. Only the last few failures are kept.
    pub fn keep_failed_logs(&self, id: &str) -> Option<PathBuf> {
        let dir = self.dir(id);
        let logs: Vec<PathBuf> = [
            "console.log",
            "console.log.1",
            "hypervisor.log",
            "hypervisor.log.1",
            "monitor.log",
        ]
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() > 0))
        .collect();
        if logs.is_empty() {
            return None;
        }
        let failed = self.root.join(FAILED_DIR);
        if let Err(e) = private_dir(&failed) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                tracing::warn!(
                    "keeping the logs of failed create: {}: {e}",
                    failed.display()
                );
                return None;
            }
        }
        prune_failed(&failed, FAILED_KEEP - 1);
        let stamp = crate::logging::rfc3339_now().replace(':', "");
        let keep = failed.join(format!("{id}-{stamp}"));
        if let Err(e) = private_dir(&keep) {
            tracing::warn!("keeping the logs of failed create: {}: {e}", keep.display());
            return None;
        }
        for log in &logs {
            let Some(name) = log.file_name() else {
                continue;
            };
            let to = keep.join(name);
            let copied = fs::read(log).and_then(|bytes| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(FILE_MODE)
                    .open(&to)?;
                f.write_all(&bytes)
            });
            if let Err(e) = copied {
                tracing::warn!("keeping {}: {e}", log.display());
            }
        }
        Some(keep)
    }

    pub fn remove(&self, id: &str) -> anyhow::Result<()> {
        let dir = self.dir(id);
        // remove_dir_all crosses mount points: a volume still bound here (a monitor killed
        // before its cleanup) would lose its data.
        crate::monitor::volumes::unmount_all_under(&dir);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
}

/// Leaves at most `keep` entries in `failed`, removing the oldest.
fn prune_failed(failed: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(failed) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for (_, path) in dirs.into_iter().take(excess) {
        let _ = fs::remove_dir_all(path);
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

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("runv-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn missing_empty_and_corrupt_state_are_told_apart() {
        let root = scratch("damaged");
        let store = Store::new(Some(&root));
        let err = store.load("nope").unwrap_err();
        assert!(err.downcast_ref::<NotExist>().is_some(), "{err:#}");
        assert_eq!(format!("{err:#}"), "container does not exist");

        let dir = store.create_dir("c1").unwrap();
        let err = store.load("c1").unwrap_err();
        assert!(err.downcast_ref::<Damaged>().is_some(), "{err:#}");
        for text in ["", "{\"id\": ", "\0\0\0"] {
            fs::write(dir.join(STATE_FILE), text).unwrap();
            let err = format!("{:#}", store.load("c1").unwrap_err());
            assert!(
                err.contains("is damaged") && err.contains("delete --force c1"),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        assert_eq!(store.ids().unwrap(), ["c1"]);
        let err = format!("{:#}", store.create_dir("c1").unwrap_err());
        assert!(
            err.contains("container with given ID already exists"),
            "{err}"
        );
        assert!(store.create_dir(FAILED_DIR).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn state_files_and_dirs_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let root = scratch("modes");
        let store = Store::new(Some(&root));
        // umask is process-wide, and other tests create files: only this one changes it,
        // and only to a wider mask, which cannot make their files stricter than they ask.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let dir = store.create_dir("c1");
        let saved = dir
            .as_ref()
            .ok()
            .map(|d| write_private(&d.join("x.json"), b"{}"));
        nix::sys::stat::umask(old);
        let dir = dir.unwrap();
        saved.unwrap().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("x.json")), 0o600);
        assert!(!dir.join(".x.json.tmp").exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_delete_lock_tells_when_the_container_is_gone() {
        let root = scratch("dlock");
        let store = Store::new(Some(&root));
        assert!(store.delete_lock("c1").unwrap().is_none());
        store.create_dir("c1").unwrap();
        let held = store.delete_lock("c1").unwrap();
        assert!(held.is_some());
        let other = {
            let store = store.clone();
            std::thread::spawn(move || store.delete_lock("c1").unwrap().is_some())
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        store.remove("c1").unwrap();
        drop(held);
        assert!(
            !other.join().unwrap(),
            "a waiter must see the container gone"
        );
        // A new container with the same id is not mistaken for the removed one.
        store.create_dir("c1").unwrap();
        assert!(store.delete_lock("c1").unwrap().is_some());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn failed_create_logs_are_kept_privately_and_pruned() {
        let root = scratch("failed");
        let store = Store::new(Some(&root));
        let dir = store.create_dir("c1").unwrap();
        assert!(
            store.keep_failed_logs("c1").is_none(),
            "no logs, nothing kept"
        );
        fs::write(dir.join("console.log"), "guest said bye\n").unwrap();
        let mut kept = Vec::new();
        for _ in 0..FAILED_KEEP + 2 {
            kept.push(store.keep_failed_logs("c1").unwrap());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let last = kept.last().unwrap();
        assert!(last.starts_with(root.join(FAILED_DIR)));
        assert_eq!(
            fs::read_to_string(last.join("console.log")).unwrap(),
            "guest said bye\n"
        );
        let n = fs::read_dir(root.join(FAILED_DIR)).unwrap().count();
        assert!(n <= FAILED_KEEP, "{n} kept");
        assert_eq!(store.ids().unwrap(), ["c1"]);
        fs::remove_dir_all(&root).unwrap();
    }
}
