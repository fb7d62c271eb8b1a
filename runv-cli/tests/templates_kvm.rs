//! VM templates on a real KVM, for `--driver kvm-native` and for `--driver qemu --accel kvm`:
//! the clone test of `templates.rs` (template create; clones with the right exit code, their own
//! hostname and rootfs; two clones read different random bytes and uuids; a clone's clock
//! within 1 s of the host's), and for kvm-native a clone in a network namespace with its own
//! MAC. It runs in the test host (`scripts/test.sh` runs this binary through `cargo xtask
//! vmtest`, where kvm-amd gives a nested KVM); where KVM cannot run a guest each test prints
//! `skipped: <reason>`.

mod common;

use common::Env;
use common::templates::{Netns, TplEnv, mode, probe, probe_bundle};

/// kvm-native as `runv drivers --format json` describes it.
fn kvm_native_info() -> serde_json::Value {
    let env = Env::new("tplkvm-probe");
    let out = env.run_ok(env.runv().args(["drivers", "--format", "json"]), 30);
    let drivers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    drivers["drivers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "kvm-native")
        .cloned()
        .unwrap_or_default()
}

/// Why KVM cannot run this test's guests here, from `runv drivers` (kvm-native's probe: a
/// usable /dev/kvm on a CPU with vmx/svm, which is what qemu's KVM needs too).
fn kvm_unusable() -> Option<String> {
    let kn = kvm_native_info();
    if kn["available"] == true {
        return None;
    }
    Some(format!(
        "KVM cannot run guests here ({}); this test runs in the test host (cargo xtask vmtest)",
        kn["reason"].as_str().unwrap_or("kvm-native is not built")
    ))
}

/// The clone test with `flags` (the driver and its options) and `envs`.
fn clones_run_containers_and_are_unique(
    tag: &str,
    flags: &[&str],
    envs: &[(&str, &str)],
    driver: &str,
) {
    if let Some(why) = kvm_unusable() {
        println!("skipped: {why}");
        return;
    }
    let mut t = TplEnv::with_flags(tag, flags);
    for (name, value) in envs {
        t = t.with_env(name, value);
    }
    let out = t.env.run_ok(
        t.runv().args([
            "--debug", "template", "create", "--name", "base", "--format", "json",
        ]),
        300,
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = created[0]["key"].as_str().unwrap().to_string();
    assert_eq!(created[0]["shape"]["driver"], driver);
    let dir = t.store.join(&key);
    for f in ["memory", "state", "template.json"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(t.list().len(), 1);

    let a = probe(
        &t,
        &["--template", "base"],
        &probe_bundle(&t, "a"),
        "ca",
        &key,
    );
    // No --template: the default, auto, finds the template.
    let b = probe(&t, &[], &probe_bundle(&t, "b"), "cb", &key);
    assert_eq!(
        (a.hostname.as_str(), b.hostname.as_str()),
        ("host-a", "host-b")
    );
    assert_eq!(
        (a.marker.as_str(), b.marker.as_str()),
        ("rootfs-of-a", "rootfs-of-b")
    );
    assert_ne!(a.uuid, b.uuid, "two clones gave the same random uuid");
    assert_ne!(
        a.random, b.random,
        "two clones read the same /dev/urandom bytes"
    );
    assert_eq!(a.random.len(), 64, "{}", a.random);
    t.env.run_ok(t.runv().args(["template", "rm", "base"]), 60);
    assert!(t.list().is_empty());
    t.env.assert_clean();
}

#[test]
fn kvm_native_clones_run_containers_and_are_unique() {
    // Without virtiofsd kvm-native copies the rootfs into an image, and `auto` clones it.
    let (t, flags) = ("tplkvm-native", ["--driver", "kvm-native"]);
    clones_run_containers_and_are_unique(t, &flags, &[("RUNV_VIRTIOFSD", "off")], "kvm-native");
}

/// With virtiofsd kvm-native shares the rootfs, which its clones cannot: under the default
/// `auto` the container boots cold on virtio-fs and no template is made for it.
#[test]
fn kvm_native_with_virtiofsd_boots_cold_under_auto() {
    if let Some(why) = kvm_unusable() {
        println!("skipped: {why}");
        return;
    }
    let caps = kvm_native_info()["capabilities"].to_string();
    if !caps.contains("shared-dir-rootfs") {
        println!("skipped: no virtiofsd for kvm-native here ({caps})");
        return;
    }
    let t = TplEnv::with_flags("tplkvm-fs", &["--driver", "kvm-native"]);
    let bundle = t
        .env
        .bundle("fs", &["sh", "-c", "grep ' / ' /proc/mounts; exit 7"]);
    let (code, out, err, log) = t.run(&[], &bundle, "cfs");
    assert_eq!(code, 7, "{err}\n{log}");
    assert!(out.contains("virtiofs"), "the rootfs is not shared: {out}");
    assert!(
        log.contains("cannot give a clone shared directories"),
        "{log}"
    );
    assert!(!log.contains("restored from template"), "{log}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(t.list().is_empty(), "a template was made: {:?}", t.list());
    t.env.assert_clean();
}

#[test]
fn qemu_kvm_clones_run_containers_and_are_unique() {
    let flags = ["--driver", "qemu", "--accel", "kvm"];
    clones_run_containers_and_are_unique("tplkvm-qemu", &flags, &[], "qemu");
}

/// A kvm-native clone in a network namespace: the template's NIC has no tap and a fixed MAC;
/// the clone's NIC is its netns's tap, and its guest interface gets the clone's MAC (the agent
/// swaps it in, as for qemu clones) and reaches the host side of the veth.
#[test]
fn a_kvm_native_clone_gets_its_own_network() {
    if let Some(why) = kvm_unusable() {
        println!("skipped: {why}");
        return;
    }
    let t = TplEnv::with_flags("tplkvm-net", &["--driver", "kvm-native"])
        .with_env("RUNV_VIRTIOFSD", "off");
    let ns = Netns::new(78);
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
            "cat /sys/class/net/eth0/address; ping -c 1 -W 5 10.78.0.1 >/dev/null && echo PING-OK",
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
