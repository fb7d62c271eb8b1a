//! Real device-mapper thin pools (root, dm-mod and dm-thin-pool), driven through the
//! `devicemapper` crate without udev. This host kernel has no device-mapper, so these say
//! "skipped" here; CI runs them in the test host (scripts/test.sh: `in_test_host
//! storage-devmapper devmapper`). `dmsetup` serves here as the independent observer (and for
//! the teardown), never as what the driver runs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{major, minor};
use runv_api::{RootfsSource, Storage, StorageRequest};
use runv_storage_devmapper::{DM_CONTROL, DevmapperStorage, PoolState, base_name, gc};

mod dm_host;
use dm_host::dmsetup;

fn dm_exists(name: &str) -> bool {
    dm_host::exists(name)
}

/// A test pool in its own directory, torn down at the end, also when the test fails.
struct Scratch {
    dir: PathBuf,
    pool: String,
    options: BTreeMap<String, String>,
}

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("runv-dmtest-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let pool = format!("runv-dmtest-{test}-{}", std::process::id());
        let options = [
            ("pool_dir", dir.join("pool").display().to_string()),
            ("pool_name", pool.clone()),
            ("data_size", "512M".into()),
            ("metadata_size", "16M".into()),
            ("base_size", "128M".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Scratch { dir, pool, options }
    }

    fn state(&self) -> PoolState {
        serde_json::from_slice(&fs::read(self.dir.join("pool/pool.json")).unwrap()).unwrap()
    }

    /// The dm devices of this pool's state (snapshots and bases), then the pool.
    fn devices(&self) -> Vec<String> {
        let mut names = Vec::new();
        if let Ok(b) = fs::read(self.dir.join("pool/pool.json")) {
            if let Ok(state) = serde_json::from_slice::<PoolState>(&b) {
                names.extend(state.containers.values().map(|s| s.name.clone()));
                names.extend(state.bases.keys().map(|k| base_name(k)));
            }
        }
        names.push(self.pool.clone());
        names
    }

    /// What a reboot does to the pool: its devices and loop devices are gone, its files stay.
    fn drop_devices(&self) {
        for n in self.devices() {
            dm_host::remove(&n).unwrap();
        }
        self.detach_loops();
    }

    fn detach_loops(&self) {
        for f in ["metadata.img", "data.img"] {
            dm_host::detach_loops(&self.dir.join("pool").join(f));
        }
    }

    fn request(&self, id: &str, rootfs: &Path) -> StorageRequest {
        StorageRequest {
            version: 1,
            container_id: id.into(),
            rootfs: rootfs.into(),
            readonly: false,
            state_dir: self.dir.join(id),
            options: self.options.clone(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for n in self.devices() {
            let _ = dm_host::remove(&n);
        }
        self.detach_loops();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn make_rootfs(root: &Path) {
    for d in ["bin", "etc", "proc", "dev", "sys"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    fs::write(root.join("etc/marker"), "from the base\n").unwrap();
}

fn debugfs(dev: &Path, write: bool, cmd: &str) -> String {
    let mut c = Command::new("debugfs");
    if write {
        c.arg("-w");
    }
    let out = c.args(["-R", cmd]).arg(dev).output().unwrap();
    assert!(out.status.success(), "debugfs {cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The block device of a prepared rootfs, checked against what device-mapper says of it.
fn block_path(p: &runv_api::PreparedRootfs) -> PathBuf {
    let path = match &p.source {
        RootfsSource::Block { path, fs_type } => {
            assert_eq!(fs_type, "ext4");
            path.clone()
        }
        other => panic!("not a block rootfs: {other:?}"),
    };
    let name = path.file_name().unwrap().to_str().unwrap();
    let out = dmsetup(&["info", "-c", "--noheadings", "-o", "major,minor", name]).unwrap();
    assert!(out.status.success(), "dmsetup info {name}: {out:?}");
    let numbers = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let md = fs::metadata(&path).unwrap();
    assert!(md.file_type().is_block_device(), "{}", path.display());
    let rdev = md.rdev();
    let node = format!("{}:{}", major(rdev), minor(rdev));
    assert_eq!(node, numbers, "{} is the device's node", path.display());
    path
}

fn skip() -> bool {
    if !Path::new(DM_CONTROL).exists() {
        eprintln!("skipped: no {DM_CONTROL}");
        return true;
    }
    false
}

#[test]
fn thin_snapshots_per_container() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("snap");
    let rootfs = scratch.dir.join("bundle/rootfs");
    make_rootfs(&rootfs);
    let storage = DevmapperStorage;
    storage.probe().unwrap();

    let (r1, r2) = (
        scratch.request("dmtest-1", &rootfs),
        scratch.request("dmtest-2", &rootfs),
    );
    let p1 = block_path(&storage.prepare(&r1).unwrap());
    let p2 = block_path(&storage.prepare(&r2).unwrap());
    assert_eq!(p1, Path::new("/dev/mapper/runv-c-dmtest-1"));
    assert_eq!(p2, Path::new("/dev/mapper/runv-c-dmtest-2"));
    let state = scratch.state();
    assert_eq!(state.bases.len(), 1, "one base for one rootfs: {state:?}");
    assert_eq!(state.containers.len(), 2);
    let base = base_name(state.bases.keys().next().unwrap());
    assert!(!dm_exists(&base), "bases stay inactive");

    // Both see the bundle's files; a change in one is not seen by the other.
    assert_eq!(debugfs(&p1, false, "cat /etc/marker"), "from the base\n");
    debugfs(&p1, true, "rm /etc/marker");
    assert_eq!(debugfs(&p1, false, "cat /etc/marker"), "");
    assert_eq!(debugfs(&p2, false, "cat /etc/marker"), "from the base\n");

    // Preparing again (a retried create) gives the same device, with its changes.
    assert_eq!(block_path(&storage.prepare(&r1).unwrap()), p1);
    assert_eq!(debugfs(&p1, false, "cat /etc/marker"), "");

    // cleanup removes the snapshot, is idempotent, and leaves the base.
    storage.cleanup(&r1).unwrap();
    storage.cleanup(&r1).unwrap();
    assert!(!p1.exists());
    assert!(!dm_exists("runv-c-dmtest-1"));
    assert_eq!(
        gc(&scratch.options, &[]).unwrap(),
        Vec::<String>::new(),
        "base in use"
    );
    storage.cleanup(&r2).unwrap();
    assert_eq!(
        gc(&scratch.options, &[]).unwrap().len(),
        1,
        "unused base collected"
    );
    let state = scratch.state();
    assert!(
        state.bases.is_empty() && state.containers.is_empty(),
        "{state:?}"
    );
}

#[test]
fn a_pool_and_its_snapshots_come_back_after_a_reboot() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("reboot");
    let rootfs = scratch.dir.join("bundle/rootfs");
    make_rootfs(&rootfs);
    let storage = DevmapperStorage;
    let r = scratch.request("dmtest-r", &rootfs);
    let p = block_path(&storage.prepare(&r).unwrap());
    let content = scratch.dir.join("content");
    fs::write(&content, "written in the snapshot\n").unwrap();
    debugfs(&p, true, &format!("write {} written", content.display()));
    let before = scratch.state();

    scratch.drop_devices();
    assert!(!dm_exists(&scratch.pool) && !p.exists());

    // The next prepare reloads the pool from its files (metadata kept, not zeroed) and
    // activates the container's snapshot again, with what was written to it.
    assert_eq!(block_path(&storage.prepare(&r).unwrap()), p);
    assert_eq!(scratch.state(), before, "no new base or snapshot");
    assert!(
        debugfs(&p, false, "cat /written") == "written in the snapshot\n",
        "the snapshot kept its write"
    );
    assert_eq!(debugfs(&p, false, "cat /etc/marker"), "from the base\n");

    // After another reboot, cleanup works on the reloaded pool.
    scratch.drop_devices();
    storage.cleanup(&r).unwrap();
    assert!(scratch.state().containers.is_empty());
    assert!(!p.exists());
}

#[test]
fn a_failed_base_is_one_line_and_leaves_nothing_mapped() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("fail");
    // A rootfs bigger than the base: mkfs.ext4 -d fails; the thin device is deleted again.
    let mut options = scratch.options.clone();
    options.insert("base_size".into(), "1M".into());
    let rootfs = scratch.dir.join("bundle/rootfs");
    make_rootfs(&rootfs);
    fs::write(rootfs.join("big"), vec![7u8; 4 << 20]).unwrap();
    let mut r = scratch.request("dmtest-f", &rootfs);
    r.options = options;
    let err = DevmapperStorage.prepare(&r).unwrap_err();
    assert!(
        err.starts_with("devmapper storage: making the base for "),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    let state = scratch.state();
    assert!(
        state.bases.is_empty() && state.containers.is_empty(),
        "{state:?}"
    );
    for n in scratch.devices() {
        if n != scratch.pool {
            assert!(!dm_exists(&n), "{n} left mapped");
        }
    }
    let key = runv_storage_devmapper::base_key(&rootfs).unwrap();
    assert!(!dm_exists(&base_name(&key)), "the base device was removed");
}
