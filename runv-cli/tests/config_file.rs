//! The host configuration file: precedence (flag > env > file > default) as `runv config show`
//! reports it, one-line errors naming file, key and line, and the file's VM defaults reaching
//! a real VM.

mod common;

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use common::{Env, text};

const RUNV: &str = env!("CARGO_BIN_EXE_runv");

struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, content: &str) -> Self {
        let path = std::env::temp_dir().join(format!("runv-cfg-{tag}-{}.toml", std::process::id()));
        fs::write(&path, content).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// runv with none of the variables the config reads, whatever the test's environment has.
fn runv() -> Command {
    let mut cmd = Command::new(RUNV);
    for var in [
        "RUNV_CONFIG",
        "RUNV_DRIVER",
        "RUNV_STORAGE",
        "RUNV_KERNEL",
        "RUNV_INITRD",
        "RUNV_ACCEL",
        "RUNV_VCPUS",
        "RUNV_MEMORY_MIB",
        "RUNV_TEMPLATE",
        "RUNV_LOG_LEVEL",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn show(cmd: &mut Command) -> serde_json::Value {
    let out = cmd
        .args(["config", "show", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const FILE: &str = r#"# host defaults
driver = "kvm-native"
storage = "overlay"
log_level = "info"
template = "auto"

[vm]
vcpus = 2
memory_mib = 256

[driver_parameters.qemu]
accel = "tcg"
"#;

#[test]
fn show_reports_each_value_and_its_source() {
    let f = TempFile::new("show", FILE);
    let file = f.0.display().to_string();

    let j = show(runv().env("RUNV_CONFIG", &f.0));
    assert_eq!(j["config"]["value"], file.as_str());
    assert_eq!(j["config"]["source"], "env");
    assert_eq!(j["driver"]["value"], "kvm-native");
    assert_eq!(j["driver"]["origin"], format!("{file}:2"));
    assert_eq!(j["vm.vcpus"]["value"], 2);
    assert_eq!(j["vm.vcpus"]["origin"], format!("{file}:8"));
    assert_eq!(j["template"]["value"], "auto");
    assert_eq!(j["driver_parameters.qemu.accel"]["value"], "tcg");
    assert_eq!(j["accel"]["source"], "default");
    assert_eq!(j["accel"]["value"], serde_json::Value::Null);

    // The environment beats the file; flags beat both.
    let j = show(
        runv()
            .env("RUNV_DRIVER", "xen")
            .env("RUNV_MEMORY_MIB", "512")
            .arg("--config")
            .arg(&f.0)
            .args(["--storage", "devmapper", "--debug"]),
    );
    assert_eq!(j["config"]["source"], "flag");
    assert_eq!(j["driver"]["value"], "xen");
    assert_eq!(j["driver"]["origin"], "RUNV_DRIVER");
    assert_eq!(j["vm.memory_mib"]["value"], 512);
    assert_eq!(j["storage"]["value"], "devmapper");
    assert_eq!(j["storage"]["origin"], "--storage");
    assert_eq!(j["log_level"]["value"], "debug");
    assert_eq!(j["log_level"]["origin"], "--debug");

    // --config beats RUNV_CONFIG.
    let other = TempFile::new("other", "driver = \"qemu\"\n");
    let j = show(
        runv()
            .env("RUNV_CONFIG", &f.0)
            .arg("--config")
            .arg(&other.0),
    );
    assert_eq!(j["driver"]["value"], "qemu");
    // Templates are on unless something turns them off.
    assert_eq!(j["template"]["value"], "auto");
    assert_eq!(j["template"]["source"], "default");

    // The table names the source of every line.
    let out = runv()
        .arg("--config")
        .arg(&f.0)
        .args(["config", "show"])
        .output()
        .unwrap();
    let table = text(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("driver ") && l.ends_with(&format!("[file {file}:2]"))),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("accel ") && l.ends_with("[default]")),
        "{table}"
    );
}

#[test]
fn bad_values_are_one_line_naming_file_key_and_line() {
    for (content, expected) in [
        ("[vm]\nvcpus = 0\n", "2: vm.vcpus: must be 1 to 64, got 0"),
        (
            "driver = \"qemu\"\nlog_level = \"loud\"\n",
            "2: log_level: want one of",
        ),
        ("\n\ndriverr = \"qemu\"\n", "3: driverr: unknown field"),
        ("[vm]\nmemory_mib = \"a lot\"\n", "2: vm.memory_mib: "),
        (
            "kernel = \"relative/vmlinux\"\n",
            "1: kernel: want an absolute path",
        ),
    ] {
        let f = TempFile::new("bad", content);
        let log = TempFile::new("bad-log", "");
        // Any command reads the config, and an engine sees the error in its --log file.
        let out = runv()
            .arg("--config")
            .arg(&f.0)
            .arg("--log")
            .arg(&log.0)
            .args(["--log-format", "json", "list"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        let want = format!("runv: {}:{expected}", f.0.display());
        assert!(
            stderr.starts_with(&want) && stderr.lines().count() == 1,
            "want {want:?}, got {stderr:?}"
        );
        let logged = fs::read_to_string(&log.0).unwrap();
        assert!(logged.contains(r#""level":"error""#), "{logged}");
    }
    let out = runv()
        .env("RUNV_VCPUS", "-1")
        .args(["config", "show"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr),
        "runv: error: RUNV_VCPUS: must be 1 to 64, got -1\n"
    );
}

#[test]
fn the_files_vm_defaults_reach_the_vm_and_the_spec_still_wins() {
    let env = Env::new("cfgvm");
    let f = TempFile::new("vm", "[vm]\nvcpus = 2\n");
    let bundle = env.bundle("b", &["nproc"]);
    let out = env.run_ok(
        env.runv()
            .env("RUNV_CONFIG", &f.0)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg("c1"),
        240,
    );
    assert_eq!(text(&out.stdout).trim(), "2");

    env.edit_spec(&bundle, |spec| {
        spec["annotations"] = serde_json::json!({ "runv.vm.vcpus": "1" });
    });
    let out = env.run_ok(
        env.runv()
            .env("RUNV_CONFIG", &f.0)
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg("c2"),
        240,
    );
    assert_eq!(text(&out.stdout).trim(), "1");
    env.assert_clean();
}
