//! The block-rootfs path end to end, without device-mapper: an ext4 image made from a busybox
//! rootfs is given to a real VM (qemu driver, TCG here) as a virtio-blk disk with serial
//! `rootfs`, exactly as the monitor does for a `RootfsSource::Block`, and the agent mounts it as
//! a container's rootfs. Needs `cargo xtask guest` (target/guest), qemu, busybox and mkfs.ext4.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use runv_api::{BlockDevice, Vm, VmConfig};
use runv_driver_qemu::QemuDriver;
use runv_proto::client::AgentClient;
use runv_proto::{Event, ExitStatus, Request, Rootfs, RootfsSource};

#[path = "../../driver-qemu/tests/guest_vm/mod.rs"]
mod guest_vm;
use guest_vm::{Scratch, config, logs};

const T: Duration = Duration::from_secs(90);

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

fn make_rootfs(root: &Path) {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    fs::write(root.join("etc/marker"), "from the ext4 image\n").unwrap();
}

fn spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "blk",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ]
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
}

fn wait_exit(ev: &Receiver<Event>, cid: &str) -> ExitStatus {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ev.recv_timeout(left) {
            Ok(Event::ProcessExited {
                container_id,
                exec_id: None,
                status,
            }) if container_id == cid => return status,
            Ok(_) => {}
            Err(e) => panic!("no exit event for {cid}: {e}"),
        }
    }
}

/// Reads a file out of an ext4 image on the host, without mounting it.
fn debugfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn container_runs_from_an_ext4_disk() {
    for tool in ["qemu-system-x86_64", "mkfs.ext4", "debugfs"] {
        if !which(tool) {
            eprintln!("skipped: no {tool}");
            return;
        }
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: no /bin/busybox (busybox-static)");
        return;
    }
    let scratch = Scratch::new("blkvm");
    let rootfs = scratch.0.join("rootfs");
    make_rootfs(&rootfs);
    let image = scratch.0.join("rootfs.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&rootfs)
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed: {st}");

    let config = VmConfig {
        block_devices: vec![BlockDevice {
            id: "rootfs".into(),
            host_path: image.clone(),
            readonly: false,
        }],
        ..config(&scratch, "blkvm")
    };
    let vm = QemuDriver::new()
        .start(&config)
        .unwrap_or_else(|e| panic!("start_vm: {e}\n{}", logs(&scratch)));
    let agent = AgentClient::connect(vm.take_agent_channel().unwrap(), T)
        .unwrap_or_else(|e| panic!("agent handshake: {e}\n{}", logs(&scratch)));
    let ev = agent.subscribe();

    let (out, err) = (Buf::default(), Buf::default());
    let ho = agent.attach_output(2, Box::new(out.clone()));
    let he = agent.attach_output(3, Box::new(err.clone()));
    let script = "cat /etc/marker; grep ' / ' /proc/mounts | cut -d' ' -f3; \
                  echo written-in-the-guest > /etc/new-file; ls /bin/busybox; exit 7";
    agent
        .request(
            Request::CreateContainer {
                id: "b1".into(),
                spec: spec(&["sh", "-c", script]),
                rootfs: Rootfs {
                    source: RootfsSource::Block {
                        serial: "rootfs".into(),
                        fs_type: "ext4".into(),
                    },
                    readonly: false,
                },
                stdio: runv_proto::Stdio {
                    terminal: false,
                    stdin: None,
                    stdout: 2,
                    stderr: Some(3),
                },
                hostname: None,
                hosts: None,
                resolv_conf: None,
                pod_sandbox: None,
            },
            T,
        )
        .unwrap_or_else(|e| panic!("create b1: {e}\n{}", logs(&scratch)));
    agent
        .request(Request::StartContainer { id: "b1".into() }, T)
        .unwrap();
    assert_eq!(
        wait_exit(&ev, "b1"),
        ExitStatus::Exited(7),
        "{}",
        err.text()
    );
    assert!(ho.wait(T) && he.wait(T));
    assert_eq!(
        out.text(),
        "from the ext4 image\next4\n/bin/busybox\n",
        "stderr: {}",
        err.text()
    );

    // The container's write (not synced by the container) reached the disk image: the agent
    // syncs before it answers `Shutdown`, so the host ends the VM at once, as the monitor does.
    let answer = agent.request(Request::Shutdown, T);
    assert!(
        matches!(answer, Ok(runv_proto::ResponseBody::Synced)),
        "{answer:?}"
    );
    vm.stop(Duration::ZERO).unwrap();
    let exit = vm.wait().unwrap();
    assert_eq!((exit.code, exit.signal), (0, 0), "{exit:?}");
    drop(vm);
    assert_eq!(
        debugfs_cat(&image, "/etc/new-file"),
        "written-in-the-guest\n"
    );
    assert!(scratch.processes().is_empty(), "qemu still running");
}
