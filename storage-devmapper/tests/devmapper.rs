//! Real device-mapper thin pools (root, dm-mod and dm-thin-pool). This host kernel has no
//! device-mapper, so these say "skipped" here; run them in the test host:
//! `cargo xtask vmtest -- cargo test -p storage-devmapper --test devmapper`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use runv_api::{RootfsSource, Storage, StorageRequest};
use runv_storage_devmapper::{DM_CONTROL, DevmapperStorage, PoolState, gc};

struct Scratch {
    dir: PathBuf,
    pool: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Tear the test pool down: thin devices first, then the pool, then the loops.
        let out = Command::new("dmsetup").args(["ls"]).output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let n = line.split_whitespace().next().unwrap_or("");
                if n.starts_with("runv-c-dmtest") || n.starts_with("runv-base-") {
                    let _ = Command::new("dmsetup").args(["remove", n]).status();
                }
            }
        }
        let _ = Command::new("dmsetup")
            .args(["remove", &self.pool])
            .status();
        for f in ["metadata.img", "data.img"] {
            let _ = Command::new("losetup")
                .arg("-D")
                .arg(self.dir.join("pool").join(f))
                .status();
            if let Ok(o) = Command::new("losetup")
                .arg("-j")
                .arg(self.dir.join("pool").join(f))
                .output()
            {
                for l in String::from_utf8_lossy(&o.stdout).lines() {
                    if let Some(dev) = l.split(':').next() {
                        let _ = Command::new("losetup").args(["-d", dev]).status();
                    }
                }
            }
        }
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn block_path(p: &runv_api::PreparedRootfs) -> PathBuf {
    match &p.source {
        RootfsSource::Block { path, fs_type } => {
            assert_eq!(fs_type, "ext4");
            path.clone()
        }
        other => panic!("not a block rootfs: {other:?}"),
    }
}

#[test]
fn thin_snapshots_per_container() {
    if !Path::new(DM_CONTROL).exists() {
        eprintln!("skipped: no {DM_CONTROL}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("runv-dmtest-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let scratch = Scratch {
        pool: format!("runv-dmtest-pool-{}", std::process::id()),
        dir,
    };
    let rootfs = scratch.dir.join("bundle/rootfs");
    make_rootfs(&rootfs);
    let options: BTreeMap<String, String> = [
        ("pool_dir", scratch.dir.join("pool").display().to_string()),
        ("pool_name", scratch.pool.clone()),
        ("data_size", "512M".into()),
        ("metadata_size", "16M".into()),
        ("base_size", "128M".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let req = |id: &str| StorageRequest {
        version: 1,
        container_id: id.into(),
        rootfs: rootfs.clone(),
        readonly: false,
        state_dir: scratch.dir.join(id),
        options: options.clone(),
    };
    let storage = DevmapperStorage;
    storage.probe().unwrap();

    let (r1, r2) = (req("dmtest-1"), req("dmtest-2"));
    let p1 = block_path(&storage.prepare(&r1).unwrap());
    let p2 = block_path(&storage.prepare(&r2).unwrap());
    assert_eq!(p1, Path::new("/dev/mapper/runv-c-dmtest-1"));
    assert_eq!(p2, Path::new("/dev/mapper/runv-c-dmtest-2"));
    let state: PoolState =
        serde_json::from_slice(&fs::read(scratch.dir.join("pool/pool.json")).unwrap()).unwrap();
    assert_eq!(state.bases.len(), 1, "one base for one rootfs: {state:?}");
    assert_eq!(state.containers.len(), 2);

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
    assert_eq!(
        gc(&options, &[]).unwrap(),
        Vec::<String>::new(),
        "base in use"
    );
    storage.cleanup(&r2).unwrap();
    assert_eq!(gc(&options, &[]).unwrap().len(), 1, "unused base collected");
    let state: PoolState =
        serde_json::from_slice(&fs::read(scratch.dir.join("pool/pool.json")).unwrap()).unwrap();
    assert!(
        state.bases.is_empty() && state.containers.is_empty(),
        "{state:?}"
    );
}
