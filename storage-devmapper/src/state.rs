//! What the pool holds (`pool_dir/pool.json`): thin ids, bases, snapshots.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default)]
pub struct PoolState {
    /// The next free thin device id (24 bits in dm-thin).
    pub next_id: u32,
    /// base key -> thin id.
    pub bases: BTreeMap<String, Base>,
    /// container id -> its snapshot.
    pub containers: BTreeMap<String, Snapshot>,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default)]
pub struct Base {
    pub thin_id: u32,
    pub sectors: u64,
    pub rootfs: PathBuf,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default)]
pub struct Snapshot {
    pub thin_id: u32,
    pub base: String,
    pub name: String,
}

const FILE: &str = "pool.json";

impl PoolState {
    pub fn alloc_id(&mut self) -> Result<u32, String> {
        // Id 0 is never used, so a fresh state file cannot collide with a stale one.
        let id = self.next_id.max(1);
        if id >= 1 << 24 {
            return Err("devmapper storage: thin device ids exhausted".into());
        }
        self.next_id = id + 1;
        Ok(id)
    }

    /// The state in `dir`, empty when there is none yet.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join(FILE);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| format!("devmapper storage: {}: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PoolState::default()),
            Err(e) => Err(format!(
                "devmapper storage: reading {}: {e}",
                path.display()
            )),
        }
    }

    /// Replaces the state in `dir` atomically, synced before the rename: the pool's metadata
    /// holds what it records, so after a crash it must not go back to an older version.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        let path = dir.join(FILE);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&json)?;
                f.sync_all()
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(format!("devmapper storage: writing {}: {e}", tmp.display()));
        }
        fs::rename(&tmp, &path)
            .map_err(|e| format!("devmapper storage: renaming {}: {e}", tmp.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn thin_ids_start_at_one_and_grow() {
        let mut s = PoolState::default();
        assert_eq!(s.alloc_id().unwrap(), 1);
        assert_eq!(s.alloc_id().unwrap(), 2);
        s.next_id = 1 << 24;
        assert!(s.alloc_id().is_err());
    }

    #[test]
    fn state_round_trips_through_a_private_file() {
        let scratch = TestDir::new("state");
        let dir = scratch.path();
        assert_eq!(PoolState::load(dir).unwrap(), PoolState::default());
        let mut s = PoolState::default();
        s.alloc_id().unwrap();
        s.bases.insert(
            "k".into(),
            Base {
                thin_id: 1,
                sectors: 8,
                rootfs: "/r".into(),
            },
        );
        s.save(dir).unwrap();
        assert_eq!(PoolState::load(dir).unwrap(), s);
        let mode = fs::metadata(dir.join(FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.join("pool.json.tmp").exists());
        fs::write(dir.join(FILE), "{not json").unwrap();
        let err = PoolState::load(dir).unwrap_err();
        assert!(err.contains("pool.json"), "{err}");
    }
}
