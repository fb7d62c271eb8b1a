//! Bad input: each a clear one-line error and a non-zero exit, with nothing left behind.

mod common;

use std::fs;

use common::{Env, text};

fn assert_one_line_error(status: std::process::ExitStatus, err: &str, needle: &str) {
    assert!(!status.success(), "must fail: {err}");
    assert!(err.contains(needle), "want {needle:?} in: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_ids_bundles_and_specs() {
    let env = Env::new("bad");
    let bundle = env.bundle("b", &["true"]);
    for (id, needle) in [
        ("../x", "invalid container id"),
        ("a/b", "invalid container id"),
        ("..", "invalid container id"),
    ] {
        let (status, _, err) = env.run_files(
            env.runv().args(["create", "--bundle"]).arg(&bundle).arg(id),
            30,
        );
        assert_one_line_error(status, &err, needle);
    }
    let long = "x".repeat(2000);
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg(&long),
        30,
    );
    assert_one_line_error(status, &err, "longer than");

    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle", "/nonexistent/bundle", "c"]),
        30,
    );
    assert_one_line_error(status, &err, "does not exist");

    let broken = env.dir.join("broken");
    fs::create_dir_all(broken.join("rootfs")).unwrap();
    fs::write(broken.join("config.json"), "{ not json").unwrap();
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&broken)
            .arg("c"),
        30,
    );
    assert_one_line_error(status, &err, "is not valid JSON");

    let old = env.bundle("old", &["true"]);
    env.edit_spec(&old, |s| s["ociVersion"] = "2.0.0".into());
    let (status, _, err) = env.run_files(
        env.runv().args(["create", "--bundle"]).arg(&old).arg("c"),
        30,
    );
    assert_one_line_error(status, &err, "unsupported OCI spec version");

    let (status, _, err) = env.run_files(
        env.runv()
            .args(["--kernel", "/nonexistent/vmlinux", "create", "--bundle"])
            .arg(&bundle)
            .arg("c"),
        30,
    );
    assert_one_line_error(
        status,
        &err,
        "guest kernel /nonexistent/vmlinux does not exist",
    );

    let (status, _, err) = env.run_files(
        env.runv()
            .args(["--driver", "nope", "create", "--bundle"])
            .arg(&bundle)
            .arg("c"),
        30,
    );
    assert_one_line_error(status, &err, "'nope' not found");

    let (status, _, err) = env.run_files(env.runv().args(["state", "missing"]), 30);
    assert_one_line_error(status, &err, "does not exist");
    env.assert_clean();
}

#[test]
fn qemu_missing_is_explained() {
    let env = Env::new("noqemu");
    let bundle = env.bundle("b", &["true"]);
    let (status, _, err) = env.run_files(
        env.runv()
            .env("PATH", "/nonexistent")
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("c"),
        30,
    );
    assert_one_line_error(status, &err, "qemu-system-x86_64 not found");
    env.assert_clean();
}

#[test]
fn a_guest_that_never_answers_times_out() {
    let env = Env::new("timeout");
    let bundle = env.bundle("b", &["true"]);
    // The agent cannot answer within a second of the VM starting under emulation.
    let (status, _, err) = env.run_files(
        env.runv()
            .env("RUNV_AGENT_TIMEOUT", "1")
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("c"),
        120,
    );
    assert_one_line_error(status, &err, "did not answer within 1s");
    // The console log it points to outlives the state dir (kept under <root>/.failed).
    let console = err
        .split("guest console log: ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("points at the console log: {err}"));
    assert!(
        console.starts_with(&format!("{}/.failed/c-", env.root.display())),
        "{console}"
    );
    assert!(
        fs::read_to_string(console).is_ok_and(|c| !c.is_empty()),
        "{console} is readable"
    );
    // ... which outlives the removed state dir.
    let failed = env.root.join(".failed");
    assert!(
        err.contains(failed.to_str().unwrap()),
        "the kept copy: {err}"
    );
    env.assert_clean();
    let _ = text(b"");
}

#[test]
fn run_keep_keeps_the_state_of_a_failed_create() {
    let env = Env::new("keep");
    let bundle = env.bundle("b", &["true"]);
    let (status, _, err) = env.run_files(
        env.runv()
            .env("RUNV_AGENT_TIMEOUT", "1")
            .args(["run", "--keep", "--bundle"])
            .arg(&bundle)
            .arg("k"),
        120,
    );
    assert_one_line_error(status, &err, "did not answer within 1s");
    let dir = env.root.join("k");
    assert!(
        err.contains(&format!("state kept in {}", dir.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!("guest console log: {}/", dir.display())),
        "{err}"
    );
    for log in ["console.log", "monitor.log"] {
        assert!(dir.join(log).is_file(), "{log} kept: {err}");
    }
    let state = env.run(env.runv().args(["state", "k"]), 30);
    assert!(
        text(&state.stdout).contains("\"stopped\""),
        "{}",
        text(&state.stdout)
    );
    let delete = env.run(env.runv().args(["delete", "k"]), 30);
    assert!(delete.status.success(), "{}", text(&delete.stderr));
    env.assert_clean();
}
