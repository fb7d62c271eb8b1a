//! containerd drives runv: a private containerd (own root, state, socket, and network and mount
//! namespaces), `ctr run --runc-binary runv` through the stock runc shim (io.containerd.runc.v2).

mod engines;

use std::process::Command;

use engines::{IMAGE, Out, RUNV, Sandbox, TRAP_TERM, have};

struct Containerd {
    sb: Sandbox,
}

impl Containerd {
    fn start() -> Option<Containerd> {
        if !have(&[
            "containerd",
            "ctr",
            "containerd-shim-runc-v2",
            "unshare",
            "nsenter",
        ]) {
            return None;
        }
        let mut sb = Sandbox::new("ctd");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n",
            root = sb.path("root").display(),
            state = sb.path("state").display(),
            sock = sb.path("c.sock").display(),
        );
        std::fs::write(sb.path("config.toml"), config).unwrap();
        let mut daemon = sb.cmd("containerd");
        daemon.arg("--config").arg(sb.path("config.toml"));
        sb.spawn_daemon(daemon, "containerd.log");
        let c = Containerd { sb };
        c.sb.wait_for("containerd to answer", 60, |_| {
            c.run(&["version"], 10).status.success()
        });
        let archive = c.sb.oci_archive(IMAGE);
        c.ok(&["images", "import", archive.to_str().unwrap()], 60);
        Some(c)
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut c = self.sb.host_cmd("ctr");
        c.arg("-a")
            .arg(self.sb.path("c.sock"))
            .args(["-n", "runvtest"])
            .args(args);
        c
    }

    fn run(&self, args: &[&str], secs: u64) -> Out {
        self.sb.run(&mut self.ctr(args), secs, None)
    }

    fn ok(&self, args: &[&str], secs: u64) -> Out {
        let out = self.run(args, secs);
        assert!(out.status.success(), "ctr {args:?}: {out}");
        out
    }

    /// `ctr run` arguments that use runv through the runc shim, with runv's state in the sandbox.
    fn run_args<'a>(&'a self, runc_root: &'a str) -> Vec<&'a str> {
        vec!["run", "--runc-binary", RUNV, "--runc-root", runc_root]
    }
}

#[test]
fn containerd_run_exit_code_exec_kill() {
    let Some(c) = Containerd::start() else { return };
    let runc_root = c.sb.path("runv-state").display().to_string();
    let base = c.run_args(&runc_root);

    let mut args = base.clone();
    args.extend(["--rm", IMAGE, "c1", "echo", "hi"]);
    let out = c.ok(&args, 120);
    assert_eq!(out.stdout, "hi\n");

    let mut args = base.clone();
    args.extend(["--rm", IMAGE, "c2", "sh", "-c", "exit 7"]);
    let out = c.run(&args, 120);
    assert_eq!(out.code(), 7, "{out}");

    let mut args = base.clone();
    args.extend(["-d", IMAGE, "c3", "sh", "-c", TRAP_TERM]);
    c.ok(&args, 120);
    let out = c.run(
        &[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "c3",
            "sh",
            "-c",
            "echo in-exec; exit 5",
        ],
        60,
    );
    assert_eq!(out.code(), 5, "{out}");
    assert_eq!(out.stdout, "in-exec\n");
    c.ok(&["task", "pause", "c3"], 30);
    assert!(c.ok(&["task", "ls"], 30).stdout.contains("PAUSED"));
    c.ok(&["task", "resume", "c3"], 30);
    c.ok(&["task", "kill", "c3"], 30);
    let mut stopped = false;
    for _ in 0..100 {
        if c.ok(&["task", "ls"], 30).stdout.contains("STOPPED") {
            stopped = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(stopped, "the task did not stop after SIGTERM");
    c.ok(&["task", "delete", "c3"], 60);
    c.ok(&["containers", "rm", "c3"], 30);
}
