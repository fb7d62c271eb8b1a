//! podman drives runv (`podman --runtime runv`): private storage, run root and runtime state,
//! inside the sandbox's network and mount namespaces (netavark's bridge and rules live there).

mod engines;
mod spec_check;

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
        self.podman_with(RUNV, args)
    }

    /// podman with `runtime` (runv, or runc as the reference), each with its own state root.
    fn podman_with(&self, runtime: &str, args: &[&str]) -> Command {
        let name = if runtime == RUNV { "runv" } else { runtime };
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
            .arg(runtime)
            .arg("--runtime-flag")
            .arg(format!(
                "root={}",
                self.sb.path(&format!("{name}-state")).display()
            ));
        // Cold starts, as for the other engines (conmon does not pass podman's environment
        // on to the runtime, so this is a runtime flag).
        if runtime == RUNV {
            c.args(["--runtime-flag", "template=off"]);
        }
        c.args(args);
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

/// The flags people use to lock a container down and limit it, under runc and under runv: the
/// container sees the same (capabilities, read-only root, limits, seccomp, sysctl, device), and
/// on the host the VM's monitor and qemu sit in the container's cgroup with its CPU quota and a
/// memory limit of the guest's RAM plus the VMM's overhead.
#[test]
fn podman_security_and_resource_flags_apply_as_under_runc() {
    let Some(p) = Podman::start() else { return };
    if !have(&["runc"]) {
        panic!("runc is needed as the reference (scripts/setup.sh installs it)");
    }
    let mut flags = engines::LOCKDOWN_FLAGS.to_vec();
    flags.extend([
        // podman raises RLIMIT_NPROC to the kernel's maximum by default, which this host's
        // runc may not (no CAP_SYS_RESOURCE here): ask for a lower one.
        "--ulimit",
        "nproc=4096:4096",
        // podman's default profile, named as a file (docker's test uses its built-in one).
        "--security-opt",
        "seccomp=/usr/share/containers/seccomp.json",
    ]);
    let run = |runtime: &str| {
        let mut args = vec!["run", "--rm"];
        args.extend(flags.iter().copied());
        args.extend([IMAGE, "sh", "-c", spec_check::CHECKER]);
        let out = p.sb.run(&mut p.podman_with(runtime, &args), 180, None);
        assert!(out.status.success(), "podman --runtime {runtime}: {out}");
        spec_check::normalize_engine(&out.stdout)
    };
    let reference = run("runc");
    let got = run(RUNV);
    assert_eq!(
        got, reference,
        "what the container sees under runv (left) and runc (right)"
    );
    for want in [
        "CapEff:\t0000000000000400",
        "Seccomp:\t2",
        "Max open files            1024                 2048",
    ] {
        assert!(got.contains(want), "{want:?} in {got}");
    }

    // The host side: the monitor and its qemu in the container's cgroup, with its limits.
    let mut args = vec!["run", "-d", "--name", "limited"];
    args.extend(flags.iter().copied());
    args.extend([IMAGE, "sleep", "600"]);
    p.ok(&args, 180);
    let id = p
        .ok(&["inspect", "-f", "{{.Id}}", "limited"], 30)
        .stdout
        .trim()
        .to_string();
    let state =
        p.sb.ok(
            p.sb.cmd(RUNV)
                .arg("--root")
                .arg(p.sb.path("runv-state"))
                .args(["state", &id]),
            30,
        )
        .stdout;
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    engines::assert_vm_in_cgroup(state["pid"].as_i64().unwrap(), 50000, 256 + 64 + 128);
    p.ok(&["rm", "-f", "-t", "0", "limited"], 60);
}
