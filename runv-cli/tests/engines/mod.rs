//! Helpers for the tests that drive runv through real container engines (docker, containerd,
//! podman): a sandbox with its own network and mount namespaces (so the engines' bridges,
//! iptables rules, netns files and mounts never touch the host's), a busybox image as the
//! engines import it, commands with timeouts, and a cleanup that ends everything started.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const RUNV: &str = env!("CARGO_BIN_EXE_runv");
pub const IMAGE: &str = "localhost/runv-busybox:test";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The program's path if it is installed (PATH plus the sbin directories).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// Returns false (and says why) when a binary the test needs is missing.
pub fn have(programs: &[&str]) -> bool {
    for p in programs {
        if which(p).is_none() {
            eprintln!("skipped: {p} not installed");
            return false;
        }
    }
    true
}

/// What the VM needs; missing pieces are a failure (not a skip): the build makes them.
pub fn require_guest() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for f in ["target/guest/vmlinux", "target/guest/initrd.img"] {
        assert!(
            root.join(f).exists(),
            "{f} is missing: run `cargo xtask guest` first"
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

pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status.code(),
            self.stdout,
            self.stderr
        )
    }
}

/// A private temporary directory plus a process holding new network and mount namespaces.
/// Engines run inside those namespaces (`cmd`), so their bridges, firewall rules, netns files
/// and mounts disappear with the holder. Dropping it ends every process that mentions the
/// directory (daemons get SIGTERM first), the holder, and removes the directory.
pub struct Sandbox {
    pub dir: PathBuf,
    holder: Child,
    daemons: Vec<Child>,
}

impl Sandbox {
    pub fn new(tag: &str) -> Sandbox {
        require_guest();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // Short: engines put 64-character ids under it.
        let dir = PathBuf::from(format!("/tmp/rv-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // /run/netns (podman's netns files) is a private tmpfs in the sandbox; the mount point
        // itself is made only if the host lacks it, and removed again then.
        let made_netns_dir = !Path::new("/run/netns").exists();
        let script = format!(
            "set -e; ip link set lo up; mkdir -p /run/netns; mount -t tmpfs tmpfs /run/netns; \
             {} touch {}/ready; exec sleep 3600",
            if made_netns_dir {
                format!("touch {}/made-run-netns;", dir.display())
            } else {
                String::new()
            },
            dir.display()
        );
        let holder = Command::new("unshare")
            .args(["--net", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("holder.err")).unwrap())
            .spawn()
            .expect("unshare (util-linux) is needed");
        let sandbox = Sandbox {
            dir,
            holder,
            daemons: Vec::new(),
        };
        sandbox.wait_for("the namespace holder", 10, |s| s.dir.join("ready").exists());
        sandbox
    }

    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// `program` run inside the sandbox's network and mount namespaces.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-n", "-m", "--"])
            .arg(program);
        c
    }

    /// `program` run in the host's namespaces (clients that only use a unix socket).
    pub fn host_cmd(&self, program: &str) -> Command {
        Command::new(program)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Starts a long-running daemon (stdout and stderr to `log`); it is stopped on drop.
    pub fn spawn_daemon(&mut self, mut cmd: Command, log: &str) {
        let log = fs::File::create(self.dir.join(log)).unwrap();
        // The engine's runv starts VMs cold (the daemons pass their environment on to the
        // runtime): under the default `--template auto` the first container would leave a
        // template build running past the test. Templates through an engine have their own
        // test, which asks for them with runtime flags (they beat the environment).
        let child = cmd
            .env("RUNV_TEMPLATE", "off")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        self.daemons.push(child);
    }

    pub fn wait_for(&self, what: &str, secs: u64, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {secs}s waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `cmd` with a timeout; stdio goes to files so that processes it leaves behind (a
    /// shim, a monitor) cannot keep us waiting for EOF. `stdin` is fed as the command's input.
    pub fn run(&self, cmd: &mut Command, secs: u64, stdin: Option<&str>) -> Out {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let out_path = self.dir.join(format!("out-{n}"));
        let err_path = self.dir.join(format!("err-{n}"));
        let mut child = cmd
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(fs::File::create(&out_path).unwrap())
            .stderr(fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        if let (Some(data), Some(mut input)) = (stdin, child.stdin.take()) {
            let _ = input.write_all(data.as_bytes());
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{cmd:?} did not finish within {secs}s\n--- stdout\n{}\n--- stderr\n{}",
                    fs::read_to_string(&out_path).unwrap_or_default(),
                    fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Out {
            status,
            stdout: fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        }
    }

    /// Like `run`, and fails the test unless the command succeeded.
    pub fn ok(&self, cmd: &mut Command, secs: u64) -> Out {
        let out = self.run(cmd, secs, None);
        assert!(out.status.success(), "{cmd:?} failed: {out}");
        out
    }

    /// A busybox root filesystem as a plain tar (what `docker import`/`podman import` take).
    pub fn rootfs_tar(&self) -> PathBuf {
        let rootfs = self.dir.join("image-rootfs");
        make_busybox_rootfs(&rootfs);
        let tar = self.dir.join("busybox.tar");
        self.ok(
            Command::new("tar")
                .arg("-C")
                .arg(&rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            60,
        );
        tar
    }

    /// The same busybox as an OCI image archive (what `ctr images import` takes).
    pub fn oci_archive(&self, name: &str) -> PathBuf {
        self.oci_image(name, &["sh"])
    }

    /// A busybox OCI image archive named `name` whose command is `cmd`.
    pub fn oci_image(&self, name: &str, cmd: &[&str]) -> PathBuf {
        let layer = fs::read(self.rootfs_tar()).unwrap();
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let layout = self.dir.join(format!("oci-{slug}"));
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| -> (String, usize) {
            let tmp = layout.join("blob.tmp");
            fs::write(&tmp, bytes).unwrap();
            let out = Command::new("sha256sum").arg(&tmp).output().unwrap();
            let digest = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
            fs::rename(&tmp, blobs.join(&digest)).unwrap();
            (digest, bytes.len())
        };
        let (layer_digest, layer_size) = put(&layer);
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        });
        let (config_digest, config_size) = put(config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{config_digest}"), "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
        });
        let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
                           "annotations": {"org.opencontainers.image.ref.name": name,
                                           "io.containerd.image.name": name}}],
        });
        fs::write(layout.join("index.json"), index.to_string()).unwrap();
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let archive = self.dir.join(format!("{slug}-oci.tar"));
        self.ok(
            Command::new("tar")
                .arg("-C")
                .arg(&layout)
                .arg("-cf")
                .arg(&archive)
                .args(["oci-layout", "index.json", "blobs"]),
            60,
        );
        archive
    }

    /// PIDs of processes (other than us) whose command line mentions the sandbox directory.
    fn processes(&self) -> Vec<i32> {
        let needle = self.dir.to_string_lossy().to_string();
        let me = std::process::id() as i32;
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid != me && *pid != self.holder.id() as i32)
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
            .collect()
    }

    fn signal_all(&self, pids: &[i32], signal: &str) {
        for pid in pids {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Daemons first, politely: they stop their containers and shims.
        for d in &self.daemons {
            let _ = Command::new("kill")
                .args(["-TERM", &d.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for d in &mut self.daemons {
            while Instant::now() < deadline && d.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        // Whatever is left (shims, monitors, VMMs, exec helpers).
        for signal in ["-TERM", "-KILL"] {
            let pids = self.processes();
            if pids.is_empty() {
                break;
            }
            self.signal_all(&pids, signal);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !self.processes().is_empty() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        if self.dir.join("made-run-netns").exists() {
            let _ = fs::remove_dir("/run/netns");
        }
        // Mounts lived in the holder's mount namespace and went with it.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn make_busybox_rootfs(rootfs: &Path) {
    let bin = rootfs.join("bin");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root", "sbin"] {
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

/// A `sh -c` script for the container: prints `ready`, then on SIGTERM prints `got TERM` and
/// exits 3 (so a test sees that the signal reached the process in the guest).
pub const TRAP_TERM: &str =
    "trap 'echo got TERM; exit 3' TERM; echo ready; while true; do sleep 0.2; done";

/// The VM of a container runs where the engine put the container: its monitor (`monitor`)
/// and the monitor's qemu in the same host cgroup, with the CPU quota (per 100 ms) and the
/// memory limit (MiB: the guest's RAM plus the VMM's own overhead) the engine asked for.
pub fn assert_vm_in_cgroup(monitor: i64, quota: u64, memory_mib: u64) {
    let cgroup = |pid: i64, controller: &str| -> String {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, names, path) = (f.next()?, f.next()?, f.next()?);
                (names.split(',').any(|n| n == controller) || names.is_empty())
                    .then(|| path.to_string())
            })
            .unwrap()
    };
    let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let dir = |controller: &str| {
        let path = cgroup(monitor, controller);
        if v2 {
            format!("/sys/fs/cgroup{path}")
        } else {
            format!("/sys/fs/cgroup/{controller}{path}")
        }
    };
    assert_ne!(
        cgroup(monitor, "cpu"),
        "/",
        "the monitor left the root cgroup"
    );
    let qemu: Vec<i64> = std::fs::read_to_string(format!("{}/cgroup.procs", dir("cpu")))
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"))
        })
        .collect();
    assert_eq!(
        qemu.len(),
        1,
        "qemu runs in the container's cgroup with its monitor"
    );
    let read = |controller: &str, file: &str| {
        std::fs::read_to_string(format!("{}/{file}", dir(controller)))
            .unwrap()
            .trim()
            .to_string()
    };
    if v2 {
        assert_eq!(read("cpu", "cpu.max"), format!("{quota} 100000"));
    } else {
        assert_eq!(read("cpu", "cpu.cfs_quota_us"), quota.to_string());
    }
    let limit = if v2 {
        read("memory", "memory.max")
    } else {
        read("memory", "memory.limit_in_bytes")
    };
    assert_eq!(limit, (memory_mib * 1024 * 1024).to_string());
}

/// The pid of the runv monitor of container `id` (`runv __monitor <root>/<id>`).
pub fn monitor_of(id: &str) -> Option<i64> {
    fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
        .find(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<String> = c
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.iter().any(|a| a == "__monitor")
                    && args
                        .iter()
                        .any(|a| Path::new(a).file_name() == Some(std::ffi::OsStr::new(id)))
            })
        })
}

/// The flags people lock a container down and limit it with, as docker and podman both take
/// them; the engine tests run the spec checker under them with runc and with runv.
pub const LOCKDOWN_FLAGS: [&str; 19] = [
    "--network",
    "none",
    "--cap-drop",
    "ALL",
    "--cap-add",
    "NET_BIND_SERVICE",
    "--read-only",
    "--ulimit",
    "nofile=1024:2048",
    "--sysctl",
    "net.ipv4.ip_unprivileged_port_start=80",
    "--device",
    "/dev/null:/dev/mydev",
    "--cpus",
    "0.5",
    "--memory",
    "256m",
    "-e",
    "CHECK_SYSCTLS=net.ipv4.ip_unprivileged_port_start",
];
