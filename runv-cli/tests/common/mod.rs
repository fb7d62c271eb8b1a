//! Helpers for tests that boot real VMs through `runv`: busybox bundles, a private `--root`,
//! commands with timeouts, and checks that nothing is left behind.
#![allow(dead_code)]

pub mod templates;

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const RUNV: &str = env!("CARGO_BIN_EXE_runv");

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The guest the tests boot: `$RUNV_GUEST_DIR` (`target/guest/runv` for runv's own kernel,
/// `cargo xtask kernel`), else `target/guest` (Debian's kernel, runv's default; `cargo xtask
/// guest`).
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("RUNV_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("target/guest"),
    }
}

/// The release of the guest kernel the tests boot.
pub fn guest_release() -> String {
    let f = guest_dir().join("kernel.release");
    fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .to_string()
}

/// Fails with a clear message when what a VM test needs is missing.
pub fn require_guest() {
    let guest = guest_dir();
    for f in ["vmlinux", "initrd.img"] {
        assert!(
            guest.join(f).exists(),
            "{} is missing: run `cargo xtask guest` (or `cargo xtask kernel` for \
             RUNV_GUEST_DIR=target/guest/runv) first",
            guest.join(f).display()
        );
    }
    assert!(
        Path::new(RUNV)
            .parent()
            .unwrap()
            .join("librunv_driver_qemu.so")
            .exists(),
        "the qemu driver plugin is not built: run `cargo build --workspace` first"
    );
}

/// A scratch directory with a private state root and bundles; removed on drop, after every
/// container in it was force-deleted.
pub struct Env {
    pub dir: PathBuf,
    pub root: PathBuf,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        require_guest();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("runv-it-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let root = dir.join("state");
        Env { dir, root }
    }

    pub fn runv(&self) -> Command {
        let mut cmd = Command::new(RUNV);
        // No host config file: the tests must not depend on this machine's /etc/runv.
        // Cold starts: under the default `--template auto` a test's first start would leave a
        // template build running in the background and later tests would run clones. The
        // template tests (`TplEnv`) take the default back.
        cmd.env_remove("RUNV_DRIVER_DIR")
            .env("RUNV_CONFIG", "/dev/null")
            .env("RUNV_TEMPLATE", "off")
            .env("RUNV_AGENT_TIMEOUT", "120")
            .arg("--root")
            .arg(&self.root);
        // Another guest than the default one: through the environment, so that a spec's `vm`
        // section and the flags still take precedence as they do for users.
        if std::env::var_os("RUNV_GUEST_DIR").is_some() {
            let guest = guest_dir();
            cmd.env("RUNV_KERNEL", guest.join("vmlinux"))
                .env("RUNV_INITRD", guest.join("initrd.img"));
        }
        cmd
    }

    /// A bundle whose container runs `args` with a busybox rootfs.
    pub fn bundle(&self, name: &str, args: &[&str]) -> PathBuf {
        let bundle = self.dir.join(name);
        make_busybox_rootfs(&bundle.join("rootfs"));
        let out = Command::new(RUNV)
            .args(["spec", "--bundle"])
            .arg(&bundle)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "runv spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.edit_spec(&bundle, |spec| {
            spec["process"]["terminal"] = false.into();
            spec["root"]["readonly"] = false.into();
            spec["process"]["args"] = serde_json::json!(args);
        });
        bundle
    }

    pub fn edit_spec(&self, bundle: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let path = bundle.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        f(&mut spec);
        fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    }

    pub fn state(&self, id: &str) -> serde_json::Value {
        let out = self.run_ok(self.runv().args(["state", id]), 30);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs a runv command with a timeout and returns its output.
    pub fn run(&self, cmd: &mut Command, secs: u64) -> Output {
        output_with_timeout(cmd, Duration::from_secs(secs))
    }

    pub fn run_ok(&self, cmd: &mut Command, secs: u64) -> Output {
        let out = self.run(cmd, secs);
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Every entry of the state root but `.failed` (the kept logs of failed creates, meant to
    /// stay).
    fn container_ids(&self) -> Vec<String> {
        fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|name| name != ".failed")
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks that no container, VM process, mount or state is left.
    pub fn assert_clean(&self) {
        assert!(
            self.container_ids().is_empty(),
            "state left: {:?}",
            self.container_ids()
        );
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(self.dir.to_str().unwrap()),
            "mounts left under {}",
            self.dir.display()
        );
        assert!(qemu_pids_for(&self.dir).is_empty(), "qemu processes left");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for id in self.container_ids() {
            let _ = output_with_timeout(
                Command::new(RUNV)
                    .arg("--root")
                    .arg(&self.root)
                    .args(["delete", "--force", &id]),
                Duration::from_secs(30),
            );
        }
        for pid in qemu_pids_for(&self.dir) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// qemu processes whose command line mentions `dir`.
pub fn qemu_pids_for(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

pub fn make_busybox_rootfs(rootfs: &Path) {
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for d in [
        "proc", "sys", "dev", "etc", "tmp", "root", "usr/bin", "sbin",
    ] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is needed: /bin/busybox");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("busybox", bin.join(applet));
        }
    }
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )
    .unwrap();
    fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    wait_output(child, timeout, &format!("{cmd:?}"))
}

/// How long the output may stay open after the command exited: a process it started (a
/// detached container, or a monitor holding an exec's stdio) may keep the pipe open; the
/// output so far is returned then, instead of waiting for the last writer.
const OUTPUT_GRACE: Duration = Duration::from_secs(10);

/// Reads `pipe` to its end into a buffer shared with the caller; says when it is done.
fn collect(
    pipe: Option<impl Read + Send + 'static>,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    std::sync::mpsc::Receiver<()>,
) {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (done, done_rx) = std::sync::mpsc::channel();
    let shared = std::sync::Arc::clone(&buf);
    std::thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                shared.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        }
        let _ = done.send(());
    });
    (buf, done_rx)
}

pub fn wait_output(mut child: Child, timeout: Duration, what: &str) -> Output {
    let (stdout, out_done) = collect(child.stdout.take());
    let (stderr, err_done) = collect(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {}s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let grace = Instant::now() + OUTPUT_GRACE;
    for done in [out_done, err_done] {
        let _ = done.recv_timeout(grace.saturating_duration_since(Instant::now()));
    }
    let take =
        |b: std::sync::Arc<std::sync::Mutex<Vec<u8>>>| std::mem::take(&mut *b.lock().unwrap());
    Output {
        status,
        stdout: take(stdout),
        stderr: take(stderr),
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until `f` is true, or panics after `secs`.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Env {
    /// Runs a command whose children may outlive it (create, run -d, exec -d): its stdio goes
    /// to files, so waiting does not depend on those children closing pipes.
    pub fn run_files(
        &self,
        cmd: &mut Command,
        secs: u64,
    ) -> (std::process::ExitStatus, String, String) {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let out_path = self.dir.join(format!("out-{n}"));
        let err_path = self.dir.join(format!("err-{n}"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        let out = wait_output(child, Duration::from_secs(secs), &format!("{cmd:?}"));
        (
            out.status,
            fs::read_to_string(&out_path).unwrap_or_default(),
            fs::read_to_string(&err_path).unwrap_or_default(),
        )
    }
}
