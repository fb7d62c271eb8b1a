//! The runc lifecycle on real VMs (QEMU; TCG on machines without usable KVM).

mod common;

use std::fs;
use std::time::Duration;

use common::{Env, text, wait_until};

#[test]
fn run_prints_from_inside_the_vm_and_propagates_exit_codes() {
    let env = Env::new("run");
    let bundle = env.bundle("b", &["uname", "-r"]);
    let out = env.run(
        env.runv().args(["run", "--bundle"]).arg(&bundle).arg("c1"),
        180,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let guest_release = common::guest_release();
    let host_release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(text(&out.stdout).trim(), guest_release);
    assert_ne!(guest_release.trim(), host_release.trim());

    let bundle = env.bundle("b42", &["sh", "-c", "echo out; echo err >&2; exit 42"]);
    let out = env.run(
        env.runv().args(["run", "--bundle"]).arg(&bundle).arg("c42"),
        180,
    );
    assert_eq!(out.status.code(), Some(42), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"));
    env.assert_clean();
}

#[test]
fn create_start_state_kill_delete() {
    let env = Env::new("lifecycle");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 143' TERM; echo started; while :; do sleep 0.1; done",
        ],
    );
    let hook_log = env.dir.join("hooks.log");
    env.edit_spec(&bundle, |spec| {
        let hook = |name: &str| {
            serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("read s; echo {name} \"$s\" >> {}", hook_log.display())]})
        };
        spec["hooks"] = serde_json::json!({
            "prestart": [hook("prestart")],
            "createRuntime": [hook("createRuntime")],
            "poststart": [hook("poststart")],
            "poststop": [hook("poststop")],
        });
    });
    let pid_file = env.dir.join("pid");
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("c1"),
        180,
    );
    assert!(status.success(), "create: {err}");
    let state = env.state("c1");
    assert_eq!(state["status"], "created");
    let pid: i64 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(state["pid"], pid);
    assert_eq!(state["id"], "c1");
    assert!(state["bundle"].as_str().unwrap().ends_with("/b"));

    // Duplicate id.
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("c1"),
        60,
    );
    assert!(!status.success());
    assert!(err.contains("already exists"), "{err}");

    let hooks = fs::read_to_string(&hook_log).unwrap();
    assert!(hooks.starts_with("prestart {"), "{hooks}");
    assert!(
        hooks.contains("createRuntime {") && hooks.contains("\"id\":\"c1\""),
        "{hooks}"
    );
    env.run_ok(env.runv().args(["start", "c1"]), 60);
    assert_eq!(env.state("c1")["status"], "running");
    assert!(
        fs::read_to_string(&hook_log)
            .unwrap()
            .contains("poststart {")
    );

    let out = env.run_ok(env.runv().args(["events", "--stats", "c1"]), 30);
    let event: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(event["type"], "stats");
    assert!(event["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0);
    let (status, _, err) =
        env.run_files(env.runv().args(["update", "--memory", "1000000", "c1"]), 30);
    assert!(
        !status.success() && err.contains("cannot change memory"),
        "{err}"
    );
    let (status, _, err) = env.run_files(env.runv().args(["start", "c1"]), 60);
    assert!(
        !status.success() && err.contains("already running"),
        "{err}"
    );
    let (status, _, err) = env.run_files(env.runv().args(["delete", "c1"]), 60);
    assert!(!status.success() && err.contains("not stopped"), "{err}");

    let out = env.run_ok(env.runv().args(["list"]), 30);
    assert!(text(&out.stdout).starts_with("ID"));
    assert!(text(&out.stdout).contains("running"));
    let out = env.run_ok(env.runv().args(["list", "--format", "json"]), 30);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], "c1");
    let out = env.run_ok(env.runv().args(["list", "-q"]), 30);
    assert_eq!(text(&out.stdout), "c1\n");

    // No signal: SIGTERM, as with runc.
    env.run_ok(env.runv().args(["kill", "c1"]), 30);
    wait_until(60, "the container to stop", || {
        env.state("c1")["status"] == "stopped"
    });
    assert_eq!(env.state("c1")["pid"], 0);
    env.run_ok(env.runv().args(["delete", "c1"]), 60);
    assert!(
        fs::read_to_string(&hook_log)
            .unwrap()
            .contains("poststop {")
    );
    env.assert_clean();
}

#[test]
fn a_killed_monitor_or_vmm_reads_as_stopped_and_delete_cleans_up() {
    let env = Env::new("killed");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    let kill9 = |pid: i64| {
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    };
    // The monitor dies: its VMM goes with it, the state says stopped, delete cleans up
    // (including the overlay mount).
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["--storage", "overlay", "run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("m1"),
        180,
    );
    assert!(status.success(), "{err}");
    kill9(env.state("m1")["pid"].as_i64().unwrap());
    wait_until(30, "m1 to read as stopped", || {
        env.state("m1")["status"] == "stopped"
    });
    wait_until(30, "the VMM to die with its monitor", || {
        common::qemu_pids_for(&env.dir).is_empty()
    });
    env.run_ok(env.runv().args(["delete", "m1"]), 60);

    // The VMM dies: the monitor notices, records the end and exits.
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("m2"),
        180,
    );
    assert!(status.success(), "{err}");
    let monitor = env.state("m2")["pid"].as_i64().unwrap();
    for pid in common::qemu_pids_for(&env.dir) {
        kill9(i64::from(pid));
    }
    wait_until(30, "m2 to read as stopped", || {
        env.state("m2")["status"] == "stopped"
    });
    wait_until(30, "the monitor to exit", || {
        !std::path::Path::new(&format!("/proc/{monitor}/cmdline")).exists()
            || fs::read_to_string(format!("/proc/{monitor}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
    });
    env.run_ok(env.runv().args(["delete", "m2"]), 60);
    env.assert_clean();
}

#[test]
fn kill_by_number_and_all_and_the_monitor_status_is_the_containers() {
    let env = Env::new("kill");
    let bundle = env.bundle("b", &["sh", "-c", "sleep 1000 & sleep 1000; true"]);
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("k1"),
        180,
    );
    assert!(status.success(), "{err}");
    wait_until(30, "sh and its two sleeps", || {
        let out = env.run_ok(env.runv().args(["ps", "--format", "json", "k1"]), 30);
        let pids: Vec<i64> = serde_json::from_slice(&out.stdout).unwrap();
        pids.len() >= 3
    });
    env.run_ok(env.runv().args(["kill", "--all", "k1", "9"]), 30);
    wait_until(60, "the container to stop", || {
        env.state("k1")["status"] == "stopped"
    });
    let (status, _, err) = env.run_files(env.runv().args(["kill", "k1", "KILL"]), 30);
    assert!(!status.success() && err.contains("not running"), "{err}");
    env.run_ok(env.runv().args(["delete", "k1"]), 60);

    // The monitor (the pid-file process) exits with 128+9 when the init is killed.
    let bundle = env.bundle("b2", &["sleep", "1000"]);
    let mut child = env
        .runv()
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg("k2")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(120, "k2 to run", || {
        env.runv()
            .args(["state", "k2"])
            .output()
            .map(|o| text(&o.stdout).contains("\"running\""))
            .unwrap_or(false)
    });
    env.run_ok(env.runv().args(["kill", "k2", "SIGKILL"]), 30);
    let out = common::wait_output(child_take(&mut child), Duration::from_secs(60), "run k2");
    assert_eq!(out.status.code(), Some(137));
    env.assert_clean();
}

fn child_take(child: &mut std::process::Child) -> std::process::Child {
    std::mem::replace(child, std::process::Command::new("true").spawn().unwrap())
}

#[test]
fn exec_env_cwd_user_exit_codes_and_missing_binaries() {
    let env = Env::new("exec");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("e1"),
        180,
    );
    assert!(status.success(), "{err}");

    let out = env.run(
        env.runv().args([
            "exec",
            "--env",
            "FOO=bar",
            "--cwd",
            "/tmp",
            "--user",
            "65534:65534",
            "e1",
            "sh",
            "-c",
            "echo $FOO $(pwd) $(id -u):$(id -g); exit 3",
        ]),
        60,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "bar /tmp 65534:65534\n");

    // Nothing ignored or blocked, as a process under runc: the agent and its helpers are
    // Rust programs, which ignore SIGPIPE, and an ignored signal stays ignored across exec.
    for pid in ["self", "1"] {
        let out = env.run_ok(
            env.runv()
                .args(["exec", "e1", "grep", "-E", "^Sig(Ign|Blk)"])
                .arg(format!("/proc/{pid}/status")),
            60,
        );
        assert_eq!(
            text(&out.stdout),
            "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n",
            "/proc/{pid}"
        );
    }

    let out = env.run(env.runv().args(["exec", "e1", "/bin/nope"]), 60);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("exec: \"/bin/nope\""),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("no such file or directory"),
        "{}",
        text(&out.stderr)
    );

    let out = env.run(env.runv().args(["exec", "e1", "/etc/passwd"]), 60);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));

    // --process FILE and --detach --pid-file: the pid file's process exits with the status.
    let process = env.dir.join("process.json");
    fs::write(&process, r#"{"args":["sh","-c","sleep 1; exit 5"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#).unwrap();
    let pid_file = env.dir.join("exec.pid");
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["exec", "--detach", "--pid-file"])
            .arg(&pid_file)
            .arg("--process")
            .arg(&process)
            .arg("e1"),
        60,
    );
    assert!(status.success(), "{err}");
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until(60, "the detached exec to end", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
    });

    // ps lists the guest's processes.
    let out = env.run_ok(env.runv().args(["ps", "e1"]), 30);
    assert!(
        text(&out.stdout).contains("sleep 1000"),
        "{}",
        text(&out.stdout)
    );

    env.run_ok(env.runv().args(["delete", "--force", "e1"]), 60);
    env.assert_clean();
}

/// Helpers are forked by one forker process in the guest (issue 16). A container in the
/// guest's pid namespace sees it; once it is killed an exec still works (the agent execs a
/// helper itself) and the next one gets a new forker.
#[test]
fn exec_works_after_the_guests_helper_forker_died() {
    let env = Env::new("forker");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    env.edit_spec(&bundle, |spec| {
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "pid");
    });
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("f1"),
        180,
    );
    assert!(status.success(), "{err}");
    // The forker, and helpers it forked that have not exited yet, run `__forker`.
    let forkers = || -> Vec<String> {
        let out = env.run_ok(
            env.runv().args([
                "exec",
                "f1",
                "sh",
                "-c",
                // (The pattern does not match this shell's own command line.)
                "for p in /proc/[0-9]*; do grep -qs '__f[o]rker' $p/cmdline && echo ${p#/proc/}; done; true",
            ]),
            60,
        );
        text(&out.stdout).lines().map(str::to_string).collect()
    };
    let before = forkers();
    assert!(!before.is_empty(), "no forker in the guest");
    // A helper among them may have exited by now.
    let kill = format!("kill -9 {} 2>/dev/null; true", before.join(" "));
    env.run_ok(env.runv().args(["exec", "f1", "sh", "-c", &kill]), 60);

    let out = env.run_ok(env.runv().args(["exec", "f1", "echo", "ok"]), 60);
    assert_eq!(text(&out.stdout), "ok\n");
    let after = forkers();
    assert!(!after.is_empty(), "no new forker");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );

    env.run_ok(env.runv().args(["delete", "--force", "f1"]), 60);
    env.assert_clean();
}

#[test]
fn pause_freezes_the_workload_and_resume_continues_it() {
    let env = Env::new("pause");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done",
        ],
    );
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("p1"),
        180,
    );
    assert!(status.success(), "{err}");
    // The bundle rootfs is shared into the VM, so the host sees the counter.
    let counter = bundle.join("rootfs/tmp/counter");
    let read = || fs::read_to_string(&counter).unwrap_or_default();
    wait_until(60, "the counter to start", || !read().is_empty());
    env.run_ok(env.runv().args(["pause", "p1"]), 30);
    assert_eq!(env.state("p1")["status"], "paused");
    let frozen = read();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(read(), frozen, "the workload must not run while paused");
    let (status, _, err) = env.run_files(env.runv().args(["exec", "p1", "true"]), 30);
    assert!(!status.success() && err.contains("paused"), "{err}");
    env.run_ok(env.runv().args(["resume", "p1"]), 30);
    assert_eq!(env.state("p1")["status"], "running");
    wait_until(30, "the counter to move again", || read() != frozen);
    env.run_ok(env.runv().args(["delete", "--force", "p1"]), 60);
    env.assert_clean();
}

#[test]
fn overlay_storage_leaves_the_bundle_untouched() {
    let env = Env::new("overlay");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "echo changed > /etc/new-file; rm /bin/true; cat /etc/new-file",
        ],
    );
    let out = env.run(
        env.runv()
            .args(["--storage", "overlay", "run", "--bundle"])
            .arg(&bundle)
            .arg("o1"),
        180,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "changed\n");
    assert!(!bundle.join("rootfs/etc/new-file").exists());
    assert!(bundle.join("rootfs/bin/true").symlink_metadata().is_ok());
    env.assert_clean();
}

/// qemu runs jailed as a user of its own with only the 9p file capabilities: what a container
/// does to its rootfs still lands on the host as it would under runc (owner, group, set-uid
/// bit, a root-only file read).
#[test]
fn files_the_container_makes_keep_its_owners_and_modes_on_the_host() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let env = Env::new("owners");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "mkdir /made && touch /made/f && chown 123:456 /made/f && chmod 4750 /made/f \
             && cat /etc/root-only",
        ],
    );
    fs::write(bundle.join("rootfs/etc/root-only"), "secret\n").unwrap();
    fs::set_permissions(
        bundle.join("rootfs/etc/root-only"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    env.edit_spec(&bundle, |s| {
        for set in [
            "bounding",
            "effective",
            "permitted",
            "inheritable",
            "ambient",
        ] {
            s["process"]["capabilities"][set] =
                serde_json::json!(["CAP_CHOWN", "CAP_FOWNER", "CAP_FSETID", "CAP_DAC_OVERRIDE"]);
        }
    });
    let out = env.run(
        env.runv().args(["run", "--bundle"]).arg(&bundle).arg("own"),
        180,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "secret\n");
    let dir = fs::metadata(bundle.join("rootfs/made")).unwrap();
    assert_eq!((dir.uid(), dir.gid()), (0, 0));
    let file = fs::metadata(bundle.join("rootfs/made/f")).unwrap();
    assert_eq!((file.uid(), file.gid()), (123, 456));
    assert_eq!(file.mode() & 0o7777, 0o4750);
    env.assert_clean();
}
