//! Section 7: cold start of kvm-native against qemu with KVM, inside the test host
//! (`xtask vmtest`: a TCG VM whose kvm-amd gives a real nested KVM), same kernel, initrd and
//! bundle, interleaved round by round. Absolute times are those of a nested guest under TCG
//! (much slower than on hardware); the ratio is what carries over.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::stats;
use super::{busybox_rootfs, sum_json, summary};

pub const DRIVERS: [(&str, &str); 2] = [
    ("kvm-native", "--driver kvm-native"),
    ("qemu-kvm", "--driver qemu --accel kvm"),
];

const SCRIPT: &str = r#"
RUNV="$1"; B="$2"; RUNS="$3"
for i in $(seq "$RUNS"); do
    for d in DRIVERS; do
        name=${d%%:*}; flags=${d#*:}
        t0=$(date +%s%N)
        timeout 120 "$RUNV" $flags --root /tmp/r run --bundle "$B" "n$i-$name" </dev/null >/dev/null 2>/tmp/err
        rc=$?
        t1=$(date +%s%N)
        [ $rc -eq 0 ] || sed "s/^/$name: /" /tmp/err
        echo "NESTED $i $name $rc $(( (t1 - t0) / 1000 ))"
    done
done
"#;

/// One `NESTED round driver status micros` line.
pub fn parse_line(line: &str) -> Option<(usize, &str, i32, f64)> {
    let mut w = line.strip_prefix("NESTED ")?.split_whitespace();
    let round = w.next()?.parse().ok()?;
    let driver = w.next()?;
    let rc = w.next()?.parse().ok()?;
    let micros: f64 = w.next()?.parse().ok()?;
    Some((round, driver, rc, micros / 1e6))
}

/// Per-driver samples (seconds, `None` for a failed run), indexed by round.
pub fn samples(output: &str, runs: usize) -> Vec<Vec<Option<f64>>> {
    let mut out = vec![vec![None; runs]; DRIVERS.len()];
    for (round, driver, rc, secs) in output.lines().filter_map(parse_line) {
        let Some(d) = DRIVERS.iter().position(|(n, _)| *n == driver) else {
            continue;
        };
        if rc == 0 && (1..=runs).contains(&round) {
            out[d][round - 1] = Some(secs);
        }
    }
    out
}

pub fn run(ws: &Path, release: &Path, runs: usize) -> Result<Value> {
    // Under target/: the test host sees the host's / but has its own fresh /tmp.
    let dir = ws.join(format!("target/bench-nested-{}", std::process::id()));
    let result = measure(ws, release, runs, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(ws: &Path, release: &Path, runs: usize, dir: &Path) -> Result<Value> {
    let runv = release.join("runv");
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    busybox_rootfs(&rootfs)?;
    let st = Command::new(&runv)
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .status()
        .context("runv spec")?;
    anyhow::ensure!(st.success(), "runv spec failed");
    let config = bundle.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&config)?)?;
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(["/bin/true"]);
    spec["root"]["readonly"] = json!(false);
    std::fs::write(&config, serde_json::to_vec_pretty(&spec)?)?;
    let list: Vec<String> = DRIVERS
        .iter()
        .map(|(n, f)| format!("\"{n}:{f}\""))
        .collect();
    let script = dir.join("nested.sh");
    std::fs::write(&script, SCRIPT.replace("DRIVERS", &list.join(" ")))?;

    eprintln!("bench: nested KVM in the test host ({runs} rounds)");
    let out = Command::new(std::env::current_exe()?)
        .current_dir(ws)
        .args([
            "vmtest",
            "--no-build",
            "--timeout",
            &(120 + 60 * runs).to_string(),
            "--",
        ])
        .arg("sh")
        .arg(&script)
        .arg(&runv)
        .arg(&bundle)
        .arg(runs.to_string())
        .output()
        .context("running xtask vmtest")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Ok(json!(format!(
            "skipped: the test host failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    let samples = samples(&stdout, runs);
    let mut drivers = serde_json::Map::new();
    for (i, (name, _)) in DRIVERS.iter().enumerate() {
        drivers.insert(
            name.to_string(),
            json!({"seconds": sum_json(summary(&samples[i])), "samples": samples[i]}),
        );
    }
    let ratio = stats::summarize(&stats::paired_ratios(&samples[0], &samples[1]));
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| !l.starts_with("NESTED "))
        .collect();
    Ok(json!({
        "drivers": drivers,
        "kvm_native_to_qemu_kvm_paired": sum_json(ratio),
        "failed_run_output": errors,
    }))
}

/// The table lines of section 7.
pub fn table(r: &Value) -> String {
    if let Some(s) = r.as_str() {
        return format!("\n7. nested KVM (cold run of /bin/true in the test host): {s}\n");
    }
    let mut s = String::from("\n7. nested KVM (cold run of /bin/true in the test host)\n");
    for (name, _) in DRIVERS {
        let d = &r["drivers"][name]["seconds"];
        s.push_str(&format!(
            "  {name:<11} {:>6.2} s median (min {:.2}, max {:.2}, n {})\n",
            d["median"].as_f64().unwrap_or(f64::NAN),
            d["min"].as_f64().unwrap_or(f64::NAN),
            d["max"].as_f64().unwrap_or(f64::NAN),
            d["n"]
        ));
    }
    let q = &r["kvm_native_to_qemu_kvm_paired"];
    s.push_str(&format!(
        "  kvm-native / qemu-kvm, paired per round: {:.2}x (min {:.2}, max {:.2})\n",
        q["median"].as_f64().unwrap_or(f64::NAN),
        q["min"].as_f64().unwrap_or(f64::NAN),
        q["max"].as_f64().unwrap_or(f64::NAN)
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_per_round_samples_and_failures_none() {
        let out = "NESTED 1 kvm-native 0 2500000\nNESTED 1 qemu-kvm 0 5000000\n\
                   qemu-kvm: boom\nNESTED 2 kvm-native 0 3000000\nNESTED 2 qemu-kvm 1 100\n\
                   NESTED 9 kvm-native 0 1\n";
        let s = samples(out, 2);
        assert_eq!(s[0], [Some(2.5), Some(3.0)]);
        assert_eq!(s[1], [Some(5.0), None]);
        assert_eq!(stats::paired_ratios(&s[0], &s[1]), [0.5]);
    }
}
