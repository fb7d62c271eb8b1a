//! Careless hosts and crashes (issue 18, host side), on real VMs: private state whatever the
//! umask, a control socket that refuses other users, damaged or half-made state that every
//! command copes with, concurrent force deletes, logs of failed creates, capped VM logs.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, text, wait_until};

fn run_detached(env: &Env, cmd: &mut Command, bundle: &Path, id: &str) {
    let (status, _, err) =
        env.run_files(cmd.args(["run", "-d", "--bundle"]).arg(bundle).arg(id), 180);
    assert!(status.success(), "run -d {id}: {err}");
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every path under `dir` (itself included).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
}

#[test]
fn state_is_private_under_umask_000_and_the_control_socket_refuses_other_users() {
    let env = Env::new("umask");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    let mut cmd = env.runv();
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        });
    }
    run_detached(&env, &mut cmd, &bundle, "u1");
    let mut paths = Vec::new();
    walk(&env.root, &mut paths);
    let mut seen_sockets = 0;
    for p in &paths {
        let meta = fs::symlink_metadata(p).unwrap();
        let m = mode(p);
        if meta.is_dir() {
            assert_eq!(m, 0o700, "{} is {m:o}", p.display());
        } else if meta.file_type().is_socket() {
            seen_sockets += 1;
            assert_eq!(m & 0o077, 0, "socket {} is {m:o}", p.display());
        } else {
            assert_eq!(m & 0o077, 0, "{} is {m:o}", p.display());
        }
    }
    // control.sock, and the VMM's agent and QMP sockets.
    assert!(seen_sockets >= 3, "{paths:?}");
    for name in [
        "state.json",
        "monitor.json",
        "console.log",
        "hypervisor.log",
    ] {
        assert!(
            paths.iter().any(|p| p.ends_with(name)),
            "{name} missing: {paths:?}"
        );
    }

    // An operator loosens the modes: the socket still refuses a non-root peer.
    let dir = env.root.join("u1");
    let sock = dir.join("control.sock");
    for (p, m) in [(&env.root, 0o755), (&dir, 0o755), (&sock, 0o777)] {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    }
    let ancestors: Vec<PathBuf> = env.dir.ancestors().map(Path::to_path_buf).collect();
    let out = env.run(
        Command::new("perl")
            .uid(65534)
            .gid(65534)
            .arg("-MIO::Socket::UNIX")
            .arg("-e")
            .arg(
                r#"my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "connect: $!\n";
                   print $s qq({"op":"destroy"}\n); print scalar <$s>;"#,
            )
            .arg(&sock),
        30,
    );
    let reply = text(&out.stdout);
    assert!(
        reply.contains("permission denied"),
        "a non-root peer must be refused (ancestors {ancestors:?}): {reply}{}",
        text(&out.stderr)
    );
    assert_eq!(
        env.state("u1")["status"],
        "running",
        "the refused request must change nothing"
    );
    env.run_ok(env.runv().args(["delete", "--force", "u1"]), 60);
    env.assert_clean();
}

#[test]
fn damaged_or_half_made_state_is_listed_reported_and_force_deleted() {
    let env = Env::new("damaged");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    for (id, content) in [("c1", ""), ("c2", "{\"ociVersion\": \"1.0")] {
        run_detached(&env, &mut env.runv(), &bundle, id);
        let monitor = env.state(id)["pid"].as_i64().unwrap();
        fs::write(env.root.join(id).join("state.json"), content).unwrap();

        let (status, _, err) = env.run_files(env.runv().args(["state", id]), 30);
        assert!(!status.success());
        assert!(err.contains("is damaged"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        let (status, _, err) = env.run_files(env.runv().args(["delete", id]), 30);
        assert!(!status.success() && err.contains("delete --force"), "{err}");

        let out = env.run_ok(env.runv().args(["list", "--format", "json"]), 30);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let entry = list
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .unwrap_or_else(|| panic!("{id} hidden from list: {list}"));
        assert_eq!(entry["status"], "unknown", "{entry}");
        assert_eq!(entry["pid"], monitor, "{entry}");

        env.run_ok(env.runv().args(["delete", "--force", id]), 60);
        assert!(!env.root.join(id).exists());
        assert!(
            !Path::new(&format!("/proc/{monitor}")).exists()
                || fs::read_to_string(format!("/proc/{monitor}/stat"))
                    .is_ok_and(|s| s.contains(") Z")),
            "monitor {monitor} of {id} left running"
        );
        wait_until(30, "the VMM to go with its monitor", || {
            common::qemu_pids_for(&env.dir).is_empty()
        });
    }

    // A state dir without state.json (a create killed early) blocks nothing.
    fs::create_dir_all(env.root.join("c3")).unwrap();
    let out = env.run_ok(env.runv().args(["list"]), 30);
    assert!(text(&out.stdout).contains("c3"), "{}", text(&out.stdout));
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("c3"),
        30,
    );
    assert!(!status.success() && err.contains("already exists"), "{err}");
    env.run_ok(env.runv().args(["delete", "--force", "c3"]), 30);
    run_detached(&env, &mut env.runv(), &bundle, "c3");
    assert_eq!(env.state("c3")["status"], "running");
    env.run_ok(env.runv().args(["delete", "--force", "c3"]), 60);
    env.assert_clean();
}

#[test]
fn ten_concurrent_force_deletes_all_succeed() {
    let env = Env::new("concurrent-delete");
    let bundle = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'echo bye >> /tmp/poststop' TERM; sleep 1000",
        ],
    );
    let log = env.dir.join("poststop.log");
    env.edit_spec(&bundle, |spec| {
        spec["hooks"] = serde_json::json!({"poststop": [{"path": "/bin/sh",
            "args": ["sh", "-c", format!("echo x >> {}", log.display())]}]});
    });
    run_detached(&env, &mut env.runv(), &bundle, "x1");
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let mut cmd = env.runv();
            cmd.args(["delete", "--force", "x1"]);
            std::thread::spawn(move || {
                common::output_with_timeout(&mut cmd, std::time::Duration::from_secs(120))
            })
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(
            out.status.success(),
            "{}: {}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    assert_eq!(
        fs::read_to_string(&log).unwrap_or_default(),
        "x\n",
        "poststop hooks must run once"
    );
    env.assert_clean();
}

#[test]
fn a_failed_create_keeps_its_logs_where_the_error_says() {
    let env = Env::new("failed-create");
    let bundle = env.bundle("b", &["true"]);
    env.edit_spec(&bundle, |spec| {
        spec["hooks"] = serde_json::json!({"createContainer": [{"path": "/bin/sh",
            "args": ["sh", "-c", "echo hook says no >&2; exit 3"]}]});
    });
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("f1"),
        180,
    );
    assert!(!status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("hook says no"), "{err}");
    let failed = env.root.join(".failed");
    let start = err
        .find(failed.to_str().unwrap())
        .unwrap_or_else(|| panic!("the error must name the kept logs: {err}"));
    let kept: String = err[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != ')')
        .collect();
    let kept = Path::new(&kept);
    assert_eq!(mode(kept), 0o700);
    let console = fs::read_to_string(kept.join("console.log")).unwrap();
    assert!(
        console.contains("Linux version"),
        "the guest console: {console}"
    );
    assert!(!env.root.join("f1").exists());
    let out = env.run_ok(env.runv().args(["list", "-q"]), 30);
    assert_eq!(text(&out.stdout), "", ".failed is no container");
    fs::remove_dir_all(&failed).unwrap();

    // A bad agent timeout is an error, not silently the default.
    let (status, _, err) = env.run_files(
        env.runv()
            .env("RUNV_AGENT_TIMEOUT", "abc")
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("f2"),
        30,
    );
    assert!(!status.success());
    assert!(err.contains("invalid RUNV_AGENT_TIMEOUT \"abc\""), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    env.assert_clean();
}

#[test]
fn console_and_hypervisor_logs_are_capped() {
    let env = Env::new("log-cap");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    run_detached(&env, &mut env.runv(), &bundle, "g1");
    let dir = env.root.join("g1");
    // Stand-ins for a guest flooding its console and a chatty VMM: the VMM appends, as this.
    for name in ["console.log", "hypervisor.log"] {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(dir.join(name))
            .unwrap();
        std::io::Write::write_all(&mut f, &vec![b'x'; 3 << 20]).unwrap();
    }
    const CAP: u64 = 1 << 20;
    for name in ["console.log", "hypervisor.log"] {
        let log = dir.join(name);
        let old = dir.join(format!("{name}.1"));
        wait_until(30, &format!("{name} to be rotated"), || {
            fs::metadata(&log).is_ok_and(|m| m.len() <= CAP)
                && fs::metadata(&old).is_ok_and(|m| m.len() <= CAP && m.len() > 0)
        });
    }
    assert_eq!(env.state("g1")["status"], "running");
    env.run_ok(env.runv().args(["delete", "--force", "g1"]), 60);
    env.assert_clean();
}

#[test]
fn a_killed_container_stops_even_when_nobody_reads_its_output() {
    let env = Env::new("stalled-reader");
    let bundle = env.bundle("b", &["yes"]);
    // create's stdout (the container's) is a pipe the test never reads: the relay stalls
    // and flow control backs up into the guest.
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    let (status, _, err) = {
        let mut cmd = env.runv();
        cmd.args(["create", "--bundle"]).arg(&bundle).arg("s1");
        let err_path = env.dir.join("create.err");
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(write_end))
            .stderr(fs::File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        let out = common::wait_output(child, std::time::Duration::from_secs(180), "create");
        (
            out.status,
            (),
            fs::read_to_string(&err_path).unwrap_or_default(),
        )
    };
    assert!(status.success(), "create: {err}");
    env.run_ok(env.runv().args(["start", "s1"]), 60);
    // Let the output back up.
    std::thread::sleep(std::time::Duration::from_secs(2));
    env.run_ok(env.runv().args(["kill", "s1", "KILL"]), 30);
    // The exit is reported after a bounded wait for the output (it was up to an hour).
    wait_until(30, "s1 to read as stopped", || {
        env.state("s1")["status"] == "stopped"
    });
    drop(read_end);
    env.run_ok(env.runv().args(["delete", "s1"]), 60);
    env.assert_clean();
}

#[test]
fn monitor_log_tells_when_the_vm_was_killed() {
    let env = Env::new("vm-killed");
    let bundle = env.bundle("b", &["sleep", "1000"]);
    run_detached(&env, &mut env.runv(), &bundle, "k1");
    let pids = common::qemu_pids_for(&env.dir);
    assert!(!pids.is_empty());
    for pid in pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    wait_until(30, "k1 to read as stopped", || {
        env.state("k1")["status"] == "stopped"
    });
    let log = fs::read_to_string(env.root.join("k1/monitor.log")).unwrap_or_default();
    assert!(
        log.contains("the VM ended before the container"),
        "monitor.log: {log}"
    );
    env.run_ok(env.runv().args(["delete", "k1"]), 60);
    env.assert_clean();
}
