//! docker drives runv: a private dockerd (own data root, exec root, socket, and network and
//! mount namespaces) with runv added as a runtime through daemon.json, as the README shows.

mod engines;
mod spec_check;

use std::process::Command;
use std::sync::Mutex;

use engines::{IMAGE, Out, RUNV, Sandbox, TRAP_TERM, have};

/// One VM-heavy engine test at a time (2 cores, TCG).
static SERIAL: Mutex<()> = Mutex::new(());

struct Docker {
    sb: Sandbox,
}

impl Docker {
    /// None (with a "skipped" line) when docker is not installed.
    fn start(tag: &str) -> Option<Docker> {
        if !have(&[
            "dockerd",
            "docker",
            "containerd",
            "unshare",
            "nsenter",
            "iptables",
        ]) {
            return None;
        }
        let mut sb = Sandbox::new(tag);
        // A second runtime whose runtimeArgs name a runv config file (VMs with 2 vCPUs).
        std::fs::write(sb.path("runv.toml"), "[vm]\nvcpus = 2\n").unwrap();
        let config = serde_json::json!({
            "runtimes": {
                "runv": {"path": RUNV},
                "runv-2cpu": {
                    "path": RUNV,
                    "runtimeArgs": ["--config", sb.path("runv.toml")],
                },
                // VM templates: a template is made after the first start, later starts
                // restore it.
                "runv-tmpl": {
                    "path": RUNV,
                    "runtimeArgs": ["--template", "auto", "--template-dir", sb.path("templates")],
                },
            },
            // A private bridge in the sandbox's network namespace.
            "bip": "10.99.0.1/24",
        });
        std::fs::write(sb.path("daemon.json"), config.to_string()).unwrap();
        let mut dockerd = sb.cmd("dockerd");
        dockerd
            .arg("--config-file")
            .arg(sb.path("daemon.json"))
            .arg("--data-root")
            .arg(sb.path("data"))
            .arg("--exec-root")
            .arg(sb.path("x"))
            .arg("--pidfile")
            .arg(sb.path("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sb.path("docker.sock").display()))
            .args(["--storage-driver", "overlay2", "--userland-proxy=false"]);
        sb.spawn_daemon(dockerd, "dockerd.log");
        let d = Docker { sb };
        d.sb.wait_for("dockerd to answer", 60, |_| {
            d.run(&["version"], 10).status.success()
        });
        let tar = d.sb.rootfs_tar();
        d.ok(&["import", tar.to_str().unwrap(), IMAGE], 60);
        Some(d)
    }

    fn docker(&self, args: &[&str]) -> Command {
        let mut c = self.sb.host_cmd("docker");
        c.arg("-H")
            .arg(format!("unix://{}", self.sb.path("docker.sock").display()))
            .args(args);
        c
    }

    fn run(&self, args: &[&str], secs: u64) -> Out {
        self.sb.run(&mut self.docker(args), secs, None)
    }

    fn ok(&self, args: &[&str], secs: u64) -> Out {
        let out = self.run(args, secs);
        assert!(
            out.status.success(),
            "docker {args:?}: {out}\n--- dockerd.log (end)\n{}",
            self.log_tail()
        );
        out
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.sb.path("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn docker_run_output_exit_code_stdin_tty() {
    let _serial = lock();
    let Some(d) = Docker::start("dk1") else {
        return;
    };
    let out = d.ok(
        &["run", "--rm", "--runtime", "runv", IMAGE, "echo", "hi"],
        120,
    );
    assert_eq!(out.stdout, "hi\n");

    let out = d.run(
        &[
            "run",
            "--rm",
            "--runtime",
            "runv",
            IMAGE,
            "sh",
            "-c",
            "exit 7",
        ],
        120,
    );
    assert_eq!(out.code(), 7, "{out}");

    let out = d.sb.run(
        &mut d.docker(&["run", "--rm", "-i", "--runtime", "runv", IMAGE, "cat"]),
        120,
        Some("through stdin\n"),
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.stdout, "through stdin\n");

    let out = d.ok(
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            "runv",
            IMAGE,
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo has-a-tty",
        ],
        120,
    );
    assert!(out.stdout.contains("has-a-tty"), "{out}");
    // A tty turns "\n" into "\r\n".
    assert!(out.stdout.contains("\r\n"), "{out}");
}

#[test]
fn docker_detached_exec_pause_stop_kill_rm() {
    let _serial = lock();
    let Some(d) = Docker::start("dk2") else {
        return;
    };
    d.ok(
        &[
            "run",
            "-d",
            "--name",
            "c1",
            "--runtime",
            "runv",
            IMAGE,
            "sh",
            "-c",
            TRAP_TERM,
        ],
        120,
    );
    let out = d.run(&["exec", "c1", "sh", "-c", "echo in-exec; exit 5"], 60);
    assert_eq!(out.code(), 5, "{out}");
    assert_eq!(out.stdout, "in-exec\n");
    let out = d.ok(
        &["exec", "-t", "c1", "sh", "-c", "[ -t 1 ] && echo exec-tty"],
        60,
    );
    assert!(out.stdout.contains("exec-tty"), "{out}");
    let out = d.sb.run(
        &mut d.docker(&["exec", "-i", "c1", "cat"]),
        60,
        Some("exec stdin\n"),
    );
    assert_eq!(out.stdout, "exec stdin\n", "{out}");

    d.ok(&["pause", "c1"], 30);
    let out = d.ok(&["inspect", "-f", "{{.State.Status}}", "c1"], 30);
    assert_eq!(out.stdout.trim(), "paused");
    d.ok(&["unpause", "c1"], 30);
    let out = d.ok(&["inspect", "-f", "{{.State.Status}}", "c1"], 30);
    assert_eq!(out.stdout.trim(), "running");

    // SIGTERM reaches the process in the guest: its trap runs and decides the exit code.
    d.ok(&["stop", "-t", "30", "c1"], 60);
    let out = d.ok(&["inspect", "-f", "{{.State.ExitCode}}", "c1"], 30);
    assert_eq!(out.stdout.trim(), "3");
    let out = d.ok(&["logs", "c1"], 30);
    assert!(out.stdout.contains("got TERM"), "{out}");
    d.ok(&["rm", "c1"], 30);

    d.ok(
        &[
            "run",
            "-d",
            "--name",
            "c2",
            "--runtime",
            "runv",
            IMAGE,
            "sleep",
            "600",
        ],
        120,
    );
    d.ok(&["kill", "c2"], 30);
    let out = d.ok(&["wait", "c2"], 60);
    assert_eq!(out.stdout.trim(), "137");
    d.ok(&["rm", "c2"], 30);
    let out = d.ok(&["ps", "-aq"], 30);
    assert_eq!(out.stdout.trim(), "", "containers left");
}

#[test]
fn docker_network_bridge_address_server_gateway_dns() {
    let _serial = lock();
    let Some(d) = Docker::start("dk3") else {
        return;
    };
    d.ok(
        &[
            "run",
            "-d",
            "--name",
            "web",
            "--runtime",
            "runv",
            IMAGE,
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-the-vm > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
        120,
    );
    let ip = d
        .ok(
            &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "web"],
            30,
        )
        .stdout
        .trim()
        .to_string();
    assert!(ip.starts_with("10.99.0."), "docker assigned {ip:?}");

    // The guest interface has the address docker assigned (and the veth's MAC).
    let out = d.ok(&["exec", "web", "ip", "-4", "addr", "show", "eth0"], 60);
    assert!(out.stdout.contains(&format!("inet {ip}/24")), "{out}");
    let mac = d
        .ok(
            &["inspect", "-f", "{{.NetworkSettings.MacAddress}}", "web"],
            30,
        )
        .stdout
        .trim()
        .to_string();
    assert!(
        out.stdout.contains(&format!("ether {mac}")) || mac.is_empty() || {
            let link = d.ok(&["exec", "web", "ip", "link", "show", "eth0"], 60);
            link.stdout.contains(&mac)
        }
    );

    // The server in the VM answers on the bridge, from the (sandbox's) host side.
    let mut last = None;
    for _ in 0..30 {
        // (busybox 1.35's `wget -q` crashes; nc speaks HTTP/1.0 well enough.)
        let out = d.sb.run(
            d.sb.cmd("busybox").args(["nc", "-w", "3", &ip, "8080"]),
            10,
            Some("GET / HTTP/1.0\r\n\r\n"),
        );
        if out.stdout.contains("hello-from-the-vm") {
            last = None;
            break;
        }
        last = Some(out);
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(
        last.is_none(),
        "the server in the VM is not reachable: {}",
        last.unwrap()
    );

    // The container reaches the bridge's gateway.
    let out = d.run(
        &["exec", "web", "ping", "-c", "1", "-W", "5", "10.99.0.1"],
        60,
    );
    assert!(out.status.success(), "ping gateway: {out}");

    // DNS files: what docker wrote is what the container sees.
    for (what, field) in [
        ("/etc/resolv.conf", "{{.ResolvConfPath}}"),
        ("/etc/hosts", "{{.HostsPath}}"),
    ] {
        let path = d.ok(&["inspect", "-f", field, "web"], 30).stdout;
        let written = std::fs::read_to_string(path.trim()).unwrap();
        let seen = d.ok(&["exec", "web", "cat", what], 60).stdout;
        assert_eq!(seen, written, "{what}");
    }

    // --network none: only loopback.
    let out = d.ok(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--runtime",
            "runv",
            IMAGE,
            "ip",
            "-o",
            "link",
        ],
        120,
    );
    assert!(out.stdout.contains("lo:"), "{out}");
    assert!(!out.stdout.contains("eth0"), "{out}");

    d.ok(&["rm", "-f", "web"], 60);
}

/// docker's lock-down and limit flags (and its built-in default seccomp profile) under runc
/// and under runv: the container sees the same, and the VM's host side sits in the
/// container's cgroup with the CPU quota and memory limit docker set.
#[test]
fn docker_security_and_resource_flags_apply_as_under_runc() {
    let _serial = lock();
    let Some(d) = Docker::start("dk-flags") else {
        return;
    };
    let flags = engines::LOCKDOWN_FLAGS;
    let run = |runtime: &str| {
        let mut args = vec!["run", "--rm", "--runtime", runtime];
        args.extend(flags);
        args.extend([IMAGE, "sh", "-c", spec_check::CHECKER]);
        let out = d.ok(&args, 180);
        spec_check::normalize_engine(&out.stdout)
    };
    let reference = run("runc");
    let got = run("runv");
    assert_eq!(
        got, reference,
        "what the container sees under runv (left) and runc (right)"
    );
    assert!(
        got.contains("Seccomp:\t2"),
        "docker's default profile: {got}"
    );

    let mut args = vec!["run", "-d", "--runtime", "runv", "--name", "limited"];
    args.extend(flags);
    args.extend([IMAGE, "sleep", "600"]);
    d.ok(&args, 180);
    let id = d
        .ok(&["inspect", "-f", "{{.Id}}", "limited"], 30)
        .stdout
        .trim()
        .to_string();
    // Wherever docker keeps runv's state: the monitor names its state dir.
    let monitor = engines::monitor_of(&id).expect("the container's runv monitor");
    engines::assert_vm_in_cgroup(monitor, 50000, 256 + 64 + 128);
    d.ok(&["rm", "-f", "limited"], 60);
}

#[test]
fn docker_passes_runtime_args_to_runv() {
    let _serial = lock();
    let Some(d) = Docker::start("dk4") else {
        return;
    };
    let out = d.ok(
        &["run", "--rm", "--runtime", "runv-2cpu", IMAGE, "nproc"],
        120,
    );
    assert_eq!(out.stdout, "2\n");
    let out = d.ok(&["run", "--rm", "--runtime", "runv", IMAGE, "nproc"], 120);
    assert_eq!(out.stdout, "1\n");
}

/// Templates through docker's runtimeArgs: the first start is cold and leaves a template
/// behind; later containers are clones (their VMM maps the template's memory file) with the
/// same results as a cold start.
#[test]
fn docker_runs_containers_from_a_vm_template() {
    let _serial = lock();
    let Some(d) = Docker::start("dk5") else {
        return;
    };
    let store = d.sb.path("templates");
    let probe = "hostname; echo out; exit 3";
    let run = || {
        let out = d.run(
            &[
                "run",
                "--rm",
                "--runtime",
                "runv-tmpl",
                IMAGE,
                "sh",
                "-c",
                probe,
            ],
            180,
        );
        assert_eq!(out.code(), 3, "{out}");
        out.stdout
    };
    let cold = run();
    let templates = || {
        let out = d.sb.run(
            std::process::Command::new(RUNV)
                .arg("--template-dir")
                .arg(&store)
                .args(["template", "list", "--format", "json"]),
            30,
            None,
        );
        serde_json::from_str::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    };
    d.sb.wait_for("the template made after the first start", 240, |_| {
        templates() == 1
    });
    let id = d
        .ok(
            &["run", "-d", "--runtime", "runv-tmpl", IMAGE, "sleep", "300"],
            180,
        )
        .stdout
        .trim()
        .to_string();
    let clone_vmm = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .any(|c| c.contains("qemu-system") && c.contains(store.to_str().unwrap()));
    assert!(
        clone_vmm,
        "the container's VMM runs from the template's memory file"
    );
    let hostname = d.ok(&["exec", &id, "hostname"], 60).stdout;
    assert_eq!(hostname.trim(), &id[..12], "the clone has its own hostname");
    d.ok(&["rm", "-f", &id], 60);
    let warm = run();
    assert_eq!(warm.lines().nth(1), Some("out"));
    assert_eq!(cold.lines().nth(1), Some("out"));
    assert_ne!(
        warm.lines().next(),
        cold.lines().next(),
        "hostnames per container"
    );
}
