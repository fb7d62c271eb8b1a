//! Real overlayfs mounts (needs root, as runv itself does).

use std::fs;
use std::path::{Path, PathBuf};

use runv_api::{PluginModuleRef, RootfsSource, Storage, StorageClient, StorageRequest};
use runv_storage_overlay::{OverlayStorage, is_mounted};

/// A scratch directory removed on drop, also when the test fails; unmounts what is left first.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("runv-overlay-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let merged = self.0.join("state/overlay/merged");
        if is_mounted(&merged).unwrap_or(false) {
            let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn request(scratch: &Scratch) -> StorageRequest {
    let rootfs = scratch.0.join("bundle/rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/hostname"), "original\n").unwrap();
    StorageRequest {
        version: 1,
        container_id: "c1".into(),
        rootfs,
        readonly: false,
        state_dir: scratch.0.join("state"),
        options: Default::default(),
    }
}

fn mountinfo_mentions(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(path.to_str().unwrap())
}

/// Runs `prepare` (`true`) or `cleanup` (`false`) through one way of calling the driver; returns
/// the merged directory for `prepare`.
type Call<'a> = &'a dyn Fn(&StorageRequest, bool) -> Result<Option<PathBuf>, String>;

fn check_round_trip(storage: Call<'_>, name: &str) {
    let scratch = Scratch::new(name);
    let req = request(&scratch);
    let merged = storage(&req, true)
        .unwrap()
        .expect("prepare returns a path");
    assert_eq!(merged, req.state_dir.join("overlay/merged"));
    assert!(
        is_mounted(&merged).unwrap(),
        "{} is not a mount point",
        merged.display()
    );

    // Writes go to the upper layer; the bundle's rootfs is untouched.
    assert_eq!(
        fs::read_to_string(merged.join("etc/hostname")).unwrap(),
        "original\n"
    );
    fs::write(merged.join("etc/hostname"), "changed\n").unwrap();
    fs::write(merged.join("new-file"), "hello").unwrap();
    assert_eq!(
        fs::read_to_string(req.rootfs.join("etc/hostname")).unwrap(),
        "original\n"
    );
    assert!(!req.rootfs.join("new-file").exists());
    let upper = req.state_dir.join("overlay/upper");
    assert_eq!(fs::read_to_string(upper.join("new-file")).unwrap(), "hello");
    assert_eq!(
        fs::read_to_string(upper.join("etc/hostname")).unwrap(),
        "changed\n"
    );

    // Preparing again (e.g. a retried create) does not stack a second mount.
    storage(&req, true).unwrap();

    // A busy mount (an open directory inside it) is detached lazily.
    let busy = fs::File::open(merged.join("etc")).unwrap();
    storage(&req, false).unwrap();
    drop(busy);
    assert!(
        !mountinfo_mentions(&merged),
        "overlay still mounted after cleanup"
    );
    assert!(
        !req.state_dir.join("overlay").exists(),
        "overlay dirs left behind"
    );
    assert!(req.rootfs.join("etc/hostname").exists());

    // Cleanup is idempotent.
    storage(&req, false).unwrap();
}

#[test]
fn prepare_write_cleanup_direct() {
    let driver = OverlayStorage;
    driver.probe().unwrap();
    check_round_trip(
        &|req, prepare| {
            if prepare {
                let p = driver.prepare(req)?;
                assert!(!p.readonly);
                match p.source {
                    RootfsSource::SharedDir { path } => Ok(Some(path)),
                    other => Err(format!("unexpected source {other:?}")),
                }
            } else {
                driver.cleanup(req).map(|()| None)
            }
        },
        "direct",
    );
}

fn plugin_path() -> PathBuf {
    // The test binary is target/<profile>/deps/<name>; cargo leaves the cdylib built for the
    // tests next to it (and uplifts it to target/<profile>/ on a normal build).
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .map(|d| d.join("librunv_storage_overlay.so"))
        .find(|p| p.exists())
        .expect("librunv_storage_overlay.so was not built next to the test binary")
}

#[test]
fn prepare_write_cleanup_through_the_plugin() {
    let module = abi_stable::library::lib_header_from_path(&plugin_path())
        .unwrap()
        .init_root_module::<PluginModuleRef>()
        .unwrap();
    let client = StorageClient::new((module.new_storage())().into_result().unwrap());
    assert_eq!(client.info().name.as_str(), "overlay");
    client.probe().unwrap();
    check_round_trip(
        &|req, prepare| {
            if prepare {
                match client.prepare(req)?.source {
                    RootfsSource::SharedDir { path } => Ok(Some(path)),
                    other => Err(format!("unexpected source {other:?}")),
                }
            } else {
                client.cleanup(req).map(|()| None)
            }
        },
        "plugin",
    );
}

#[test]
fn cleanup_of_a_never_prepared_container_is_ok() {
    let scratch = Scratch::new("never");
    let req = StorageRequest {
        container_id: "never".into(),
        rootfs: scratch.0.join("missing-rootfs"),
        state_dir: scratch.0.join("state"),
        ..Default::default()
    };
    OverlayStorage.cleanup(&req).unwrap();
    OverlayStorage.cleanup(&req).unwrap();
}

#[test]
fn prepare_of_a_missing_rootfs_fails_and_cleanup_still_works() {
    let scratch = Scratch::new("missing");
    let req = StorageRequest {
        container_id: "m".into(),
        rootfs: scratch.0.join("no-such-rootfs"),
        state_dir: scratch.0.join("state"),
        ..Default::default()
    };
    let err = OverlayStorage.prepare(&req).unwrap_err();
    assert!(err.contains("not a directory"), "{err}");
    OverlayStorage.cleanup(&req).unwrap();
    assert!(!req.state_dir.join("overlay").exists());
}
