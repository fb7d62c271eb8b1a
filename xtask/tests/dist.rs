//! `cargo xtask dist --drivers` installs exactly the chosen plugins, and the installed runv
//! finds them with no flags.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dist_installs_only_the_chosen_plugins() {
    let prefix = TempDir(std::env::temp_dir().join(format!("runv-dist-{}", std::process::id())));
    // Plugins from an earlier install that are not chosen again must go.
    fs::create_dir_all(prefix.0.join("lib/runv")).unwrap();
    fs::write(prefix.0.join("lib/runv/librunv_driver_stale.so"), b"old").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "dist",
            "--no-build",
            "--profile",
            "dev",
            "--drivers",
            "example",
            "--prefix",
        ])
        .arg(&prefix.0)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed: Vec<String> = fs::read_dir(prefix.0.join("lib/runv"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(installed, vec!["librunv_driver_example.so"]);

    let out = Command::new(prefix.0.join("bin/runv"))
        .env_remove("RUNV_DRIVER_DIR")
        .args(["drivers", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let files: Vec<&str> = json["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["file"].as_str().unwrap())
        .collect();
    let expected = prefix.0.join("lib/runv/librunv_driver_example.so");
    assert!(files.contains(&expected.to_str().unwrap()), "{files:?}");

    let err = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "dist",
            "--no-build",
            "--profile",
            "dev",
            "--drivers",
            "nope",
            "--prefix",
        ])
        .arg(&prefix.0)
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("no plugin named \"nope\""));
}
