//! `runv drivers` / `runv features` against driver directories holding good, incompatible,
//! corrupt, foreign and unreadable plugins.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn runv() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runv"));
    cmd.env_remove("RUNV_DRIVER_DIR");
    cmd
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The example plugin, built by cargo beside the runv binary.
fn example_plugin() -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_runv")).parent().unwrap();
    let path = dir.join("librunv_driver_example.so");
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        path.display()
    );
    path
}

/// A plugin built against an older, incompatible runv-api (tests/fixtures/old-api).
fn old_abi_plugin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let target = root.join("target/fixtures");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--manifest-path"])
                .arg(root.join("tests/fixtures/old-api/Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .status()
                .expect("running cargo for the old-ABI fixture");
            assert!(status.success(), "building the old-ABI fixture failed");
            target.join("debug/librunv_driver_oldabi.so")
        })
        .clone()
}

/// A plugin built against the runv-api of the commit before `restore_vm` was appended to the
/// ABI (tests/fixtures/prev-api): the previous interface of this same ABI version.
fn prev_api_plugin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let target = root.join("target/fixtures");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "--manifest-path"])
                .arg(root.join("tests/fixtures/prev-api/Cargo.toml"))
                .arg("--target-dir")
                .arg(&target)
                .status()
                .expect("running cargo for the previous-API fixture");
            assert!(status.success(), "building the previous-API fixture failed");
            target.join("debug/librunv_driver_prevapi.so")
        })
        .clone()
}

fn foreign_library() -> PathBuf {
    let candidates = [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib/x86_64-linux-gnu/libm.so.6",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("no system library to use as a foreign .so")
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("runv-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn drivers_json(dirs: &[&Path]) -> (serde_json::Value, String) {
    let mut cmd = runv();
    for d in dirs {
        cmd.arg("--driver-dir").arg(d);
    }
    let out = cmd.args(["drivers", "--format", "json"]).output().unwrap();
    assert!(
        out.status.success(),
        "runv drivers failed: {}",
        stderr(&out)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| {
        panic!(
            "runv drivers --format json is not JSON ({e}): {}",
            stdout(&out)
        )
    });
    (json, stderr(&out))
}

fn names(json: &serde_json::Value) -> Vec<String> {
    json["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bad_plugins_are_one_line_each_and_good_ones_still_load() {
    let dir = TempDir::new("mixed");
    let d = &dir.0;
    fs::copy(example_plugin(), d.join("librunv_driver_example.so")).unwrap();
    fs::copy(old_abi_plugin(), d.join("librunv_driver_oldabi.so")).unwrap();
    fs::write(
        d.join("librunv_driver_garbage.so"),
        b"\x7fELF this is not a library",
    )
    .unwrap();
    fs::copy(foreign_library(), d.join("librunv_driver_foreign.so")).unwrap();
    let unreadable = d.join("librunv_driver_unreadable.so");
    fs::write(&unreadable, b"secret").unwrap();
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
    symlink(d.join("gone.so"), d.join("librunv_driver_dangling.so")).unwrap();
    fs::write(d.join("README.txt"), b"not a plugin name, ignored").unwrap();

    let (json, err) = drivers_json(&[d]);
    assert_eq!(names(&json), vec!["example"], "stderr: {err}");
    let example = &json["drivers"][0];
    assert_eq!(example["kind"], "hypervisor");
    assert_eq!(example["available"], true);
    assert_eq!(example["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        example["capabilities"]
            .as_array()
            .unwrap()
            .contains(&"pause".into())
    );
    assert!(
        example["file"]
            .as_str()
            .unwrap()
            .ends_with("librunv_driver_example.so")
    );

    let lines: Vec<&str> = err.lines().collect();
    let line_for = |file: &str| -> &str {
        let matching: Vec<&&str> = lines.iter().filter(|l| l.contains(file)).collect();
        assert_eq!(matching.len(), 1, "want one line naming {file}, got: {err}");
        matching[0]
    };
    assert!(
        line_for("librunv_driver_oldabi.so").contains("ABI layout mismatch"),
        "{err}"
    );
    assert!(
        line_for("librunv_driver_garbage.so").contains("not a loadable shared library"),
        "{err}"
    );
    assert!(
        line_for("librunv_driver_foreign.so").contains("not a runv plugin"),
        "{err}"
    );
    assert!(
        line_for("librunv_driver_dangling.so").contains("cannot read the file"),
        "{err}"
    );
    // As root the mode-000 file is still readable, so it fails as a corrupt library instead.
    let unreadable_line = line_for("librunv_driver_unreadable.so");
    assert!(
        unreadable_line.contains("cannot read the file")
            || unreadable_line.contains("not a loadable shared library"),
        "{err}"
    );
    assert_eq!(
        lines.len(),
        5,
        "one line per bad file and nothing else: {err}"
    );
    assert_eq!(json["skipped"].as_array().unwrap().len(), 5);
}

#[test]
fn empty_and_missing_dirs_are_not_fatal() {
    let empty = TempDir::new("empty");
    let (json, err) = drivers_json(&[&empty.0]);
    assert!(names(&json).is_empty());
    assert!(err.is_empty(), "an empty dir is not an error: {err}");

    let missing = empty.0.join("does-not-exist");
    let (json, err) = drivers_json(&[&missing]);
    assert!(names(&json).is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("does-not-exist") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn first_plugin_of_a_name_wins_and_the_duplicate_is_named() {
    let a = TempDir::new("dup-a");
    let b = TempDir::new("dup-b");
    fs::copy(example_plugin(), a.0.join("librunv_driver_example.so")).unwrap();
    fs::copy(example_plugin(), b.0.join("librunv_driver_example2.so")).unwrap();
    let (json, err) = drivers_json(&[&a.0, &b.0]);
    assert_eq!(names(&json), vec!["example"]);
    assert!(
        json["drivers"][0]["file"]
            .as_str()
            .unwrap()
            .starts_with(a.0.to_str().unwrap())
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("librunv_driver_example2.so") && err.contains("already loaded"),
        "{err}"
    );
}

#[test]
fn driver_dir_env_is_used_when_no_flag_is_given() {
    let dir = TempDir::new("env");
    fs::copy(example_plugin(), dir.0.join("librunv_driver_example.so")).unwrap();
    let out = runv()
        .env("RUNV_DRIVER_DIR", &dir.0)
        .args(["drivers"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.lines().next().unwrap().starts_with("KIND"), "{text}");
    assert!(text.contains(&*dir.0.to_string_lossy()), "{text}");
}

#[test]
fn features_is_runc_shaped_json_with_drivers() {
    let dir = TempDir::new("features");
    fs::copy(example_plugin(), dir.0.join("librunv_driver_example.so")).unwrap();
    let out = runv()
        .arg("--driver-dir")
        .arg(&dir.0)
        .arg("features")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let f: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(f["ociVersionMin"], "1.0.0");
    assert!(f["ociVersionMax"].as_str().unwrap().starts_with("1."));
    assert!(f["hooks"].as_array().unwrap().contains(&"prestart".into()));
    assert!(
        f["mountOptions"]
            .as_array()
            .unwrap()
            .contains(&"rbind".into())
    );
    assert!(
        f["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&"network".into())
    );
    assert!(
        f["linux"]["capabilities"]
            .as_array()
            .unwrap()
            .contains(&"CAP_SYS_ADMIN".into())
    );
    assert!(f["annotations"].is_object());
    assert_eq!(f["runv"]["drivers"][0]["name"], "example");
}

#[test]
fn version_is_runc_style() {
    let out = runv().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("runv version {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(lines[1].starts_with("commit: "));
    assert!(lines[2].starts_with("spec: 1."));
}

#[test]
fn bad_format_and_log_format_are_clear_errors() {
    let out = runv()
        .args(["drivers", "--format", "xml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid format \"xml\""),
        "{}",
        stderr(&out)
    );
    let out = runv()
        .args(["--log-format", "yaml", "drivers"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1);
}

#[test]
fn selection_follows_driver_flag_and_never_picks_third_party_implicitly() {
    let dir = TempDir::new("select");
    fs::copy(example_plugin(), dir.0.join("librunv_driver_example.so")).unwrap();
    let (json, _) = drivers_json(&[&dir.0]);
    let err = json["selected"]["hypervisor"]["error"].as_str().unwrap();
    assert!(
        err.contains("drivers example are used only when named with --driver"),
        "{err}"
    );

    let out = runv()
        .arg("--driver-dir")
        .arg(&dir.0)
        .args(["--driver", "example", "drivers", "--format", "json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["selected"]["hypervisor"]["name"], "example");

    let out = runv()
        .arg("--driver-dir")
        .arg(&dir.0)
        .args([
            "--driver",
            "nope",
            "--storage",
            "nope",
            "drivers",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = json["selected"]["hypervisor"]["error"].as_str().unwrap();
    assert!(err.contains("'nope' not found (loaded: example)"), "{err}");
    assert!(
        json["selected"]["storage"]["error"]
            .as_str()
            .unwrap()
            .contains("'nope' not found")
    );
}

#[test]
fn a_plugin_built_against_the_previous_api_loads_and_starts_vms() {
    let dir = TempDir::new("prevapi");
    fs::copy(prev_api_plugin(), dir.0.join("librunv_driver_prevapi.so")).unwrap();
    let (json, err) = drivers_json(&[&dir.0]);
    assert_eq!(names(&json), vec!["prevapi"], "stderr: {err}");
    assert!(err.is_empty(), "{err}");
    assert_eq!(json["drivers"][0]["available"], true);
    assert!(
        !json["drivers"][0]["capabilities"]
            .as_array()
            .unwrap()
            .contains(&"snapshot".into()),
        "the old plugin does not claim templates"
    );

    // Through the very client the core uses: a cold start works, and a restore, which the old
    // plugin knows nothing of, is refused by the capability gate before the plugin is asked.
    use abi_stable::library::lib_header_from_path;
    use runv_api::{HypervisorClient, PluginModuleRef, VmConfig};
    use std::io::{Read, Write};
    let module = lib_header_from_path(&dir.0.join("librunv_driver_prevapi.so"))
        .and_then(|h| h.init_root_module::<PluginModuleRef>())
        .unwrap_or_else(|e| panic!("loading the previous-API plugin: {e}"));
    let driver = HypervisorClient::new((module.new_hypervisor())().into_result().unwrap());
    let config = VmConfig {
        name: "old".into(),
        memory_mib: 64,
        console_log: dir.0.join("console.log"),
        ..VmConfig::default()
    };
    let vm = driver.start_vm(&config).unwrap();
    let mut channel = std::os::unix::net::UnixStream::from(vm.take_agent_channel().unwrap());
    channel
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    channel.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    channel.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    let err = driver
        .restore_vm(&config, &dir.0)
        .err()
        .expect("restore_vm must be refused for a plugin without the snapshot capability");
    assert!(err.contains("does not support restoring"), "{err}");
    vm.stop(std::time::Duration::from_secs(1)).unwrap();
    assert_eq!(vm.wait().unwrap().code, 0);
}
