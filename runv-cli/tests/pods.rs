//! Pods without an engine: runv given the annotations containerd's CRI plugin sets (a
//! sandbox, then containers naming it, their network/IPC/UTS namespaces pointing at the
//! sandbox's monitor as containerd points them at its task). Runs here under TCG and, from
//! `scripts/test.sh`, inside the test host, where qemu runs the pod's VM with KVM.

mod common;

use std::fs;
use std::path::PathBuf;

use common::templates::{TplEnv, pids_with};
use common::{Env, qemu_pids_for, text, wait_until};
use serde_json::json;

const SANDBOX_ID: &str = "pod-sandbox";

fn sandbox_bundle(env: &Env) -> PathBuf {
    let b = env.bundle("sandbox", &["sleep", "3600"]);
    env.edit_spec(&b, |s| {
        s["hostname"] = "pod-host".into();
        // The pod's limits as containerd passes them: 2 CPUs, 256 MiB.
        s["annotations"] = json!({
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-cpu-quota": "200000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-memory": "268435456",
        });
    });
    b
}

/// A member of the pod whose sandbox's monitor has `sandbox_pid`.
fn member_bundle(env: &Env, name: &str, sandbox_pid: i64, args: &[&str]) -> PathBuf {
    let b = env.bundle(name, args);
    env.edit_spec(&b, |s| {
        s.as_object_mut().unwrap().remove("hostname");
        s["annotations"] = json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": SANDBOX_ID,
        });
        for ns in s["linux"]["namespaces"].as_array_mut().unwrap() {
            let kind = ns["type"].as_str().unwrap().to_string();
            let file = match kind.as_str() {
                "network" => "net",
                "ipc" | "uts" => &kind,
                _ => continue,
            };
            ns["path"] = format!("/proc/{sandbox_pid}/ns/{file}").into();
        }
    });
    b
}

/// `run --detach`, with files for stdio: the detached container keeps them open.
fn run_detached(env: &Env, bundle: &std::path::Path, id: &str) {
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id),
        180,
    );
    assert!(status.success(), "run -d {id}: {err}");
}

fn exec(env: &Env, id: &str, args: &[&str]) -> String {
    let out = env.run_ok(env.runv().arg("exec").arg(id).args(args), 60);
    text(&out.stdout).trim().to_string()
}

fn kvm_usable() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    runv_api::cpuinfo_has_virt_flag(&cpuinfo) && std::path::Path::new("/dev/kvm").exists()
}

/// Starts the pod's sandbox; returns its monitor's pid.
fn start_sandbox(env: &Env) -> i64 {
    let sandbox = sandbox_bundle(env);
    run_detached(env, &sandbox, SANDBOX_ID);
    env.state(SANDBOX_ID)["pid"].as_i64().unwrap()
}

/// Ends the pod: the sandbox and the given (stopped or running) members.
fn end_pod(env: &Env, members: &[&str]) {
    env.run_ok(env.runv().args(["kill", SANDBOX_ID, "KILL"]), 30);
    for id in members.iter().chain([&SANDBOX_ID]) {
        wait_until(60, "the pod's containers to stop", || {
            env.state(id)["status"] == "stopped"
        });
    }
    for id in members.iter().chain([&SANDBOX_ID]) {
        env.run_ok(env.runv().args(["delete", id]), 60);
    }
    env.assert_clean();
}

/// The pod flow (also in the test host, with KVM): one VM, the pod's size and namespaces,
/// each member's PID namespace, exit code and limits.
#[test]
fn pod_flow_one_vm_for_the_pod() {
    let env = Env::new("pod");
    let host_boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let pid = start_sandbox(&env);
    let qemu = qemu_pids_for(&env.dir);
    assert_eq!(qemu.len(), 1, "one VM for the sandbox");
    if kvm_usable() {
        let cmdline = fs::read(format!("/proc/{}/cmdline", qemu[0])).unwrap();
        assert!(
            text(&cmdline).contains("kvm"),
            "the pod VM runs with KVM here"
        );
    }

    // A member runs in the pod's VM with the pod's hostname, its own PID namespace, and
    // exits with its own status.
    let once = member_bundle(
        &env,
        "once",
        pid,
        &[
            "sh",
            "-c",
            "hostname; cat /proc/sys/kernel/random/boot_id; cat /proc/1/cmdline; echo; exit 3",
        ],
    );
    let out = env.run(
        env.runv().args(["run", "--bundle"]).arg(&once).arg("once"),
        120,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines[0], "pod-host");
    assert_ne!(lines[1], host_boot.trim(), "the member runs in a VM");
    assert!(lines[2].starts_with("sh"), "own PID namespace: {lines:?}");
    assert_eq!(
        exec(
            &env,
            SANDBOX_ID,
            &["cat", "/proc/sys/kernel/random/boot_id"]
        ),
        lines[1]
    );
    assert_eq!(qemu_pids_for(&env.dir).len(), 1, "no VM of its own");

    // The VM is the pod's size (its vCPUs at most the host's: the test host has one).
    let host_cpus = std::thread::available_parallelism().unwrap().get().min(2);
    assert_eq!(exec(&env, SANDBOX_ID, &["nproc"]), host_cpus.to_string());
    let mem_kib: u64 = exec(
        &env,
        SANDBOX_ID,
        &["sh", "-c", "grep MemTotal /proc/meminfo"],
    )
    .split_whitespace()
    .nth(1)
    .unwrap()
    .parse()
    .unwrap();
    assert!(mem_kib > 256 * 1024 * 9 / 10, "MemTotal {mem_kib} kB");

    // A long-running member: the sandbox's IPC and UTS namespaces, its own PID namespace,
    // its own limits as a cgroup of its own in the guest.
    let sleeper = member_bundle(&env, "sleeper", pid, &["sleep", "3600"]);
    env.edit_spec(&sleeper, |s| {
        s["linux"]["resources"] = json!({"memory": {"limit": 67108864}, "pids": {"limit": 50}});
    });
    run_detached(&env, &sleeper, "sleeper");
    let ns = |id: &str, kind: &str| exec(&env, id, &["readlink", &format!("/proc/self/ns/{kind}")]);
    assert_eq!(ns("sleeper", "ipc"), ns(SANDBOX_ID, "ipc"));
    assert_eq!(ns("sleeper", "uts"), ns(SANDBOX_ID, "uts"));
    assert_ne!(ns("sleeper", "pid"), ns(SANDBOX_ID, "pid"));
    let limit = |file: &str| {
        exec(
            &env,
            "sleeper",
            &[
                "sh",
                "-c",
                &format!("cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/{file}"),
            ],
        )
    };
    assert_eq!(limit("memory.max"), "67108864");
    assert_eq!(limit("pids.max"), "50");
    end_pod(&env, &["sleeper"]);
}

/// A member's lifecycle inside the pod: ps, pause and resume, delete --force, a dead
/// monitor, a missing sandbox, the sandbox's end.
#[test]
fn pod_members_come_and_go_while_the_pod_runs() {
    let env = Env::new("podlife");
    let pid = start_sandbox(&env);
    let sleeper = member_bundle(&env, "sleeper", pid, &["sleep", "3600"]);
    run_detached(&env, &sleeper, "sleeper");
    let ps = env.run_ok(env.runv().args(["ps", "sleeper"]), 30);
    assert!(
        text(&ps.stdout).contains("sleep 3600"),
        "{}",
        text(&ps.stdout)
    );
    env.run_ok(env.runv().args(["pause", "sleeper"]), 30);
    assert_eq!(env.state("sleeper")["status"], "paused");
    assert_eq!(exec(&env, SANDBOX_ID, &["echo", "vm-runs"]), "vm-runs");
    env.run_ok(env.runv().args(["resume", "sleeper"]), 30);
    assert_eq!(exec(&env, "sleeper", &["echo", "thawed"]), "thawed");

    // delete --force of a member leaves the pod running.
    env.run_ok(env.runv().args(["delete", "--force", "sleeper"]), 60);
    assert_eq!(exec(&env, SANDBOX_ID, &["echo", "pod-runs"]), "pod-runs");

    // A member whose monitor is SIGKILLed reads stopped; deleting it ends it in the VM too
    // (its rootfs leaves the pod's share).
    let orphaned = member_bundle(&env, "orphaned", pid, &["sleep", "3600"]);
    run_detached(&env, &orphaned, "orphaned");
    let share = env.root.join(SANDBOX_ID).join("mounts/c-orphaned");
    assert!(share.join("rootfs/bin/busybox").exists());
    let monitor = env.state("orphaned")["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(30, "the member to read stopped", || {
        env.state("orphaned")["status"] == "stopped"
    });
    env.run_ok(env.runv().args(["delete", "orphaned"]), 60);
    wait_until(30, "the member to leave the pod's share", || {
        !share.exists()
    });

    // A member naming a sandbox that does not exist: one clear line, nothing left.
    let orphan = env.bundle("orphan", &["true"]);
    env.edit_spec(&orphan, |s| {
        s["annotations"] = json!({
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "no-such-pod",
        });
    });
    let out = env.run(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&orphan)
            .arg("orphan"),
        60,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("pod sandbox no-such-pod") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(!env.root.join("orphan").exists());

    // A member the guest cannot create (a mount of no known type): create fails in one
    // line, and nothing in the pod keeps its stdio open, so a caller reading it sees EOF.
    let broken = member_bundle(&env, "broken", pid, &["true"]);
    env.edit_spec(&broken, |s| {
        s["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/broken", "type": "runv-no-such-fs", "source": "none",
        }));
    });
    let mut create = env
        .runv()
        .args(["create", "--bundle"])
        .arg(&broken)
        .arg("broken")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = create.stdout.take().unwrap();
    let (eof_tx, eof_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::Read::read_to_end(&mut stdout, &mut Vec::new());
        let _ = eof_tx.send(());
    });
    let out = common::wait_output(create, std::time::Duration::from_secs(120), "create broken");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("runv-no-such-fs") && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(
        eof_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .is_ok(),
        "the failed member's stdout stays open"
    );
    assert!(!env.root.join("broken").exists());
    assert!(!env.root.join(SANDBOX_ID).join("mounts/c-broken").exists());
    assert_eq!(exec(&env, SANDBOX_ID, &["echo", "pod-runs"]), "pod-runs");

    // The sandbox's end is the pod's: a running member stops (137) with its VM.
    let last = member_bundle(&env, "last", pid, &["sleep", "3600"]);
    run_detached(&env, &last, "last");
    end_pod(&env, &["last"]);
}

/// The sandbox's monitor SIGKILLed: its VM goes with it, the members read stopped, and
/// deleting them and the sandbox leaves no mount (the share is a mount of its own, made to
/// propagate into qemu's jail), no process and no state.
#[test]
fn a_killed_sandbox_monitor_leaves_nothing_after_delete() {
    let env = Env::new("podkill");
    let pid = start_sandbox(&env);
    let member = member_bundle(&env, "member", pid, &["sleep", "3600"]);
    run_detached(&env, &member, "member");
    let share = env.root.join(SANDBOX_ID).join("mounts");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo.contains(&format!(" {} ", share.display())),
        "the pod's share is not a mount of its own"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(60, "the pod's VM to end", || {
        qemu_pids_for(&env.dir).is_empty()
    });
    wait_until(60, "the member to read stopped", || {
        env.state("member")["status"] == "stopped"
    });
    env.run_ok(env.runv().args(["delete", "member"]), 60);
    env.run_ok(env.runv().args(["delete", SANDBOX_ID]), 60);
    env.assert_clean();
}

/// Under the default `--template auto` a pod's VM is templated like any container's: the
/// first pod boots cold and a template of the pod VM's shape (its size, the pod share) is
/// made in the background; the next pod's VM is a clone of it, and its members run in it.
#[test]
fn a_pod_vm_comes_from_a_template_under_auto() {
    let t = TplEnv::new("podtpl");
    let env = &t.env;
    let sandbox = sandbox_bundle(env);
    for (round, restored) in [(1, false), (2, true)] {
        let log = env.dir.join(format!("sandbox-{round}.log"));
        let (status, _, err) = env.run_files(
            t.runv()
                .arg("--debug")
                .arg("--log")
                .arg(&log)
                .args(["run", "--detach", "--bundle"])
                .arg(&sandbox)
                .arg(SANDBOX_ID),
            180,
        );
        assert!(status.success(), "run -d the sandbox: {err}");
        let logged = fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(
            logged.contains("restored from template"),
            restored,
            "pod {round}: {logged}"
        );
        let pid = env.state(SANDBOX_ID)["pid"].as_i64().unwrap();
        let id = format!("member-{round}");
        let member = member_bundle(env, &id, pid, &["sh", "-c", "hostname; exit 3"]);
        let out = env.run(
            t.runv().args(["run", "--bundle"]).arg(&member).arg(&id),
            120,
        );
        assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "pod-host");
        assert_eq!(exec(env, SANDBOX_ID, &["hostname"]), "pod-host");
        if round == 1 {
            wait_until(300, "the pod VM's template", || t.list().len() == 1);
            wait_until(60, "the template build to end", || {
                pids_with(&["__template-build", &t.store.to_string_lossy()]).is_empty()
            });
        }
        // The member was deleted by `run`.
        end_pod(env, &[]);
    }
    assert_eq!(t.list().len(), 1, "the second pod made no other template");
}
