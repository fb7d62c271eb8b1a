//! What the test-host tests share: paths, busybox bundles, reading `KEY=value` output, and
//! running a script in the test host with one retry when the host wedges.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The guest the tests boot: `$RUNV_GUEST_DIR` (`target/guest/runv` for runv's own kernel,
/// `cargo xtask kernel`), else `target/guest` (Debian's kernel, the default; `cargo xtask
/// guest`).
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("RUNV_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => target_dir().join("guest"),
    }
}

/// The runv flags that boot [`guest_dir`]'s kernel and initrd: none for the default guest.
pub fn guest_flags() -> Vec<String> {
    if std::env::var_os("RUNV_GUEST_DIR").is_none() {
        return Vec::new();
    }
    let dir = guest_dir();
    let path = |f: &str| {
        let p = dir.join(f);
        assert!(p.is_file(), "{} is missing (RUNV_GUEST_DIR)", p.display());
        p.to_str().expect("a UTF-8 guest path").to_string()
    };
    vec![
        "--kernel".into(),
        path("vmlinux"),
        "--initrd".into(),
        path("initrd.img"),
    ]
}

/// The guest kernel's release (`kernel.release` beside it).
pub fn guest_release() -> String {
    let f = guest_dir().join("kernel.release");
    fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .to_string()
}

/// A busybox bundle whose container runs `args` (as `cargo xtask demo` makes it).
pub fn make_bundle(runv: &Path, dir: &Path, args: &[&str]) {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox not found: install busybox-static"
    );
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("busybox", rootfs.join("bin").join(applet));
        }
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let st = Command::new(runv)
        .args(["spec", "--bundle"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "runv spec failed");
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(args);
    spec["root"]["readonly"] = false.into();
    fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
}

/// The value after `KEY=` on the first line that starts with it.
pub fn value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
}

pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The host's qemu-system-x86_64, or why the test host cannot boot: `Err` fails (qemu
/// missing), `Ok(None)` skips (no TCG accelerator, said on stderr).
pub fn qemu_with_tcg(test: &str) -> Option<PathBuf> {
    let qemu = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file());
    let Some(qemu) = qemu else {
        panic!("qemu-system-x86_64 not found: install qemu-system-x86 (scripts/setup.sh does)");
    };
    let accels = Command::new(&qemu)
        .args(["-accel", "help"])
        .output()
        .unwrap();
    if !String::from_utf8_lossy(&accels.stdout)
        .lines()
        .any(|l| l.trim() == "tcg")
    {
        eprintln!("SKIPPED {test}: {} has no TCG accelerator", qemu.display());
        return None;
    }
    Some(qemu)
}

/// Fails, naming the missing file, unless the workspace build and the guest files exist.
/// `files` under target/ exist; a `guest/` file is looked for in [`guest_dir`].
pub fn assert_built(files: &[&str]) {
    let target = target_dir();
    for f in files {
        let needed = match f.strip_prefix("guest/") {
            Some(g) => guest_dir().join(g),
            None => target.join(f),
        };
        assert!(
            needed.exists(),
            "{} is missing: run `cargo build --workspace` and `cargo xtask guest` (or \
             `cargo xtask kernel` for RUNV_GUEST_DIR=target/guest/runv) first",
            needed.display()
        );
    }
}

/// Runs `sh SCRIPT ARGS...` in a test host. A test host that wedges (nested TCG+SVM does now
/// and then: all its timers stop, so even a script's own `timeout`s do not fire) ends at
/// `timeout_s` with status 124 and is retried once, saying so.
pub fn run_in_test_host(script: &Path, args: &[&Path], timeout_s: u32) -> Output {
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args([
                "vmtest",
                "--no-build",
                "--timeout",
                &timeout_s.to_string(),
                "--",
            ])
            .arg("sh")
            .arg(script)
            .args(args)
            .current_dir(workspace())
            .output()
            .unwrap()
    };
    let mut out = run();
    if out.status.code() == Some(124) {
        eprintln!(
            "the test host timed out (output so far:\n{}); retrying once",
            String::from_utf8_lossy(&out.stdout)
        );
        out = run();
    }
    out
}
