//! Helpers for the tests of VM templates (`templates.rs` on qemu/TCG here, `templates_kvm.rs`
//! on a real KVM in the test host): a template store per test, the probe container whose
//! output shows what a clone must not share, and a network namespace with a veth pair.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Env, text};

/// An [`Env`] with a template store inside it; on drop (also after a failed assertion) it
/// kills background template builds that name the store, before `Env` kills VMs and removes
/// the directory.
pub struct TplEnv {
    pub env: Env,
    pub store: PathBuf,
    /// Global flags every command gets (e.g. `--driver kvm-native`).
    flags: Vec<String>,
    /// Environment every command gets.
    envs: Vec<(String, String)>,
}

impl TplEnv {
    pub fn new(tag: &str) -> Self {
        Self::with_flags(tag, &[])
    }

    /// A store whose commands all run with the global `flags` (a driver and its options).
    pub fn with_flags(tag: &str, flags: &[&str]) -> Self {
        let env = Env::new(tag);
        let store = env.dir.join("templates");
        TplEnv {
            env,
            store,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            envs: Vec::new(),
        }
    }

    /// Every command also gets `name=value` in its environment.
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.into(), value.into()));
        self
    }

    pub fn runv(&self) -> Command {
        let mut cmd = self.env.runv();
        // The default mode (`auto`), not the cold starts of the other tests.
        cmd.env_remove("RUNV_TEMPLATE");
        cmd.envs(self.envs.iter().map(|(n, v)| (n, v)));
        cmd.args(&self.flags);
        cmd.arg("--template-dir").arg(&self.store);
        cmd
    }

    pub fn list(&self) -> Vec<serde_json::Value> {
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
    pub fn run(&self, flags: &[&str], bundle: &Path, id: &str) -> (i32, String, String, String) {
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

pub fn pids_with(needles: &[&str]) -> Vec<u32> {
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

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// What the probe container prints, one item per line.
pub const PROBE: &str = "hostname; cat /marker; cat /proc/sys/kernel/random/uuid; \
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; exit 7";

pub fn probe_bundle(t: &TplEnv, name: &str) -> PathBuf {
    let bundle = t.env.bundle(name, &["sh", "-c", PROBE]);
    fs::write(bundle.join("rootfs/marker"), format!("rootfs-of-{name}\n")).unwrap();
    t.env.edit_spec(&bundle, |spec| {
        spec["hostname"] = format!("host-{name}").into();
    });
    bundle
}

pub struct Probe {
    pub hostname: String,
    pub marker: String,
    pub uuid: String,
    pub random: String,
    pub clock: u64,
}

pub fn probe(t: &TplEnv, flags: &[&str], bundle: &Path, id: &str, want_key: &str) -> Probe {
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

/// A network namespace with a veth pair, removed on drop.
pub struct Netns {
    pub name: String,
    pub host_if: String,
}

impl Netns {
    pub fn new(subnet: u8) -> Self {
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

    pub fn mac(&self) -> String {
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
