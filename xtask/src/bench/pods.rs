//! Section 8 of `cargo xtask bench`: Kubernetes pods through containerd's CRI plugin, runv
//! against runc. The measurement is the ignored test `pod_start_bench` of runv-cli's CRI test
//! (it has the CRI client), built in release mode and run here; it prints one JSON line.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

const MARK: &str = "BENCH-PODS ";

pub fn run(ws: &Path, runs: usize) -> Result<Value> {
    eprintln!("bench: pods through containerd's CRI (cargo test --release, engines_cri)");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(ws)
        .env("RUNV_BENCH_RUNS", runs.to_string())
        .args([
            "test",
            "--quiet",
            "--release",
            "-p",
            "runv-cli",
            "--test",
            "engines_cri",
            "--",
            "--ignored",
            "--exact",
            "pod_start_bench",
            "--nocapture",
        ])
        .output()
        .context("running the pod benchmark")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the pod benchmark failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(MARK))
        .context("the pod benchmark printed no result")?;
    let mut report: Value = serde_json::from_str(line).context("the pod benchmark's result")?;
    for key in ["pod_to_first_output_ms", "extra_container_ms"] {
        let (v, c) = (
            report["runv"][key]["median"].as_f64(),
            report["runc"][key]["median"].as_f64(),
        );
        if let (Some(v), Some(c)) = (v, c) {
            report["ratio_runv_runc"][key] = json!(v / c);
        }
    }
    Ok(report)
}

pub fn table(r: &Value) -> String {
    use std::fmt::Write;
    let mut s =
        String::from("\n8. Kubernetes pods through containerd's CRI (runv: one VM per pod)\n");
    if let Some(skipped) = r["skipped"].as_str().or(r.as_str()) {
        let _ = writeln!(s, "  skipped: {skipped}");
        return s;
    }
    let _ = writeln!(
        s,
        "  {:<36} {:>18} {:>18} {:>8}",
        "median ms (min-max)", "runv", "runc", "ratio"
    );
    for (key, label) in [
        ("pod_to_first_output_ms", "RunPodSandbox to first output"),
        ("extra_container_ms", "one more container in the pod"),
    ] {
        let cell = |h: &str| {
            let m = &r[h][key];
            format!(
                "{:.0} ({:.0}-{:.0})",
                m["median"].as_f64().unwrap_or(f64::NAN),
                m["min"].as_f64().unwrap_or(f64::NAN),
                m["max"].as_f64().unwrap_or(f64::NAN)
            )
        };
        let _ = writeln!(
            s,
            "  {:<36} {:>18} {:>18} {:>7.2}x",
            label,
            cell("runv"),
            cell("runc"),
            r["ratio_runv_runc"][key].as_f64().unwrap_or(f64::NAN)
        );
    }
    s
}
