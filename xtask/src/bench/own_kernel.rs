//! runv's own guest kernel (`cargo xtask kernel`, in `target/guest/runv`) against Debian's:
//! a floor booting it, a cold `runv run` and its phases with it, and the memory of an idle
//! container on it. Issue 16's targets: the cold start with runv's kernel at most 1.0× the
//! Debian-kernel floor and at most 1.15× the floor booting runv's kernel.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Result;
use serde_json::{Value, json};

use super::stats::{self, Summary};
use super::{Bench, ok_or_stderr};

/// A cold start with runv's kernel, at most this times the Debian-kernel floor ...
pub const TARGET_DEBIAN_FLOOR_RATIO: f64 = 1.0;
/// ... and at most this times the floor booting runv's kernel.
pub const TARGET_OWN_FLOOR_RATIO: f64 = 1.15;

/// runv's kernel and its initrd.
#[derive(Debug, Clone)]
pub struct OwnKernel {
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub release: String,
}

impl OwnKernel {
    /// The kernel in `dir` (`target/guest/runv`), when `cargo xtask kernel` made one.
    pub fn find(dir: &Path) -> Option<Self> {
        let (vmlinux, initrd) = (dir.join("vmlinux"), dir.join("initrd.img"));
        if !vmlinux.is_file() || !initrd.is_file() {
            return None;
        }
        let release = std::fs::read_to_string(dir.join("kernel.release"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Some(Self {
            vmlinux,
            initrd,
            release,
        })
    }

    /// What the report says about it.
    pub fn json(&self) -> Value {
        json!({"release": self.release, "vmlinux": self.vmlinux, "initrd": self.initrd})
    }
}

/// The floor's qemu arguments with another `-kernel`.
pub fn with_kernel(argv: &[String], kernel: &Path) -> Vec<String> {
    let mut out = argv.to_vec();
    if let Some(i) = out.iter().position(|a| a == "-kernel") {
        if let Some(v) = out.get_mut(i + 1) {
            *v = kernel.to_string_lossy().into_owned();
        }
    }
    out
}

/// The targets of the cold start with runv's kernel, from its per-round ratios to the
/// Debian-kernel floor and to its own floor.
pub fn target(to_debian_floor: Option<Summary>, to_own_floor: Option<Summary>) -> Value {
    let median = |s: Option<Summary>| s.map_or(f64::NAN, |s| s.median);
    let (d, o) = (median(to_debian_floor), median(to_own_floor));
    let met_d = stats::met(d, TARGET_DEBIAN_FLOOR_RATIO, true);
    let met_o = stats::met(o, TARGET_OWN_FLOOR_RATIO, true);
    let word = |m: bool| if m { "met" } else { "missed" };
    json!({
        "target": format!(
            "<= {TARGET_DEBIAN_FLOOR_RATIO}x the Debian-kernel floor, \
             <= {TARGET_OWN_FLOOR_RATIO}x the own-kernel floor"
        ),
        "met": met_d && met_o,
        "ratio_to_debian_floor_paired": super::sum_json(to_debian_floor),
        "ratio_to_own_floor_paired": super::sum_json(to_own_floor),
        "summary": format!(
            "≤{TARGET_DEBIAN_FLOOR_RATIO}× floor: {}; {o:.2}× own-kernel floor \
             (≤{TARGET_OWN_FLOOR_RATIO}×): {}",
            word(met_d),
            word(met_o)
        ),
    })
}

impl Bench {
    /// `runv` booting runv's kernel (flags: they win over the bundle and the environment).
    pub(super) fn runv_own(&self) -> Command {
        let mut cmd = self.env.runv();
        if let Some(k) = &self.own {
            cmd.arg("--kernel")
                .arg(&k.vmlinux)
                .arg("--initrd")
                .arg(&k.initrd);
        }
        cmd
    }

    /// An idle container on runv's kernel, measured alone and deleted.
    pub(super) fn memory_own(&mut self, driver: &str, ram_mib: u64) -> Result<Value> {
        let Some(own) = self.own.clone() else {
            return Ok(Value::Null);
        };
        let id = self.next_id("idle-own");
        let err = self.env.tmp.join(format!("{id}.err"));
        self.env.containers.push(id.clone());
        let st = self
            .runv_own()
            .args(["--driver", driver, "run", "--detach", "--bundle"])
            .arg(&self.bundle_idle)
            .arg(&id)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .status()?;
        ok_or_stderr(st, &format!("runv run --detach {id} (runv's kernel)"), &err)?;
        std::thread::sleep(std::time::Duration::from_secs(2));
        let state = super::read_state(&self.env.root, &id)?;
        let m = super::memory(
            std::slice::from_ref(&state),
            ram_mib,
            &own.vmlinux.to_string_lossy(),
        );
        let _ = self
            .env
            .runv()
            .args(["delete", "--force", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.env.containers.retain(|c| c != &id);
        m
    }
}

/// The own-kernel lines of the report: the kernel, its floor's guest marks, the idle memory.
pub fn table(r: &Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let k = &r["own_kernel"];
    if let Some(why) = k.as_str() {
        let _ = writeln!(s, "\nrunv's own kernel: {why}");
        return s;
    }
    if k.is_null() {
        return s;
    }
    let _ = writeln!(
        s,
        "\nrunv's own kernel {} ({}): floor guest kernel entry → Run /init {:.0} ms; console \
         {:.0} bytes",
        k["release"].as_str().unwrap_or("?"),
        k["vmlinux"].as_str().unwrap_or("?"),
        super::f(&r["floor_guest_own_kernel"]["kernel_to_run_init_ms"]["median"]),
        super::f(&r["floor_guest_own_kernel"]["console_bytes"]["median"]),
    );
    s.push_str(&super::phases_table(
        &r["phases_own_kernel"],
        "4c. phases of a cold start with runv's kernel",
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn with_kernel_replaces_only_the_kernel() {
        let argv = v(&["-m", "128M", "-kernel", "/g/vmlinux", "-initrd", "/f.cpio"]);
        assert_eq!(
            with_kernel(&argv, Path::new("/g/runv/vmlinux")),
            v(&[
                "-m",
                "128M",
                "-kernel",
                "/g/runv/vmlinux",
                "-initrd",
                "/f.cpio"
            ])
        );
        assert_eq!(with_kernel(&v(&["-m"]), Path::new("/k")), v(&["-m"]));
    }

    #[test]
    fn target_needs_both_ratios() {
        let s = |m: f64| {
            Some(Summary {
                median: m,
                min: m,
                max: m,
                n: 1,
            })
        };
        assert_eq!(target(s(0.9), s(1.1))["met"], true);
        assert_eq!(target(s(1.01), s(1.1))["met"], false);
        assert_eq!(target(s(0.9), s(1.2))["met"], false);
        assert_eq!(target(None, s(1.0))["met"], false);
        let summary = target(s(0.8), s(1.3))["summary"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(summary.contains("≤1× floor: met"), "{summary}");
        assert!(summary.contains("1.30× own-kernel floor"), "{summary}");
        assert!(summary.ends_with("missed"), "{summary}");
    }

    #[test]
    fn find_needs_the_kernel_and_the_initrd() {
        let dir = std::env::temp_dir().join(format!("rvb-own-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(OwnKernel::find(&dir).is_none());
        std::fs::write(dir.join("vmlinux"), "k").unwrap();
        assert!(OwnKernel::find(&dir).is_none());
        std::fs::write(dir.join("initrd.img"), "i").unwrap();
        std::fs::write(dir.join("kernel.release"), "6.1.1-runv\n").unwrap();
        let k = OwnKernel::find(&dir).unwrap();
        assert_eq!(k.release, "6.1.1-runv");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
