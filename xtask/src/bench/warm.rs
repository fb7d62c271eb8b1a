//! Warm starts: containers restored from a VM template (`runv --template NAME`) against the
//! floor and the cold start, their phases, and the memory of idle clones against cold VMs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{Bench, PhaseSample, ok_or_stderr};

/// Issue 14's targets: a warm start at most this times the bare-VM floor (TCG) ...
pub const TARGET_WARM_FLOOR_RATIO: f64 = 0.25;
/// ... and 10 idle clones at most this share of the memory of 10 cold VMs.
pub const TARGET_CLONE_MEMORY_RATIO: f64 = 0.5;

/// The template for the `/bin/true` and idle bundles (same shape: default size, no kernel
/// parameters), and the one for the phase runs (`--debug` adds kernel parameters).
pub const TEMPLATE_PLAIN: &str = "bench";
pub const TEMPLATE_DEBUG: &str = "bench-debug";

impl Bench {
    pub(super) fn template_store(&self) -> PathBuf {
        self.env.tmp.join("tpl")
    }

    /// Makes both templates (not timed: a template is made once per kernel/initrd/shape).
    pub(super) fn make_templates(&self, driver: &str) -> Result<()> {
        for (name, debug, bundle) in [
            (TEMPLATE_PLAIN, false, &self.bundle_true),
            (TEMPLATE_DEBUG, true, &self.bundle_echo),
        ] {
            let err = self.env.tmp.join(format!("template-{name}.err"));
            let mut cmd = self.env.runv();
            cmd.arg("--template-dir").arg(self.template_store());
            if debug {
                cmd.arg("--debug");
            }
            let st = cmd
                .args([
                    "--driver", driver, "template", "create", "--name", name, "--bundle",
                ])
                .arg(bundle)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&err)?)
                .status()?;
            ok_or_stderr(st, &format!("runv template create {name}"), &err)?;
        }
        Ok(())
    }

    /// `runv` with the bench's template store and `--template name`.
    pub(super) fn runv_warm(&self, name: &str) -> std::process::Command {
        let mut cmd = self.env.runv();
        cmd.arg("--template-dir")
            .arg(self.template_store())
            .args(["--template", name]);
        cmd
    }
}

/// The phases of a warm start from the monitor's debug marks (ms); a clone boots no kernel,
/// so there are no guest console marks.
pub(super) fn phase_sample(
    t0: i128,
    marks: &BTreeMap<String, i128>,
    first_output: Option<i128>,
    run_exit: i128,
    delete_ms: f64,
) -> PhaseSample {
    let ms = |a: Option<i128>, b: Option<i128>| match (a, b) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => f64::NAN,
    };
    let m = |k: &str| marks.get(k).copied();
    let phases = vec![
        (
            "runv CLI → monitor up".to_string(),
            ms(Some(t0), m("monitor-up")),
        ),
        (
            "monitor up → rootfs ready".into(),
            ms(m("monitor-up"), m("rootfs-ready")),
        ),
        (
            "rootfs ready → VM restored (qemu, state load, cont)".into(),
            ms(m("rootfs-ready"), m("vm-restored")),
        ),
        (
            "restored → clone unique (agent hello, reseed, clock)".into(),
            ms(m("vm-restored"), m("clone-unique")),
        ),
        (
            "clone unique → agent ready".into(),
            ms(m("clone-unique"), m("agent-ready")),
        ),
        (
            "agent ready → container created".into(),
            ms(m("agent-ready"), m("container-created")),
        ),
        (
            "created → started".into(),
            ms(m("container-created"), m("container-started")),
        ),
        (
            "started → first output on host".into(),
            ms(m("container-started"), first_output),
        ),
        (
            "first output → exit seen".into(),
            ms(first_output, m("container-exited")),
        ),
        (
            "exit → VM stopped".into(),
            ms(m("container-exited"), m("vm-stopped")),
        ),
        (
            "VM stopped → runv run returns".into(),
            ms(m("vm-stopped"), Some(run_exit)),
        ),
        ("runv delete".into(), delete_ms),
    ];
    PhaseSample {
        phases,
        modules: Vec::new(),
        console_bytes: 0,
    }
}

/// 10 idle cold VMs against 10 idle clones: summed PSS (monitor, VMM, guest RAM).
pub(super) fn memory_comparison(cold: &Value, clones: &Value) -> Value {
    let total = |v: &Value| {
        v["per_container_total_pss_mib"]
            .as_f64()
            .unwrap_or(f64::NAN)
            * v["containers"].as_f64().unwrap_or(f64::NAN)
    };
    let (c, w) = (total(cold), total(clones));
    let ratio = w / c;
    json!({
        "cold_total_pss_mib": c,
        "clones_total_pss_mib": w,
        "ratio": ratio,
        "target": format!("<= {TARGET_CLONE_MEMORY_RATIO} of the cold VMs' memory"),
        "met": super::stats::met(ratio, TARGET_CLONE_MEMORY_RATIO, true),
    })
}

/// The table lines for the warm section.
pub(super) fn table(r: &Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let p = &r["warm_phases"];
    if p.is_null() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n4b. phases of a warm start (runv --debug --template run --keep + delete, {} runs; ms)",
        p["runs"]
    );
    let _ = writeln!(
        s,
        "{:<52} {:>8} {:>8} {:>8}",
        "phase", "median", "min", "max"
    );
    for ph in p["phases"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<52} {:>8.1} {:>8.1} {:>8.1}",
            ph["phase"].as_str().unwrap_or(""),
            super::f(&ph["ms"]["median"]),
            super::f(&ph["ms"]["min"]),
            super::f(&ph["ms"]["max"])
        );
    }
    let m = &r["memory_clones_vs_cold"];
    if !m.is_null() {
        let _ = writeln!(
            s,
            "\n6b. memory: {} idle clones {:.0} MiB PSS in all, {} idle cold VMs {:.0} MiB: \
             {:.2} (target {}: {})",
            r["memory_clones"]["containers"],
            super::f(&m["clones_total_pss_mib"]),
            r["memory_many"]["containers"],
            super::f(&m["cold_total_pss_mib"]),
            super::f(&m["ratio"]),
            m["target"].as_str().unwrap_or(""),
            super::met_word(&m["met"]),
        );
    }
    s
}

/// Starts an idle clone from the plain template.
impl Bench {
    pub(super) fn start_idle_clone(&mut self, driver: &str) -> Result<String> {
        let id = self.next_id("clone");
        let err = self.env.tmp.join(format!("{id}.err"));
        self.env.containers.push(id.clone());
        let st = self
            .runv_warm(TEMPLATE_PLAIN)
            .args(["--driver", driver, "run", "--detach", "--bundle"])
            .arg(&self.bundle_idle)
            .arg(&id)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .status()?;
        ok_or_stderr(st, &format!("runv --template run --detach {id}"), &err)?;
        let log = std::fs::read_to_string(self.env.root.join(&id).join("hypervisor.log"))
            .context("the clone's hypervisor.log")?;
        if !log.contains("-incoming") {
            anyhow::bail!("{id} was not restored from the template");
        }
        Ok(id)
    }
}
