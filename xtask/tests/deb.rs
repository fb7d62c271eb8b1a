//! `cargo xtask deb` as a distribution would use it: install `runv` and `runv-driver-qemu` with
//! dpkg, run a container with `runv --driver-dir /usr/lib/runv`, see exactly qemu in
//! `runv drivers`, add `runv-storage-overlay` and run on it, have dpkg refuse a plugin built for
//! another runv-api, and purge everything, leaving none of the packages' files.
//!
//! It installs into /usr, so it runs only as root, and only where no runv package is installed
//! already (it would not be ours to purge). Development builds never load /usr/lib/runv's
//! plugins (runv-cli's plugins.rs: only the first default directory with plugins is searched),
//! so the other tests running meanwhile are not affected. Everything is purged on failure too.

mod common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, make_bundle};

/// In the order they can be purged (plugins before runv).
const PACKAGES: [&str; 7] = [
    "runv-driver-qemu",
    "runv-driver-kvm-native",
    "runv-driver-kvmtool",
    "runv-driver-xen",
    "runv-storage-overlay",
    "runv-storage-devmapper",
    "runv",
];
const RUNV: &str = "/usr/bin/runv";

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` and kills it after `secs`.
fn output_within(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
            child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
            return Output {
                status,
                stdout: out,
                stderr: err,
            };
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not end within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dpkg(args: &[&str], debs: &[&Path]) -> Output {
    let mut cmd = Command::new("dpkg");
    cmd.args(args).args(debs);
    output_within(&mut cmd, 300)
}

fn dpkg_ok(args: &[&str], debs: &[&Path]) {
    let out = dpkg(args, debs);
    assert!(
        out.status.success(),
        "dpkg {args:?} {debs:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Deletes the test's containers and purges every runv package, whatever happened.
struct Cleanup {
    state: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if Path::new(RUNV).exists() {
            for id in ["deb1", "deb2"] {
                let _ = Command::new(RUNV)
                    .arg("--root")
                    .arg(&self.state)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        let _ = Command::new("dpkg").arg("--purge").args(PACKAGES).output();
    }
}

fn runv(state: &Path) -> Command {
    let mut cmd = Command::new(RUNV);
    // The installed runv as a host would run it: its own config file, no development dirs.
    cmd.env_remove("RUNV_DRIVER_DIR")
        .env_remove("RUNV_CONFIG")
        .env("RUNV_AGENT_TIMEOUT", "120")
        // No template build left running after the test (the default is `auto`).
        .env("RUNV_TEMPLATE", "off")
        .arg("--root")
        .arg(state);
    cmd
}

fn driver_names(state: &Path, extra: &[&str]) -> Vec<String> {
    let out = output_within(
        runv(state)
            .args(extra)
            .args(["drivers", "--format", "json"]),
        60,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let file = d["file"].as_str().unwrap();
            assert!(file.starts_with("/usr/lib/runv/"), "{file}");
            d["name"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn packages_install_run_refuse_a_foreign_abi_and_purge_clean() {
    if !is_root() {
        eprintln!("skipped: installing packages needs root");
        return;
    }
    if let Some(p) = PACKAGES.iter().find(|p| installed(p)) {
        eprintln!("skipped: {p} is installed already (not this test's to purge)");
        return;
    }
    let tmp = TempDir(std::env::temp_dir().join(format!("runv-deb-{}", std::process::id())));
    let debs = tmp.0.join("debs");
    let foreign = tmp.0.join("foreign");
    let state = tmp.0.join("state");
    fs::create_dir_all(&state).unwrap();

    // The development build, packaged; lintian where it is installed (scripts/setup.sh).
    let lintian = Command::new("lintian").arg("--version").output().is_ok();
    let mut build = Command::new(env!("CARGO_BIN_EXE_xtask"));
    build
        .args(["deb", "--profile", "dev", "--no-build", "--out"])
        .arg(&debs)
        .args(["--packages", "runv,runv-driver-qemu,runv-storage-overlay"]);
    if lintian {
        build.arg("--lintian");
    }
    let out = output_within(&mut build, 600);
    assert!(
        out.status.success(),
        "xtask deb: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    if !lintian {
        eprintln!("note: lintian not installed; the packages were not linted");
    }
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["deb", "--profile", "dev", "--no-build", "--out"])
            .arg(&foreign)
            .args(["--packages", "runv-driver-kvmtool", "--abi", "0.999"]),
        600,
    );
    assert!(
        out.status.success(),
        "xtask deb --abi: {}",
        text(&out.stderr)
    );
    let deb = |dir: &Path, name: &str| -> PathBuf {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{name}_"))
            })
            .unwrap_or_else(|| panic!("no {name} package in {}", dir.display()))
    };

    let _cleanup = Cleanup {
        state: state.clone(),
    };
    // A plugin cannot come before runv: nothing provides its ABI yet.
    let out = dpkg(&["-i"], &[&deb(&debs, "runv-driver-qemu")]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("runv-abi-"), "refused for its ABI: {said}");
    assert!(!Path::new("/usr/lib/runv/librunv_driver_qemu.so").exists());
    assert!(!installed("runv-driver-qemu"));

    dpkg_ok(&["-i"], &[&deb(&debs, "runv")]);
    dpkg_ok(&["-i"], &[&deb(&debs, "runv-driver-qemu")]);
    assert_eq!(
        driver_names(&state, &["--driver-dir", "/usr/lib/runv"]),
        ["qemu"]
    );
    // With no flags the installed runv finds its plugins in /usr/lib/runv too.
    assert_eq!(driver_names(&state, &[]), ["qemu"]);
    // The shipped config file (all comments) is read and valid.
    let out = output_within(
        runv(&state).args(["config", "show", "--format", "json"]),
        60,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(config["config"]["value"], "/etc/runv/config.toml");

    let bundle = tmp.0.join("b1");
    make_bundle(
        Path::new(RUNV),
        &bundle,
        &["sh", "-c", "echo hello; exit 7"],
    );
    let out = output_within(
        runv(&state)
            .args(["--driver-dir", "/usr/lib/runv", "run", "--bundle"])
            .arg(&bundle)
            .arg("deb1"),
        300,
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");

    dpkg_ok(&["-i"], &[&deb(&debs, "runv-storage-overlay")]);
    assert_eq!(driver_names(&state, &[]), ["qemu", "overlay"]);
    let bundle = tmp.0.join("b2");
    make_bundle(
        Path::new(RUNV),
        &bundle,
        &["sh", "-c", "echo x > /written; cat /written; exit 3"],
    );
    let out = output_within(
        runv(&state)
            .args(["--driver-dir", "/usr/lib/runv", "--storage", "overlay"])
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg("deb2"),
        300,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "x\n");
    assert!(
        !bundle.join("rootfs/written").exists(),
        "the overlay's write reached the bundle"
    );

    // A plugin package built for another runv-api is refused, and nothing of it is unpacked.
    let out = dpkg(&["-i"], &[&deb(&foreign, "runv-driver-kvmtool")]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("runv-abi-0.999"), "{said}");
    assert!(!Path::new("/usr/lib/runv/librunv_driver_kvmtool.so").exists());
    assert!(!installed("runv-driver-kvmtool"));

    // Purge: every file the packages listed is gone, and their directories.
    let mut files = Vec::new();
    for p in ["runv", "runv-driver-qemu", "runv-storage-overlay"] {
        let out = output_within(Command::new("dpkg").args(["-L", p]), 60);
        assert!(out.status.success());
        files.extend(
            text(&out.stdout)
                .lines()
                .map(PathBuf::from)
                .filter(|p| p.is_file()),
        );
    }
    assert!(
        files
            .iter()
            .any(|f| f == Path::new("/usr/share/runv/vmlinux"))
    );
    assert!(
        files
            .iter()
            .any(|f| f == Path::new("/etc/runv/config.toml"))
    );
    dpkg_ok(
        &["--purge"],
        &[
            Path::new("runv-storage-overlay"),
            Path::new("runv-driver-qemu"),
            Path::new("runv"),
        ],
    );
    let left: Vec<&PathBuf> = files.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    for dir in ["/usr/lib/runv", "/usr/share/runv", "/etc/runv"] {
        assert!(!Path::new(dir).exists(), "{dir} left after purge");
    }
    for p in PACKAGES {
        assert!(!installed(p), "{p} still installed");
    }
    // No state: both containers were run to their end and removed.
    assert_eq!(fs::read_dir(&state).unwrap().count(), 0, "state left");
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
