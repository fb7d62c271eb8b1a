//! podman drives runv (`podman --runtime runv`): private storage, run root and runtime state,
//! inside the sandbox's network and mount namespaces (netavark's bridge and rules live there).

mod engines;

use std::process::Command;

use engines::{IMAGE, Out, RUNV, Sandbox, TRAP_TERM, have};

struct Podman {
    sb: Sandbox,
}

impl Podman {
    fn start() -> Option<Podman> {
        if !have(&["podman", "conmon", "unshare", "nsenter"]) {
            return None;
        }
        let p = Podman {
            sb: Sandbox::new("pm"),
        };
        let tar = p.sb.rootfs_tar();
        p.ok(&["import", tar.to_str().unwrap(), IMAGE], 60);
        Some(p)
    }

    fn podman(&self, args: &[&str]) -> Command {
        let mut c = self.sb.cmd("podman");
        c.arg("--root")
            .arg(self.sb.path("storage"))
            .arg("--runroot")
            .arg(self.sb.path("run"))
            .arg("--tmpdir")
            .arg(self.sb.path("tmp"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--network-config-dir")
            .arg(self.sb.path("networks"))
            .arg("--runtime")
            .arg(RUNV)
            .arg("--runtime-flag")
            .arg(format!("root={}", self.sb.path("runv-state").display()))
            .args(args);
        c
    }

    fn run(&self, args: &[&str], secs: u64) -> Out {
        self.sb.run(&mut self.podman(args), secs, None)
    }

    fn ok(&self, args: &[&str], secs: u64) -> Out {
        let out = self.run(args, secs);
        assert!(out.status.success(), "podman {args:?}: {out}");
        out
    }
}

#[test]
fn podman_run_exit_code_exec_stop_rm_network() {
    let Some(p) = Podman::start() else { return };
    let out = p.ok(
        &["run", "--rm", "--network", "none", IMAGE, "echo", "hi"],
        120,
    );
    assert_eq!(out.stdout, "hi\n");
    let out = p.run(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            IMAGE,
            "sh",
            "-c",
            "exit 7",
        ],
        120,
    );
    assert_eq!(out.code(), 7, "{out}");

    // Default network: netavark's bridge; the container has the address podman assigned.
    p.ok(
        &["run", "-d", "--name", "c1", IMAGE, "sh", "-c", TRAP_TERM],
        120,
    );
    let ip = p
        .ok(
            &["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "c1"],
            30,
        )
        .stdout
        .trim()
        .to_string();
    assert!(!ip.is_empty(), "podman assigned no address");
    let out = p.ok(&["exec", "c1", "ip", "-4", "addr"], 60);
    assert!(out.stdout.contains(&format!("inet {ip}/")), "{ip}: {out}");
    let out = p.run(&["exec", "c1", "sh", "-c", "echo in-exec; exit 5"], 60);
    assert_eq!(out.code(), 5, "{out}");
    assert_eq!(out.stdout, "in-exec\n");

    p.ok(&["stop", "-t", "30", "c1"], 60);
    let out = p.ok(&["inspect", "-f", "{{.State.ExitCode}}", "c1"], 30);
    assert_eq!(out.stdout.trim(), "3", "SIGTERM reaches the guest process");
    assert!(p.ok(&["logs", "c1"], 30).stdout.contains("got TERM"));
    p.ok(&["rm", "c1"], 60);
    assert_eq!(p.ok(&["ps", "-aq"], 30).stdout.trim(), "");
}
