//! End to end: boots the guest image (`cargo xtask guest`) in QEMU with TCG and drives the
//! agent through the host client. One VM serves all checks: TCG boots cost seconds.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runv_proto::client::{AgentClient, Error};
use runv_proto::*;

const T: Duration = Duration::from_secs(60);

/// Kills qemu and removes the temp dir, also when a check panics.
struct Vm {
    qemu: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

fn make_rootfs(root: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
}

fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

fn spec(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "consoleSize": {"height": 24, "width": 80},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "e2e",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    fn wait_for(&self, needle: &str) {
        let t0 = Instant::now();
        while !self.text().contains(needle) {
            assert!(
                t0.elapsed() < T,
                "timed out waiting for {needle:?}; got {:?}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A sink that takes its time with every write.
#[derive(Clone)]
struct Slow(Buf);

impl Write for Slow {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_millis(5));
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_exit(ev: &Receiver<Event>, cid: &str, exec: Option<&str>) -> ExitStatus {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ev.recv_timeout(left) {
            Ok(Event::ProcessExited {
                container_id,
                exec_id,
                status,
            }) if container_id == cid && exec_id.as_deref() == exec => return status,
            Ok(_) => {}
            Err(e) => panic!("no exit event for {cid}/{exec:?}: {e}"),
        }
    }
}

#[test]
fn agent_in_a_vm() {
    if !which("qemu-system-x86_64") {
        eprintln!("skipped: no qemu-system-x86_64");
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: no /bin/busybox (busybox-static)");
        return;
    }
    // `$RUNV_GUEST_DIR` (e.g. runv's own kernel, target/guest/runv), else Debian's.
    let guest = std::env::var_os("RUNV_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initrd.img"));
    assert!(
        kernel.exists() && initrd.exists(),
        "{} has no vmlinux/initrd.img: run `cargo xtask guest` first",
        guest.display()
    );

    let dir = std::env::temp_dir().join(format!("runv-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = dir.join("rootfs");
    make_rootfs(&rootfs);
    let sock = dir.join("agent.sock");
    let console = dir.join("console.log");

    let mut append = String::from("console=ttyS0 panic=-1 runv.log=debug");
    if let Some(khz) = host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let t0 = Instant::now();
    let qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,rtc=on",
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            sock.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.runv.agent",
        ])
        .arg("-fsdev")
        .arg(format!(
            "local,id=fs0,path={},security_model=none",
            rootfs.display()
        ))
        .args(["-device", "virtio-9p-device,fsdev=fs0,mount_tag=rootfs"])
        .stdin(Stdio::null())
        .spawn()
        .expect("start qemu");
    let mut vm = Vm { qemu, dir };
    let console_tail = || std::fs::read_to_string(&console).unwrap_or_default();

    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(t0.elapsed() < T, "qemu never created {}", sock.display());
        if let Ok(Some(st)) = vm.qemu.try_wait() {
            panic!("qemu exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let agent = AgentClient::connect(stream.into(), T)
        .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", console_tail()));
    eprintln!(
        "boot to agent handshake: {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    let ev = agent.subscribe();
    assert!(matches!(
        agent.request(Request::Ping, T).unwrap(),
        ResponseBody::Pong { .. }
    ));
    let share = Rootfs {
        source: RootfsSource::Share {
            tag: "rootfs".into(),
        },
        readonly: false,
    };

    // c1: stdin reaches the process, stdout and stderr stay apart, exit code 42.
    let (out, err) = (Buf::default(), Buf::default());
    let ho = agent.attach_output(2, Box::new(out.clone()));
    let he = agent.attach_output(3, Box::new(err.clone()));
    let r = agent.request(
        Request::CreateContainer {
            id: "c1".into(),
            spec: spec(
                &[
                    "sh",
                    "-c",
                    "read line; echo \"got $line\"; echo oops >&2; hostname; exit 42",
                ],
                false,
            ),
            rootfs: share.clone(),
            stdio: runv_proto::Stdio {
                terminal: false,
                stdin: Some(1),
                stdout: 2,
                stderr: Some(3),
            },
            hostname: None,
            hosts: Some("127.0.0.1 localhost\n".into()),
            resolv_conf: None,
            pod_sandbox: None,
        },
        T,
    );
    r.unwrap_or_else(|e| panic!("create c1: {e}\nconsole:\n{}", console_tail()));
    agent.send_input(1, b"hello\n").unwrap();
    agent.close_input(1).unwrap();
    agent
        .request(Request::StartContainer { id: "c1".into() }, T)
        .unwrap();
    assert_eq!(wait_exit(&ev, "c1", None), ExitStatus::Exited(42));
    assert!(ho.wait(T) && he.wait(T));
    assert_eq!(out.text(), "got hello\ne2e\n");
    assert_eq!(err.text(), "oops\n");

    // c2, alongside c1: a long-running init.
    agent
        .request(
            Request::CreateContainer {
                id: "c2".into(),
                spec: spec(&["sh", "-c", "sleep 1000; true"], false),
                rootfs: share.clone(),
                stdio: runv_proto::Stdio {
                    terminal: false,
                    stdin: None,
                    stdout: 10,
                    stderr: Some(11),
                },
                hostname: None,
                hosts: None,
                resolv_conf: None,
                pod_sandbox: None,
            },
            T,
        )
        .unwrap();
    agent
        .request(Request::StartContainer { id: "c2".into() }, T)
        .unwrap();

    // /proc/1/cmdline inside the container is the container's init.
    let o = Buf::default();
    let h = agent.attach_output(20, Box::new(o.clone()));
    let exec = |id: &str, args: &[&str], stdio: runv_proto::Stdio| {
        agent.request(
            Request::Exec {
                container_id: "c2".into(),
                exec_id: id.into(),
                process: spec(args, stdio.terminal)["process"].clone(),
                stdio,
            },
            T,
        )
    };
    let plain = |out| runv_proto::Stdio {
        terminal: false,
        stdin: None,
        stdout: out,
        stderr: None,
    };
    exec("e1", &["cat", "/proc/1/cmdline"], plain(20)).unwrap();
    assert_eq!(wait_exit(&ev, "c2", Some("e1")), ExitStatus::Exited(0));
    assert!(h.wait(T));
    assert_eq!(o.text(), "sh\0-c\0sleep 1000; true\0");

    // Output the agent splices from the process's pipes (issue 16), several frames' worth
    // on stdout and stderr at once, to sinks slower than the guest: every byte arrives, in
    // order, each on its own stream, while the flow control holds the rest in the guest.
    let (big_out, big_err) = (Slow(Buf::default()), Slow(Buf::default()));
    let hb = agent.attach_output(23, Box::new(big_out.clone()));
    let hbe = agent.attach_output(24, Box::new(big_err.clone()));
    exec(
        "big",
        &["sh", "-c", "seq 1 100000 >&2 & seq 1 200000; wait"],
        runv_proto::Stdio {
            terminal: false,
            stdin: None,
            stdout: 23,
            stderr: Some(24),
        },
    )
    .unwrap();
    assert_eq!(wait_exit(&ev, "c2", Some("big")), ExitStatus::Exited(0));
    assert!(hb.wait(T) && hbe.wait(T));
    let seq = |n: u32| (1..=n).map(|i| format!("{i}\n")).collect::<String>();
    assert!(big_out.0.text() == seq(200000), "stdout differs");
    assert!(big_err.0.text() == seq(100000), "stderr differs");

    // A missing binary: runc's message and 127.
    match exec("e2", &["/bin/nope"], plain(21)) {
        Err(Error::Agent(e)) => {
            assert_eq!(e.code, 127);
            assert_eq!(
                e.message,
                "exec: \"/bin/nope\": stat /bin/nope: no such file or directory"
            );
        }
        other => panic!("exec of a missing binary: {other:?}"),
    }
    match exec("e3", &["nope"], plain(22)) {
        Err(Error::Agent(e)) => {
            assert_eq!(
                (e.code, e.message.as_str()),
                (127, "exec: \"nope\": executable file not found in $PATH")
            )
        }
        other => panic!("exec of a missing command: {other:?}"),
    }

    // A terminal: the window size change is seen by `stty size`.
    let tty = Buf::default();
    let ht = agent.attach_output(31, Box::new(tty.clone()));
    exec(
        "e4",
        &["sh", "-c", "stty size; read x; stty size"],
        runv_proto::Stdio {
            terminal: true,
            stdin: Some(30),
            stdout: 31,
            stderr: None,
        },
    )
    .unwrap();
    tty.wait_for("24 80");
    agent
        .request(
            Request::WindowSize {
                container_id: "c2".into(),
                exec_id: Some("e4".into()),
                rows: 40,
                cols: 100,
            },
            T,
        )
        .unwrap();
    agent.send_input(30, b"\n").unwrap();
    assert_eq!(wait_exit(&ev, "c2", Some("e4")), ExitStatus::Exited(0));
    assert!(ht.wait(T));
    assert!(
        tty.text().contains("40 100"),
        "tty output: {:?}",
        tty.text()
    );

    // ps sees the init.
    match agent
        .request(
            Request::Ps {
                container_id: "c2".into(),
            },
            T,
        )
        .unwrap()
    {
        ResponseBody::Ps { processes } => assert!(
            processes
                .iter()
                .any(|p| p.pid == 1 && p.args == ["sh", "-c", "sleep 1000; true"]),
            "{processes:?}"
        ),
        other => panic!("ps: {other:?}"),
    }

    // SIGKILL is reported as a signal.
    agent
        .request(
            Request::Signal {
                container_id: "c2".into(),
                exec_id: None,
                signal: 9,
                all: false,
            },
            T,
        )
        .unwrap();
    assert_eq!(wait_exit(&ev, "c2", None), ExitStatus::Signaled(9));
    for id in ["c1", "c2"] {
        agent
            .request(Request::RemoveContainer { id: id.into() }, T)
            .unwrap();
    }

    // Shutdown ends the VM, and the client notices.
    agent.request(Request::Shutdown, T).unwrap();
    assert!(agent.wait_disconnected(T).is_some());
    let t1 = Instant::now();
    loop {
        if vm.qemu.try_wait().unwrap().is_some() {
            break;
        }
        assert!(t1.elapsed() < T, "qemu still running after Shutdown");
        std::thread::sleep(Duration::from_millis(50));
    }
}
