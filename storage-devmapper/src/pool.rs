//! The thin pool: activating it (from devices or loop-backed sparse files), making bases,
//! snapshotting them per container, and removing snapshots and unused bases. Every change is
//! made under an exclusive `flock` on `pool_dir/lock` and recorded in `pool.json`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::dm::Dm;
use crate::names::{base_key, base_name, snapshot_name};
use crate::options::{Options, SECTOR};
use crate::state::{Base, PoolState, Snapshot};
use crate::tools;

/// Thin-pool data block size in sectors (64 KiB).
const DATA_BLOCK_SECTORS: u64 = 128;

/// The pool, locked, with its state loaded.
pub struct Pool {
    opts: Options,
    dm: Dm,
    state: PoolState,
    _lock: Flock<fs::File>,
}

/// A private file of `size` bytes, sparse; false when it was there already.
fn sparse_file(path: &Path, size: u64) -> Result<bool, String> {
    let f = match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(format!("creating {}: {e}", path.display())),
    };
    if let Err(e) = f.set_len(size) {
        let _ = fs::remove_file(path);
        return Err(format!("sizing {}: {e}", path.display()));
    }
    Ok(true)
}

/// dm-thin formats a metadata device whose first block is zero.
fn zero_first_block(dev: &Path) -> Result<(), String> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| format!("opening {}: {e}", dev.display()))?;
    nix::sys::uio::pwrite(&f, &[0u8; 4096], 0)
        .map_err(|e| format!("zeroing {}: {e}", dev.display()))?;
    f.sync_all()
        .map_err(|e| format!("syncing {}: {e}", dev.display()))
}

impl Pool {
    /// Locks the pool in `opts.pool_dir` and activates it, making it when there is none.
    pub fn open(opts: Options) -> Result<Self, String> {
        fs::create_dir_all(&opts.pool_dir)
            .map_err(|e| format!("creating {}: {e}", opts.pool_dir.display()))?;
        let lock_path = opts.pool_dir.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("locking {}: {e}", lock_path.display()))?;
        let state = PoolState::load(&opts.pool_dir)?;
        let mut pool = Pool {
            opts,
            dm: Dm::open()?,
            state,
            _lock: lock,
        };
        pool.ensure_active()?;
        Ok(pool)
    }

    /// Whether a pool was ever made in `opts.pool_dir` (nothing to clean up otherwise).
    pub fn was_made(opts: &Options) -> bool {
        opts.pool_dir.join("pool.json").exists()
    }

    fn save(&self) -> Result<(), String> {
        self.state.save(&self.opts.pool_dir)
    }

    /// Loads the pool table unless the pool is active already.
    fn ensure_active(&mut self) -> Result<(), String> {
        if self.dm.exists(&self.opts.pool_name)? {
            return Ok(());
        }
        let (meta, data) = match (&self.opts.metadata_dev, &self.opts.data_dev) {
            (Some(m), Some(d)) => (m.clone(), d.clone()),
            _ => {
                let (mf, df) = (
                    self.opts.pool_dir.join("metadata.img"),
                    self.opts.pool_dir.join("data.img"),
                );
                let new_meta = sparse_file(&mf, self.opts.metadata_size)?;
                sparse_file(&df, self.opts.data_size)?;
                if new_meta {
                    // A new pool: forget bases and snapshots of an older one.
                    self.state = PoolState::default();
                }
                (tools::loop_for(&mf)?, tools::loop_for(&df)?)
            }
        };
        if self.state == PoolState::default() {
            zero_first_block(&meta)?;
        }
        let data_sectors =
            tools::block_size(&data)? / SECTOR / DATA_BLOCK_SECTORS * DATA_BLOCK_SECTORS;
        let params = format!(
            "{} {} {DATA_BLOCK_SECTORS} 0 1 skip_block_zeroing",
            meta.display(),
            data.display()
        );
        self.dm
            .activate(&self.opts.pool_name, data_sectors, "thin-pool", params)?;
        self.save()
    }

    fn message(&self, msg: &str) -> Result<(), String> {
        self.dm.message(&self.opts.pool_name, msg)
    }

    fn thin_params(&self, thin_id: u32) -> String {
        format!("/dev/mapper/{} {thin_id}", self.opts.pool_name)
    }

    /// The key of the base for `rootfs`, made (thin volume + mkfs.ext4 -d) when missing.
    pub fn base(&mut self, rootfs: &Path) -> Result<String, String> {
        let key = base_key(rootfs)?;
        if self.state.bases.contains_key(&key) {
            return Ok(key);
        }
        let n = base_name(&key);
        // Left active by a run that died while making it: its thin device was never recorded.
        self.dm.deactivate(&n)?;
        let thin_id = self.state.alloc_id()?;
        self.save()?;
        self.message(&format!("create_thin {thin_id}"))?;
        let sectors = self.opts.base_size / SECTOR;
        let made = self
            .dm
            .activate(&n, sectors, "thin", self.thin_params(thin_id))
            .and_then(|node| tools::mkfs_ext4_from(rootfs, &node));
        // Bases stay inactive: a snapshot of an inactive origin needs no suspend.
        let deactivated = self.dm.deactivate(&n);
        if let Err(e) = made.and(deactivated) {
            // Fails while the device is still mapped: then the id and its blocks stay taken
            // (the error says why), and the next attempt starts with a new id.
            let _ = self.message(&format!("delete {thin_id}"));
            return Err(format!(
                "devmapper storage: making the base for {}: {e}",
                rootfs.display()
            ));
        }
        self.state.bases.insert(
            key.clone(),
            Base {
                thin_id,
                sectors,
                rootfs: rootfs.into(),
            },
        );
        self.save()?;
        Ok(key)
    }

    fn base_sectors(&self, key: &str) -> Result<u64, String> {
        self.state
            .bases
            .get(key)
            .map(|b| b.sectors)
            .ok_or_else(|| format!("devmapper storage: pool.json names no base {key}"))
    }

    /// The node of `container_id`'s snapshot of base `key`, made and activated when missing.
    pub fn snapshot(&mut self, container_id: &str, key: &str) -> Result<PathBuf, String> {
        if let Some(s) = self.state.containers.get(container_id).cloned() {
            // Prepared before (a retried create, or a host rebooted since): activate it again
            // if needed.
            let node = Path::new("/dev/mapper").join(&s.name);
            if self.dm.exists(&s.name)? && node.exists() {
                return Ok(node);
            }
            let sectors = self.base_sectors(&s.base)?;
            self.dm.deactivate(&s.name)?;
            return self
                .dm
                .activate(&s.name, sectors, "thin", self.thin_params(s.thin_id));
        }
        let (origin, sectors) = match self.state.bases.get(key) {
            Some(b) => (b.thin_id, b.sectors),
            None => return Err(format!("devmapper storage: pool.json names no base {key}")),
        };
        let thin_id = self.state.alloc_id()?;
        self.save()?;
        // The origin is inactive (bases are deactivated after mkfs), so no suspend is needed.
        self.message(&format!("create_snap {thin_id} {origin}"))?;
        let name = snapshot_name(container_id);
        self.state.containers.insert(
            container_id.into(),
            Snapshot {
                thin_id,
                base: key.into(),
                name: name.clone(),
            },
        );
        self.save()?;
        self.dm
            .activate(&name, sectors, "thin", self.thin_params(thin_id))
    }

    /// Removes and deletes `container_id`'s snapshot; nothing when it has none.
    pub fn remove_snapshot(&mut self, container_id: &str) -> Result<(), String> {
        let Some(s) = self.state.containers.get(container_id).cloned() else {
            return self.dm.deactivate(&snapshot_name(container_id));
        };
        self.dm.deactivate(&s.name)?;
        self.message(&format!("delete {}", s.thin_id))?;
        self.state.containers.remove(container_id);
        self.save()
    }

    /// Deletes the bases from which no live container was made, except those in `keep`.
    /// Returns the keys deleted.
    pub fn gc(&mut self, keep: &[String]) -> Result<Vec<String>, String> {
        let used: Vec<&String> = self.state.containers.values().map(|s| &s.base).collect();
        let unused: Vec<(String, u32)> = self
            .state
            .bases
            .iter()
            .filter(|(k, _)| !used.contains(k) && !keep.contains(k))
            .map(|(k, b)| (k.clone(), b.thin_id))
            .collect();
        for (key, thin_id) in &unused {
            self.dm.deactivate(&base_name(key))?;
            self.message(&format!("delete {thin_id}"))?;
            self.state.bases.remove(key);
            self.save()?;
        }
        Ok(unused.into_iter().map(|(k, _)| k).collect())
    }
}

/// Deletes the bases from which no live container was made, except those in `keep`. Returns the
/// keys deleted; none where no pool was ever made.
pub fn gc(options: &BTreeMap<String, String>, keep: &[String]) -> Result<Vec<String>, String> {
    let opts = Options::parse(options)?;
    if !Pool::was_made(&opts) {
        return Ok(Vec::new());
    }
    Pool::open(opts)?.gc(keep)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn sparse_files_are_private_and_made_once() {
        let dir = TestDir::new("sparse");
        let f = dir.path().join("data.img");
        assert!(sparse_file(&f, 1 << 30).unwrap());
        let md = fs::metadata(&f).unwrap();
        assert_eq!(md.len(), 1 << 30);
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert!(!sparse_file(&f, 1 << 20).unwrap(), "kept");
        assert_eq!(fs::metadata(&f).unwrap().len(), 1 << 30);
    }

    #[test]
    fn gc_without_a_pool_touches_nothing() {
        let dir = TestDir::new("gc");
        let pool_dir = dir.path().join("pool");
        let options = BTreeMap::from([("pool_dir".into(), pool_dir.display().to_string())]);
        assert_eq!(gc(&options, &[]).unwrap(), Vec::<String>::new());
        assert!(!pool_dir.exists(), "no pool made to collect nothing");
    }
}
