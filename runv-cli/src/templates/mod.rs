//! VM templates: a VM booted to agent-ready and saved, from which later containers start as
//! copy-on-write clones instead of booting a kernel.
//!
//! A template lives in `<store>/<key>/` (`template.json`, the guest RAM `memory`, the device
//! state `state`). The key is a hash of everything that shapes the booted guest (see
//! [`Shape`]): a changed kernel, initrd, driver or runv gives another key, so a stale template
//! is never restored; the next start under `--template auto` builds the new one.
//!
//! Concurrency: one lock file per key under `<store>/.locks/`. Building holds it exclusively
//! and writes into `<store>/.tmp-<key>-<pid>/`, renamed into place only when complete, so a
//! half-written template is never seen. Restoring holds it shared until the clone has read the
//! state. Removing holds it exclusively and renames the directory away before deleting it: a
//! running clone maps the RAM file privately and keeps the unlinked inode alive.

pub mod build;
pub mod clone;
pub mod command;
mod mode;

pub use mode::{Mode, validate_name};

/// What a driver can do for a container started from a template (or for which one is made):
/// a driver whose clones cannot take shared directories is treated as one without them, so
/// that such containers get the template's device set (a disk for the rootfs, no shares).
pub fn clone_capabilities(caps: runv_api::Capabilities) -> runv_api::Capabilities {
    use runv_api::Capabilities as C;
    if caps.contains(C::SNAPSHOT.union(C::NO_TEMPLATE_SHARES)) {
        caps.without(C::SHARED_DIR_ROOTFS)
    } else {
        caps
    }
}

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{FILE_MODE, private_dir, write_private};

/// Where templates live unless `--template-dir` or `$RUNV_TEMPLATE_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/runv/templates";
pub const ENV_DIR: &str = "RUNV_TEMPLATE_DIR";
/// The kernel parameter that tells the agent it boots a template (it then loads every module
/// a container may need, so that clones share them) and answers later hosts' greetings.
pub const KERNEL_PARAM: &str = "runv.template=1";
const META: &str = "template.json";
const HASHES: &str = ".hashes.json";

/// The template store directory: the flag, else `$RUNV_TEMPLATE_DIR`, else the default.
pub fn store_dir(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| std::env::var_os(ENV_DIR).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Everything that shapes a booted guest, and so a template. Paths are not part of it (the
/// content hashes are): a clone uses its own paths for the same files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    pub driver: String,
    pub driver_version: String,
    pub runv_version: String,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub kernel_params: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The shared directories' tags, in device order (their host paths are the clone's).
    pub shares: Vec<String>,
    /// How many NICs (their taps and MACs are the clone's).
    pub nics: usize,
    /// The disks' ids, in device order, for drivers whose clones bring their own disks
    /// (`template-disks`: kvm-native's block rootfs). Left out of the key when there are
    /// none, so that templates made before disks were shaped keep theirs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    pub parameters: BTreeMap<String, String>,
}

impl Shape {
    /// The store key: the first 24 hex digits of the SHA-256 of the shape's JSON.
    pub fn key(&self) -> String {
        // Strings, numbers and a string map always encode; a fallback here would give every
        // shape the same key.
        let json = serde_json::to_vec(self).expect("a Shape encodes as JSON");
        let digest = Sha256::digest(&json);
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }
}

/// What `template.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    #[serde(default)]
    pub name: Option<String>,
    pub shape: Shape,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// The MAC a template gives its NIC `index`; a clone's agent swaps it for the clone's own.
pub fn template_mac(index: usize) -> String {
    format!("02:72:76:74:00:{:02x}", index & 0xff)
}

pub struct Store {
    dir: PathBuf,
}

/// A held `flock`, released when dropped.
pub struct Lock {
    _flock: Flock<File>,
}

impl Store {
    /// Opens (creating, mode 0700, with its parents) the store at `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = dir.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("creating the template store {}", dir.display()))?;
        }
        for d in [dir.to_path_buf(), dir.join(".locks")] {
            match private_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", d.display()));
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    fn lock(&self, key: &str, exclusive: bool, wait: bool) -> anyhow::Result<Option<Lock>> {
        let path = self.dir.join(".locks").join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let arg = match (exclusive, wait) {
            (true, true) => FlockArg::LockExclusive,
            (true, false) => FlockArg::LockExclusiveNonblock,
            (false, true) => FlockArg::LockShared,
            (false, false) => FlockArg::LockSharedNonblock,
        };
        let mut file = file;
        loop {
            match Flock::lock(file, arg) {
                Ok(flock) => return Ok(Some(Lock { _flock: flock })),
                Err((f, Errno::EINTR)) => file = f,
                Err((_, Errno::EWOULDBLOCK)) if !wait => return Ok(None),
                Err((_, e)) => {
                    return Err(e).with_context(|| format!("locking {}", path.display()));
                }
            }
        }
    }

    /// Waits for and holds the key's lock exclusively (building, removing).
    pub fn lock_exclusive(&self, key: &str) -> anyhow::Result<Lock> {
        self.lock(key, true, true)?.context("lock not taken")
    }

    /// The key's exclusive lock if nobody holds it (a background build that finds another
    /// one at work leaves it be).
    pub fn try_lock_exclusive(&self, key: &str) -> anyhow::Result<Option<Lock>> {
        self.lock(key, true, false)
    }

    /// Holds the key's lock shared (restoring a clone).
    pub fn lock_shared(&self, key: &str) -> anyhow::Result<Lock> {
        self.lock(key, false, true)?.context("lock not taken")
    }

    /// The complete template with this key, if there is one.
    pub fn get(&self, key: &str) -> Option<Meta> {
        let dir = self.path(key);
        let meta: Meta = serde_json::from_slice(&fs::read(dir.join(META)).ok()?).ok()?;
        let complete = [
            runv_api::TEMPLATE_MEMORY_FILE,
            runv_api::TEMPLATE_STATE_FILE,
        ]
        .iter()
        .all(|f| dir.join(f).is_file());
        (meta.key == key && complete).then_some(meta)
    }

    /// Every complete template, oldest first.
    pub fn list(&self) -> anyhow::Result<Vec<Meta>> {
        let mut out = Vec::new();
        let entries =
            fs::read_dir(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if let Some(meta) = self.get(&name) {
                out.push(meta);
            }
        }
        out.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
        Ok(out)
    }

    /// The template named `name` (or whose key is `name`).
    pub fn find(&self, name: &str) -> anyhow::Result<Option<Meta>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|m| m.key == name || m.name.as_deref() == Some(name)))
    }

    /// Bytes the template's files take on disk.
    pub fn disk_usage(&self, key: &str) -> u64 {
        fs::read_dir(self.path(key))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Removes a template. Clones running from it are unaffected (they map the RAM file
    /// privately; the unlinked inode lives on until the last of them ends).
    pub fn remove(&self, key: &str) -> anyhow::Result<()> {
        let _lock = self.lock_exclusive(key)?;
        let dir = self.path(key);
        let trash = self
            .dir
            .join(format!(".trash-{key}-{}", std::process::id()));
        fs::rename(&dir, &trash).with_context(|| format!("removing {}", dir.display()))?;
        fs::remove_dir_all(&trash).with_context(|| format!("removing {}", trash.display()))?;
        Ok(())
    }

    /// The SHA-256 of a file's content, cached in the store by (device, inode, size, mtime,
    /// ctime): hashing a 60 MB kernel on every start would cost more than a warm start.
    pub fn content_hash(&self, path: &Path) -> anyhow::Result<String> {
        let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let stamp = format!(
            "{}:{}:{}:{}.{}:{}.{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec()
        );
        let cache_path = self.dir.join(HASHES);
        let mut cache: BTreeMap<String, (String, String)> = fs::read(&cache_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let name = path.display().to_string();
        if let Some((s, hash)) = cache.get(&name) {
            if *s == stamp {
                return Ok(hash.clone());
            }
        }
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hash: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        cache.insert(name, (stamp, hash.clone()));
        // Best effort: a lost race with another writer only costs a later rehash.
        let _ = write_private(&cache_path, &serde_json::to_vec(&cache).unwrap_or_default());
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            driver: "qemu".into(),
            driver_version: "0.1.0".into(),
            runv_version: "0.1.0".into(),
            kernel_sha256: "k".into(),
            initrd_sha256: "i".into(),
            kernel_params: KERNEL_PARAM.into(),
            vcpus: 1,
            memory_mib: 128,
            shares: vec!["rootfs".into()],
            nics: 0,
            disks: Vec::new(),
            parameters: BTreeMap::new(),
        }
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = shape().key();
        assert_eq!(base.len(), 24);
        assert_eq!(base, shape().key());
        type Change = Box<dyn Fn(&mut Shape)>;
        let changes: Vec<Change> = vec![
            Box::new(|s| s.initrd_sha256 = "j".into()),
            Box::new(|s| s.kernel_sha256 = "j".into()),
            Box::new(|s| s.driver_version = "0.2.0".into()),
            Box::new(|s| s.memory_mib = 256),
            Box::new(|s| s.vcpus = 2),
            Box::new(|s| s.nics = 1),
            Box::new(|s| s.shares.push("runv-mounts".into())),
            Box::new(|s| s.disks.push("rootfs".into())),
            Box::new(|s| {
                s.parameters.insert("accel".into(), "tcg".into());
            }),
        ];
        for change in changes {
            let mut s = shape();
            change(&mut s);
            assert_ne!(s.key(), base, "{s:?}");
        }
    }

    #[test]
    fn a_shape_without_disks_keeps_the_key_it_had_before_disks() {
        // The key of `shape()` when Shape had no `disks` field: templates made then still fit.
        assert!(!serde_json::to_string(&shape()).unwrap().contains("disks"));
        let old = r#"{"driver":"qemu","driver_version":"0.1.0","runv_version":"0.1.0",
            "kernel_sha256":"k","initrd_sha256":"i","kernel_params":"runv.template=1",
            "vcpus":1,"memory_mib":128,"shares":["rootfs"],"nics":0,"parameters":{}}"#;
        let parsed: Shape = serde_json::from_str(old).unwrap();
        assert_eq!(parsed, shape());
    }

    #[test]
    fn clones_of_a_driver_without_template_shares_get_disks() {
        use runv_api::Capabilities as C;
        let kvm_native =
            C::SHARED_DIR_ROOTFS | C::BLOCK_ROOTFS | C::SNAPSHOT | C::NO_TEMPLATE_SHARES;
        let caps = clone_capabilities(kvm_native);
        assert!(!caps.contains(C::SHARED_DIR_ROOTFS) && caps.contains(C::BLOCK_ROOTFS));
        // qemu's clones bring their own 9p exports; without snapshots the bit means nothing.
        let qemu = C::SHARED_DIR_ROOTFS | C::SNAPSHOT;
        assert_eq!(clone_capabilities(qemu), qemu);
        let no_snapshot = C::SHARED_DIR_ROOTFS | C::NO_TEMPLATE_SHARES;
        assert_eq!(clone_capabilities(no_snapshot), no_snapshot);
    }

    #[test]
    fn modes_and_names() {
        assert_eq!(Mode::parse(None).unwrap(), Mode::Auto);
        assert_eq!(Mode::parse(Some("off")).unwrap(), Mode::Off);
        assert_eq!(Mode::parse(Some("auto")).unwrap(), Mode::Auto);
        assert_eq!(
            Mode::parse(Some("web-1")).unwrap(),
            Mode::Named("web-1".into())
        );
        assert!(Mode::parse(Some("../x")).is_err());
        assert!(Mode::parse(Some("")).is_err());
        assert!(Mode::parse(Some(".hidden")).is_err());
    }

    /// A scratch directory, removed also when the test fails.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("runv-tpl-{what}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    #[test]
    fn a_new_store_and_its_parents_are_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let s = scratch("open");
        let dir = s.0.join("a/b/templates");
        let store = Store::open(&dir).unwrap();
        for d in [dir.clone(), dir.join(".locks")] {
            let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let held = store.try_lock_exclusive("k").unwrap().expect("a free lock");
        assert!(store.try_lock_exclusive("k").unwrap().is_none(), "held");
        drop(held);
        let _shared = store.lock_shared("k").unwrap();
        assert!(
            store.try_lock_exclusive("k").unwrap().is_none(),
            "held shared"
        );
    }

    #[test]
    fn content_hash_is_cached_and_follows_changes() {
        let s = scratch("hash");
        let dir = s.0.clone();
        let store = Store::open(&dir).unwrap();
        let file = dir.join("f");
        fs::write(&file, b"abc").unwrap();
        let h1 = store.content_hash(&file).unwrap();
        assert_eq!(
            h1,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(store.content_hash(&file).unwrap(), h1);
        fs::write(&file, b"abd").unwrap();
        assert_ne!(store.content_hash(&file).unwrap(), h1);
    }
}
