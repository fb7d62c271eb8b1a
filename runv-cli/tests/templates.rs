//! VM templates on real VMs (QEMU; TCG here): `runv template create|list|rm`, containers
//! restored from a template (exit code, rootfs, hostname, network), what clones must not
//! share (random state, clock), stale templates, and removing a template under a clone.

mod common;

use std::fs;

use common::templates::{Netns, TplEnv, mode, probe, probe_bundle};
use common::{text, wait_until};

#[test]
fn clones_run_containers_and_are_unique() {
    let t = TplEnv::new("tpl-clones");
    let out = t.env.run_ok(
        t.runv()
            // --debug as the probes run (it adds kernel parameters, so it is part of the shape).
            .args([
                "--debug", "template", "create", "--name", "base", "--format", "json",
            ]),
        300,
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = created[0]["key"].as_str().unwrap().to_string();
    let dir = t.store.join(&key);
    assert_eq!(mode(&t.store), 0o700);
    assert_eq!(mode(&dir), 0o700);
    for f in ["memory", "state", "template.json"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    // Nothing half-made is left beside it.
    let names: Vec<String> = fs::read_dir(&t.store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp") || n.starts_with(".trash"))
        .collect();
    assert!(names.is_empty(), "{names:?}");

    let list = t.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "base");
    assert_eq!(list[0]["shape"]["shares"], serde_json::json!(["rootfs"]));
    let table = t.env.run_ok(t.runv().args(["template", "list"]), 30);
    assert!(
        text(&table.stdout).contains(&key),
        "{}",
        text(&table.stdout)
    );

    // Creating it again finds it.
    let again = t.env.run_ok(
        t.runv()
            .args(["--debug", "template", "create", "--format", "json"]),
        300,
    );
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again[0]["key"], key.as_str());

    let a = probe(
        &t,
        &["--template", "base"],
        &probe_bundle(&t, "a"),
        "ca",
        &key,
    );
    // No --template: the default, auto, finds the template.
    let b = probe(&t, &[], &probe_bundle(&t, "b"), "cb", &key);
    assert_eq!(a.hostname, "host-a");
    assert_eq!(b.hostname, "host-b");
    assert_eq!(a.marker, "rootfs-of-a");
    assert_eq!(b.marker, "rootfs-of-b");
    assert_ne!(a.uuid, b.uuid, "two clones gave the same random uuid");
    assert_ne!(
        a.random, b.random,
        "two clones read the same /dev/urandom bytes"
    );
    assert_eq!(a.random.len(), 64, "{}", a.random);
    assert!(a.clock > 0 && b.clock > 0);

    // A template that does not fit (another VM size) is refused by name, not misused.
    let c = probe_bundle(&t, "c");
    t.env.edit_spec(&c, |spec| {
        spec["annotations"] = serde_json::json!({"runv.vm.memory_mib": "160"});
    });
    let (code, _, err, _) = t.run(&["--template", "base"], &c, "cc");
    assert_ne!(code, 7);
    assert!(err.contains("does not fit this container"), "{err}");
    let (code, _, err, _) = t.run(&["--template", "nope"], &c, "cd");
    assert_ne!(code, 7);
    assert!(err.contains("template nope does not exist"), "{err}");

    // Removing the template while a clone runs: the clone goes on (it maps the RAM file
    // privately), later starts boot cold.
    let sleeper = t
        .env
        .bundle("s", &["sh", "-c", "echo up; while :; do sleep 0.1; done"]);
    let (status, _, err) = t.env.run_files(
        t.runv()
            .args(["--debug", "--template", "base", "run", "-d", "--bundle"])
            .arg(&sleeper)
            .arg("cs"),
        300,
    );
    assert!(status.success(), "{err}");
    t.env.run_ok(t.runv().args(["template", "rm", "base"]), 60);
    assert!(t.list().is_empty());
    assert!(!dir.exists());
    let out = t.env.run_ok(
        t.runv().args([
            "exec",
            "cs",
            "sh",
            "-c",
            "echo alive; cat /marker 2>&1; hostname",
        ]),
        120,
    );
    assert!(
        text(&out.stdout).starts_with("alive\n"),
        "{}",
        text(&out.stdout)
    );
    t.env.run_ok(t.runv().args(["kill", "cs", "KILL"]), 30);
    wait_until(60, "the clone to stop", || {
        t.env.state("cs")["status"] == "stopped"
    });
    t.env.run_ok(t.runv().args(["delete", "cs"]), 60);
    let out = t.env.run(t.runv().args(["template", "rm", "base"]), 30);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
    t.env.assert_clean();
}

#[test]
fn a_stale_template_is_rebuilt_not_used() {
    let t = TplEnv::new("tpl-stale");
    let initrd = t.env.dir.join("initrd.img");
    fs::copy(common::guest_dir().join("initrd.img"), &initrd).unwrap();
    let bundle = probe_bundle(&t, "p");
    let flags = ["--template", "auto", "--initrd", initrd.to_str().unwrap()];

    // No template yet: a cold start, and one is built in the background.
    let (code, _, err, log) = t.run(&flags, &bundle, "c1");
    assert_eq!(code, 7, "{err}");
    assert!(!log.contains("restored from template"), "{log}");
    wait_until(300, "the background template build", || t.list().len() == 1);
    let first = t.list()[0]["key"].as_str().unwrap().to_string();
    let p = probe(&t, &flags, &bundle, "c2", &first);
    assert_eq!(p.marker, "rootfs-of-p");

    // The initrd changes in place (trailing zeros: the kernel skips them): the template no
    // longer fits, so the next start is cold and a new one is built; the old is never used.
    let mut bytes = fs::read(&initrd).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    fs::write(&initrd, bytes).unwrap();
    let (code, _, err, log) = t.run(&flags, &bundle, "c3");
    assert_eq!(code, 7, "{err}");
    assert!(!log.contains("restored from template"), "{log}");
    let keys = || -> Vec<String> {
        t.list()
            .iter()
            .map(|m| m["key"].as_str().unwrap().to_string())
            .collect()
    };
    // The stale one can never match again (the file at its initrd path changed): the build
    // of its successor removes it.
    wait_until(300, "the rebuilt template replacing the stale one", || {
        let k = keys();
        k.len() == 1 && k[0] != first
    });
    let second = keys().remove(0);
    assert!(!t.store.join(&first).exists());
    probe(&t, &flags, &bundle, "c4", &second);
    t.env.assert_clean();
}

#[test]
fn concurrent_creates_make_one_template() {
    let t = TplEnv::new("tpl-race");
    let spawn = || {
        t.runv()
            .args(["template", "create", "--format", "json"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let keys: Vec<String> = [a, b]
        .into_iter()
        .map(|child| {
            let out = common::wait_output(child, std::time::Duration::from_secs(300), "create");
            assert!(out.status.success(), "{}", text(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v[0]["key"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(keys[0], keys[1]);
    assert_eq!(t.list().len(), 1);
    let leftovers: Vec<String> = fs::read_dir(&t.store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp") || n.starts_with(".trash"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    t.env.assert_clean();
}

#[test]
fn a_clone_gets_its_own_network() {
    let t = TplEnv::new("tpl-net");
    let ns = Netns::new(77);
    let out = t.env.run_ok(
        t.runv().args([
            "--debug", "template", "create", "--nics", "1", "--format", "json",
        ]),
        300,
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = created[0]["key"].as_str().unwrap().to_string();
    assert_eq!(created[0]["shape"]["nics"], 1);

    let bundle = t.env.bundle(
        "n",
        &[
            "sh",
            "-c",
            "cat /sys/class/net/eth0/address; ping -c 1 -W 5 10.77.0.1 >/dev/null && echo PING-OK",
        ],
    );
    t.env.edit_spec(&bundle, |spec| {
        let namespaces = spec["linux"]["namespaces"].as_array_mut().unwrap();
        namespaces.retain(|n| n["type"] != "network");
        namespaces.push(
            serde_json::json!({"type": "network", "path": format!("/var/run/netns/{}", ns.name)}),
        );
        for set in ["bounding", "effective", "permitted"] {
            spec["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push("CAP_NET_RAW".into());
        }
    });
    let (code, out, err, log) = t.run(&["--template", "auto"], &bundle, "cn");
    assert_eq!(code, 0, "{err}\n{log}");
    assert!(
        log.contains(&format!("restored from template {key}")),
        "{log}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first().copied(), Some(ns.mac().as_str()), "{out}");
    assert_eq!(lines.get(1).copied(), Some("PING-OK"), "{out}\n{err}");
    t.env.assert_clean();
}
