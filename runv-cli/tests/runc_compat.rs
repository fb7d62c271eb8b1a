//! runc's behaviour where engines and users depend on it, on real VMs: delete of a live
//! container, the status hooks see, signals reaching the init, exec's pid file, list's JSON and
//! the error words engines match (runc 1.1's libcontainer/error.go).

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{Env, text, wait_until};

fn run_detached(env: &Env, bundle: &Path, id: &str) {
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(bundle)
            .arg(id),
        180,
    );
    assert!(status.success(), "run -d {id}: {err}");
}

fn fails_with(env: &Env, args: &[&str], needle: &str) {
    let (status, _, err) = env.run_files(env.runv().args(args), 60);
    assert!(!status.success(), "{args:?} must fail");
    assert!(err.contains(needle), "{args:?}: want {needle:?} in: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
fn delete_without_force_leaves_a_live_container_alone() {
    let env = Env::new("delete-live");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done",
        ],
    );
    run_detached(&env, &bundle, "d1");
    let counter = bundle.join("rootfs/tmp/counter");
    let read = || fs::read_to_string(&counter).unwrap_or_default();
    wait_until(60, "the counter to start", || !read().is_empty());

    fails_with(
        &env,
        &["delete", "d1"],
        "cannot delete container d1 that is not stopped: running",
    );
    assert_eq!(env.state("d1")["status"], "running");
    let before = read();
    wait_until(30, "the workload to go on after a refused delete", || {
        read() != before
    });

    env.run_ok(env.runv().args(["pause", "d1"]), 30);
    fails_with(
        &env,
        &["delete", "d1"],
        "cannot delete container d1 that is not stopped: paused",
    );
    assert_eq!(env.state("d1")["status"], "paused");
    env.run_ok(env.runv().args(["resume", "d1"]), 30);
    let before = read();
    wait_until(30, "the workload to go on after resume", || {
        read() != before
    });

    // --force stops and removes it.
    env.run_ok(env.runv().args(["delete", "--force", "d1"]), 60);
    fails_with(&env, &["state", "d1"], "container does not exist");

    // A created container is deleted without --force, as runc does.
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("d2"),
        180,
    );
    assert!(status.success(), "create: {err}");
    env.run_ok(env.runv().args(["delete", "d2"]), 60);
    env.assert_clean();
}

#[test]
fn hooks_see_the_status_of_their_point_in_the_lifecycle() {
    let env = Env::new("hook-status");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    let log = env.dir.join("hooks.log");
    env.edit_spec(&bundle, |spec| {
        let hook = |name: &str| {
            serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c",
                format!("read s; echo {name} \"$s\" >> {}", log.display())]})
        };
        spec["hooks"] = serde_json::json!({
            "prestart": [hook("prestart")],
            "createRuntime": [hook("createRuntime")],
            "createContainer": [hook("createContainer")],
            "startContainer": [hook("startContainer")],
            "poststart": [hook("poststart")],
            "poststop": [hook("poststop")],
        });
    });
    run_detached(&env, &bundle, "h1");
    env.run_ok(env.runv().args(["delete", "--force", "h1"]), 60);
    let seen: Vec<(String, serde_json::Value)> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let (name, json) = l.split_once(' ').unwrap();
            (name.to_string(), serde_json::from_str(json).unwrap())
        })
        .collect();
    let want = [
        ("prestart", "created"),
        ("createRuntime", "created"),
        ("createContainer", "created"),
        ("startContainer", "created"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ];
    let got: Vec<(String, String)> = seen
        .iter()
        .map(|(n, s)| (n.clone(), s["status"].as_str().unwrap_or("").to_string()))
        .collect();
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    assert_eq!(got, want);
    for (name, state) in &seen {
        assert_eq!(state["id"], "h1", "{name}: {state}");
        assert!(state["bundle"].as_str().unwrap().ends_with("/b"), "{state}");
    }
    env.assert_clean();
}

#[test]
fn kill_delivers_named_and_numbered_signals_to_a_trapping_init() {
    let env = Env::new("kill-trap");
    // The init is PID 1 of its pid namespace: a signal it has no handler for yet is dropped
    // by the kernel (as under runc), so the test waits for the trap to be set (/ready).
    let cases = [
        ("t1", "TERM", "TERM"),
        ("t2", "USR1", "USR1"),
        ("t3", "USR2", "USR2"),
        ("t4", "TERM", "SIGTERM"),
        ("t5", "TERM", "15"),
    ];
    let mut bundles = Vec::new();
    for (id, trap, _) in cases {
        let script =
            format!("trap 'touch /{trap}; exit 0' {trap}; touch /ready; sleep 1000 & wait $!");
        let bundle = env.bundle(id, &["sh", "-c", &script]);
        run_detached(&env, &bundle, id);
        bundles.push(bundle);
    }
    for ((id, trap, signal), bundle) in cases.iter().zip(&bundles) {
        let rootfs = bundle.join("rootfs");
        wait_until(60, &format!("{id}'s trap"), || {
            rootfs.join("ready").exists()
        });
        env.run_ok(env.runv().args(["kill", id, signal]), 30);
        // Background child or not, the container stops when its init exits.
        wait_until(10, &format!("{id} to stop after kill {signal}"), || {
            env.state(id)["status"] == "stopped"
        });
        assert!(
            rootfs.join(trap).exists(),
            "{id}: the trap for {trap} did not run"
        );
        fails_with(&env, &["kill", id, "KILL"], "container not running");
        fails_with(
            &env,
            &["exec", id, "true"],
            "cannot exec in a stopped container",
        );
        fails_with(&env, &["pause", id], "container not running");
        env.run_ok(env.runv().args(["delete", id]), 60);
    }
    env.assert_clean();
}

#[test]
fn exec_writes_its_pid_file_in_the_foreground_too() {
    let env = Env::new("exec-pid");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    run_detached(&env, &bundle, "e1");
    let pid_file = env.dir.join("exec.pid");
    let child = env
        .runv()
        .args(["exec", "--pid-file"])
        .arg(&pid_file)
        .args(["e1", "sh", "-c", "sleep 2; exit 7"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exec_pid = child.id();
    let out = common::wait_output(child, Duration::from_secs(60), "exec --pid-file");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let written = fs::read_to_string(&pid_file).unwrap_or_default();
    assert_eq!(written.trim(), exec_pid.to_string(), "pid file of exec");

    fails_with(&env, &["resume", "e1"], "container not paused");
    env.run_ok(env.runv().args(["pause", "e1"]), 30);
    fails_with(&env, &["pause", "e1"], "container paused");
    fails_with(
        &env,
        &["exec", "e1", "true"],
        "cannot exec in a paused container",
    );
    env.run_ok(env.runv().args(["delete", "--force", "e1"]), 60);
    env.assert_clean();
}

#[test]
fn list_json_has_runcs_fields_and_errors_use_runcs_words() {
    let env = Env::new("list-json");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    env.edit_spec(&bundle, |spec| {
        spec["annotations"] = serde_json::json!({"org.example.k": "v"});
    });
    run_detached(&env, &bundle, "l1");
    let out = env.run_ok(env.runv().args(["list", "--format", "json"]), 30);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = &list.as_array().unwrap()[0];
    let mut keys: Vec<&str> = entry
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    // runc 1.1's `list --format json` entry (annotations: only when there are some).
    let mut want = [
        "ociVersion",
        "id",
        "pid",
        "status",
        "bundle",
        "rootfs",
        "created",
        "owner",
        "annotations",
    ];
    want.sort();
    assert_eq!(keys, want, "{entry}");
    assert_eq!(entry["id"], "l1");
    assert_eq!(entry["status"], "running");
    assert_eq!(entry["owner"], "root");
    assert_eq!(entry["annotations"]["org.example.k"], "v");
    assert!(entry["pid"].as_i64().unwrap() > 0);
    assert!(entry["rootfs"].as_str().unwrap().ends_with("/b/rootfs"));
    assert!(entry["created"].as_str().unwrap().contains('T'));

    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("l1"),
        60,
    );
    assert!(!status.success());
    assert!(
        err.contains("container with given ID already exists"),
        "{err}"
    );
    env.run_ok(env.runv().args(["delete", "--force", "l1"]), 60);
    for args in [
        &["state", "l1"][..],
        &["kill", "l1", "TERM"],
        &["start", "l1"],
        &["delete", "l1"],
    ] {
        fails_with(&env, args, "container does not exist");
    }
    env.assert_clean();
}

#[test]
fn a_hook_that_does_not_read_its_input_kills_nothing() {
    let env = Env::new("hook-stdin");
    let bundle = env.bundle("b", &["true"]);
    env.edit_spec(&bundle, |spec| {
        // A state larger than a pipe's buffer: runv cannot have written it all before the
        // hook exits.
        spec["annotations"] = serde_json::json!({"org.example.big": "x".repeat(256 << 10)});
        spec["hooks"] = serde_json::json!({
            "prestart": [{"path": "/bin/true"}],
            "poststop": [{"path": "/bin/true"}],
        });
    });
    let out = env.run(
        env.runv().args(["run", "--bundle"]).arg(&bundle).arg("q1"),
        180,
    );
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        text(&out.stderr)
    );
    env.assert_clean();
}
