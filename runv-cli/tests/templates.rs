//! VM templates on real VMs (QEMU; TCG here): `runv template create|list|rm`, containers
//! restored from a template (exit code, rootfs, hostname, network), what clones must not
//! share (random state, clock), stale templates, and removing a template under a clone.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{Env, text, wait_until};

/// An [`Env`] with a template store inside it; on drop (also after a failed assertion) it
/// kills background template builds that name the store, before `Env` kills VMs and removes
/// the directory.
struct TplEnv {
    env: Env,
    store: PathBuf,
}

impl TplEnv {
    fn new(tag: &str) -> Self {
        let env = Env::new(tag);
        let store = env.dir.join("templates");
        TplEnv { env, store }
    }

    fn runv(&self) -> Command {
        let mut cmd = self.env.runv();
        cmd.arg("--template-dir").arg(&self.store);
        cmd
    }

    fn list(&self) -> Vec<serde_json::Value> {
        let out = self.env.run_ok(
            self.runv().args(["template", "list", "--format", "json"]),
            30,
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Runs a container with `--debug --log`, returns (exit code, stdout, stderr, log).
    fn run(&self, flags: &[&str], bundle: &Path, id: &str) -> (i32, String, String, String) {
        let log = self.env.dir.join(format!("{id}.log"));
        let out = self.env.run(
            self.runv()
                .args(flags)
                .arg("--debug")
                .arg("--log")
                .arg(&log)
                .args(["run", "--bundle"])
                .arg(bundle)
                .arg(id),
            300,
        );
        (
            out.status.code().unwrap_or(-1),
            text(&out.stdout),
            text(&out.stderr),
            fs::read_to_string(&log).unwrap_or_default(),
        )
    }
}

impl Drop for TplEnv {
    fn drop(&mut self) {
        let needle = self.store.to_string_lossy().to_string();
        for pid in pids_with(&["__template-build", &needle]) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

fn pids_with(needles: &[&str]) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    needles.iter().all(|n| c.contains(n))
                })
                .unwrap_or(false)
        })
        .collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// What the probe container prints, one item per line.
const PROBE: &str = "hostname; cat /marker; cat /proc/sys/kernel/random/uuid; \
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; exit 7";

fn probe_bundle(t: &TplEnv, name: &str) -> PathBuf {
    let bundle = t.env.bundle(name, &["sh", "-c", PROBE]);
    fs::write(bundle.join("rootfs/marker"), format!("rootfs-of-{name}\n")).unwrap();
    t.env.edit_spec(&bundle, |spec| {
        spec["hostname"] = format!("host-{name}").into();
    });
    bundle
}

struct Probe {
    hostname: String,
    marker: String,
    uuid: String,
    random: String,
    clock: u64,
}

fn probe(t: &TplEnv, flags: &[&str], bundle: &Path, id: &str, want_key: &str) -> Probe {
    let before = now_secs();
    let (code, out, err, log) = t.run(flags, bundle, id);
    let after = now_secs();
    assert_eq!(code, 7, "exit code; stderr: {err}; log: {log}");
    assert!(
        log.contains(&format!("restored from template {want_key}")),
        "{id} was not restored from {want_key}: {log}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    let clock: u64 = lines[4].trim().parse().unwrap();
    // The template's clock stopped when it was saved, long before `before`: a clone that was
    // not given the host's time would be far behind.
    assert!(
        clock + 1 >= before && clock <= after + 1,
        "guest clock {clock} not within 1 s of the host's [{before}, {after}]"
    );
    Probe {
        hostname: lines[0].to_string(),
        marker: lines[1].to_string(),
        uuid: lines[2].to_string(),
        random: lines[3].to_string(),
        clock,
    }
}

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
    let b = probe(
        &t,
        &["--template", "auto"],
        &probe_bundle(&t, "b"),
        "cb",
        &key,
    );
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

/// A network namespace with a veth pair, removed on drop.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn new(subnet: u8) -> Self {
        let name = format!("rvtpl{}", std::process::id());
        let host_if = format!("rvh{}", std::process::id());
        let sh = |c: &str| {
            let s = Command::new("sh").args(["-c", c]).status().unwrap();
            assert!(s.success(), "{c}");
        };
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
        };
        sh(&format!("ip netns add {name}"));
        sh(&format!(
            "ip link add {host_if} type veth peer name eth0 netns {name}"
        ));
        sh(&format!(
            "ip addr add 10.{subnet}.0.1/24 dev {host_if} && ip link set {host_if} up"
        ));
        sh(&format!(
            "ip -n {name} addr add 10.{subnet}.0.2/24 dev eth0 && ip -n {name} link set eth0 up"
        ));
        ns
    }

    fn mac(&self) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", "eth0"])
            .output()
            .unwrap();
        let line = text(&out.stdout);
        line.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap()
            .to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
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
