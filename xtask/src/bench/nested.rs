//! Section 7: cold start of kvm-native against qemu with KVM, inside the test host
//! (`xtask vmtest`: a TCG VM whose kvm-amd gives a real nested KVM), same kernel, initrd and
//! bundle, interleaved round by round; and each driver's warm start, from a template of the
//! bundle's shape made in the test host before the rounds (not timed: a template is made once
//! per shape), against its own cold start. Then kvm-native's `runv create` of a bundle whose
//! rootfs holds 10 MiB and one of 500 MiB, its directory shared by virtio-fs against copied
//! into an image (`RUNV_VIRTIOFSD=off`, what the driver does without virtiofsd). Then
//! qemu-kvm's agent channel, vsock (its default there) against virtio-serial
//! (`channel=serial`): ten `runv exec /bin/true` and 64 MiB of a process's stdout. Absolute
//! times are those of a nested guest under TCG (much slower than on hardware); the ratios are
//! what carry over.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::stats;
use super::warm::TEMPLATE_PLAIN;
use super::{busybox_rootfs, sum_json, summary};

pub const DRIVERS: [(&str, &str); 2] = [
    ("kvm-native", "--driver kvm-native"),
    ("qemu-kvm", "--driver qemu --accel kvm"),
];

/// Issue 14's target under KVM: a warm start at most this times the driver's own cold start.
pub const TARGET_WARM_COLD_RATIO: f64 = 0.25;

/// Where the test host keeps the templates (its /tmp is its own).
const STORE: &str = "/tmp/tpl";

/// The rootfs sizes (MiB) of the virtio-fs / image comparison.
pub const ROOTFS_MIB: [u64; 2] = [10, 500];
/// Its variants, as (name, environment): the name gets `-<size>`.
const SHARE_VARIANTS: [(&str, &str); 2] = [("virtiofs", ""), ("image", "RUNV_VIRTIOFSD=off")];

/// qemu-kvm's agent channels compared, as (name, the driver's `channel` parameter).
pub const CHANNELS: [(&str, &str); 2] = [("vsock", "vsock"), ("serial", "serial")];
/// What the channel comparison pipes through a process's stdout.
pub const STDOUT_MIB: u64 = 64;

/// The channel samples' names: `<channel>-exec` (seconds per exec) and `<channel>-stdout`
/// (seconds for [`STDOUT_MIB`]).
pub fn channel_variants() -> Vec<String> {
    CHANNELS
        .iter()
        .flat_map(|(c, _)| [format!("{c}-exec"), format!("{c}-stdout")])
        .collect()
}

/// The virtio-fs / image variants in order: for each size, each way.
pub fn share_variants() -> Vec<(String, u64, &'static str)> {
    ROOTFS_MIB
        .iter()
        .flat_map(|mib| {
            SHARE_VARIANTS
                .iter()
                .map(move |(n, env)| (format!("{n}-{mib}"), *mib, *env))
        })
        .collect()
}

/// Every variant timed in a round, as (name, runv flags): the drivers cold, then warm.
pub fn variants() -> Vec<(String, String)> {
    let cold = DRIVERS.iter().map(|(n, f)| (n.to_string(), f.to_string()));
    let warm = DRIVERS.iter().map(|(n, f)| {
        (
            format!("{n}-warm"),
            format!("{f} --template-dir {STORE} --template {TEMPLATE_PLAIN}-{n}"),
        )
    });
    cold.chain(warm).collect()
}

const SCRIPT: &str = r#"
RUNV="$1"; B="$2"; RUNS="$3"
export RUNV_TEMPLATE=off  # cold starts; the warm variants name their template
for d in DRIVERS; do
    name=${d%%:*}; flags=${d#*:}
    timeout 300 "$RUNV" $flags --template-dir STORE template create --bundle "$B" --name "TEMPLATE-$name" </dev/null >/dev/null 2>/tmp/err ||
        sed "s/^/$name template: /" /tmp/err
done
for i in $(seq "$RUNS"); do
    for d in VARIANTS; do
        name=${d%%:*}; flags=${d#*:}
        t0=$(date +%s%N)
        timeout 120 "$RUNV" $flags --root /tmp/r run --bundle "$B" "n$i-$name" </dev/null >/dev/null 2>/tmp/err
        rc=$?
        t1=$(date +%s%N)
        [ $rc -eq 0 ] || sed "s/^/$name: /" /tmp/err
        echo "NESTED $i $name $rc $(( (t1 - t0) / 1000 ))"
    done
done
for i in $(seq "$RUNS"); do
    for v in SHARES; do
        name=${v%%:*}; rest=${v#*:}; mib=${rest%%:*}; env=${rest#*:}
        t0=$(date +%s%N)
        env $env timeout 300 "$RUNV" --driver kvm-native --root /tmp/r create --bundle "$B-$mib" "s$i-$name" </dev/null >/dev/null 2>/tmp/err
        rc=$?
        t1=$(date +%s%N)
        [ $rc -eq 0 ] || sed "s/^/$name: /" /tmp/err
        timeout 60 "$RUNV" --root /tmp/r delete -f "s$i-$name" >/dev/null 2>&1
        echo "SHARE $i $name $rc $(( (t1 - t0) / 1000 ))"
    done
done
for i in $(seq "$RUNS"); do
    for ch in CHANNEL_NAMES; do
        id="c$i-$ch"
        timeout 120 "$RUNV" --config "$B-channel-$ch.toml" --driver qemu --accel kvm --root /tmp/r create --bundle "$B-sleep" "$id" </dev/null >/dev/null 2>/tmp/err &&
            "$RUNV" --root /tmp/r start "$id" 2>>/tmp/err
        rc=$?
        [ $rc -eq 0 ] || sed "s/^/$ch: /" /tmp/err
        t0=$(date +%s%N)
        for k in 1 2 3 4 5 6 7 8 9 10; do
            "$RUNV" --root /tmp/r exec "$id" /bin/true || rc=1
        done
        t1=$(date +%s%N)
        echo "CHANNEL $i $ch-exec $rc $(( (t1 - t0) / 10000 ))"
        t0=$(date +%s%N)
        n=$("$RUNV" --root /tmp/r exec "$id" dd if=/dev/zero bs=1M count=STDOUT_MIB 2>/dev/null | wc -c)
        t1=$(date +%s%N)
        [ "$n" = $((STDOUT_MIB * 1048576)) ] && rc=0 || rc=1
        echo "CHANNEL $i $ch-stdout $rc $(( (t1 - t0) / 1000 ))"
        timeout 60 "$RUNV" --root /tmp/r delete -f "$id" >/dev/null 2>&1
    done
done
"#;

/// One `PREFIX round variant status micros` line.
fn parse_prefixed<'a>(line: &'a str, prefix: &str) -> Option<(usize, &'a str, i32, f64)> {
    let mut w = line.strip_prefix(prefix)?.split_whitespace();
    let round = w.next()?.parse().ok()?;
    let driver = w.next()?;
    let rc = w.next()?.parse().ok()?;
    let micros: f64 = w.next()?.parse().ok()?;
    Some((round, driver, rc, micros / 1e6))
}

/// Per-variant samples (seconds, `None` for a failed run), indexed by round, from the
/// `PREFIX round name status micros` lines of `output`, for `names` in order.
fn prefixed_samples(
    output: &str,
    prefix: &str,
    names: &[String],
    runs: usize,
) -> Vec<Vec<Option<f64>>> {
    let mut out = vec![vec![None; runs]; names.len()];
    for (round, name, rc, secs) in output.lines().filter_map(|l| parse_prefixed(l, prefix)) {
        let Some(v) = names.iter().position(|n| n == name) else {
            continue;
        };
        if rc == 0 && (1..=runs).contains(&round) {
            out[v][round - 1] = Some(secs);
        }
    }
    out
}

/// The drivers' rounds, in [`variants`] order.
pub fn samples(output: &str, runs: usize) -> Vec<Vec<Option<f64>>> {
    let names: Vec<String> = variants().into_iter().map(|(n, _)| n).collect();
    prefixed_samples(output, "NESTED ", &names, runs)
}

/// The virtio-fs / image samples, in [`share_variants`] order.
pub fn share_samples(output: &str, runs: usize) -> Vec<Vec<Option<f64>>> {
    let names: Vec<String> = share_variants().into_iter().map(|(n, _, _)| n).collect();
    prefixed_samples(output, "SHARE ", &names, runs)
}

/// The channel samples, in [`channel_variants`] order.
pub fn channel_samples(output: &str, runs: usize) -> Vec<Vec<Option<f64>>> {
    prefixed_samples(output, "CHANNEL ", &channel_variants(), runs)
}

/// A copy of `bundle` beside it, named `name`.
fn copy_bundle(bundle: &Path, name: &str) -> Result<std::path::PathBuf> {
    let copy = bundle.with_file_name(name);
    let st = Command::new("cp")
        .arg("-a")
        .arg(bundle)
        .arg(&copy)
        .status()
        .context("cp -a")?;
    anyhow::ensure!(st.success(), "copying {}", bundle.display());
    Ok(copy)
}

/// A sleeping container's bundle (`bundle-sleep`) and a host config per channel
/// (`bundle-channel-<name>.toml`, setting the qemu driver's `channel`).
fn channel_bundles(bundle: &Path) -> Result<()> {
    let copy = copy_bundle(bundle, "bundle-sleep")?;
    let config = copy.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&config)?)?;
    spec["process"]["args"] = json!(["sleep", "600"]);
    std::fs::write(&config, serde_json::to_vec_pretty(&spec)?)?;
    for (name, value) in CHANNELS {
        std::fs::write(
            bundle.with_file_name(format!("bundle-channel-{name}.toml")),
            format!("[driver_parameters.qemu]\nchannel = \"{value}\"\n"),
        )?;
    }
    Ok(())
}

/// A copy of `bundle` whose rootfs holds about `mib` MiB: a file of non-zero bytes (no holes
/// for the image copy to skip) beside busybox.
fn sized_bundle(bundle: &Path, mib: u64) -> Result<()> {
    let copy = copy_bundle(bundle, &format!("bundle-{mib}"))?;
    let busybox_mib = std::fs::metadata(copy.join("rootfs/bin/busybox"))?.len() >> 20;
    let mut filler = std::io::BufWriter::new(std::fs::File::create(copy.join("rootfs/filler"))?);
    let block = [0x5au8; 1 << 20];
    for _ in 0..mib.saturating_sub(busybox_mib) {
        std::io::Write::write_all(&mut filler, &block)?;
    }
    std::io::Write::flush(&mut filler)?;
    Ok(())
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
    for mib in ROOTFS_MIB {
        sized_bundle(&bundle, mib)?;
    }
    channel_bundles(&bundle)?;
    let channel_names = CHANNELS.map(|(n, _)| n).join(" ");
    let shares = share_variants()
        .iter()
        .map(|(n, mib, env)| format!("\"{n}:{mib}:{env}\""))
        .collect::<Vec<_>>()
        .join(" ");
    let quote = |list: Vec<(String, String)>| -> String {
        list.iter()
            .map(|(n, f)| format!("\"{n}:{f}\""))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let cold = DRIVERS
        .iter()
        .map(|(n, f)| (n.to_string(), f.to_string()))
        .collect();
    let script = dir.join("nested.sh");
    std::fs::write(
        &script,
        SCRIPT
            .replace("SHARES", &shares)
            .replace("CHANNEL_NAMES", &channel_names)
            .replace("STDOUT_MIB", &STDOUT_MIB.to_string())
            .replace("VARIANTS", &quote(variants()))
            .replace("DRIVERS", &quote(cold))
            .replace("STORE", STORE)
            .replace("TEMPLATE", TEMPLATE_PLAIN),
    )?;

    eprintln!("bench: nested KVM in the test host (templates, then {runs} rounds)");
    let out = Command::new(std::env::current_exe()?)
        .current_dir(ws)
        .args([
            "vmtest",
            "--no-build",
            "--timeout",
            &(600 + 300 * runs).to_string(),
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
    for (i, (name, _)) in variants().iter().enumerate() {
        drivers.insert(
            name.clone(),
            json!({"seconds": sum_json(summary(&samples[i])), "samples": samples[i]}),
        );
    }
    let ratio = stats::summarize(&stats::paired_ratios(&samples[0], &samples[1]));
    let mut warm = serde_json::Map::new();
    for (i, (name, _)) in DRIVERS.iter().enumerate() {
        let r = stats::paired_ratios(&samples[DRIVERS.len() + i], &samples[i]);
        warm.insert(name.to_string(), sum_json(stats::summarize(&r)));
    }
    let shares = share_samples(&stdout, runs);
    let mut share_times = serde_json::Map::new();
    for (i, (name, _, _)) in share_variants().iter().enumerate() {
        share_times.insert(
            name.clone(),
            json!({"seconds": sum_json(summary(&shares[i])), "samples": shares[i]}),
        );
    }
    let mut share_ratios = serde_json::Map::new();
    for (i, mib) in ROOTFS_MIB.iter().enumerate() {
        let (virtiofs, image) = (&shares[2 * i], &shares[2 * i + 1]);
        let r = stats::summarize(&stats::paired_ratios(virtiofs, image));
        share_ratios.insert(mib.to_string(), sum_json(r));
    }
    let channels = channel_samples(&stdout, runs);
    let mut channel_times = serde_json::Map::new();
    for (i, name) in channel_variants().iter().enumerate() {
        channel_times.insert(
            name.clone(),
            json!({"seconds": sum_json(summary(&channels[i])), "samples": channels[i]}),
        );
    }
    // vsock against serial, paired per round: exec times and stdout times (lower is better).
    let channel_ratios = json!({
        "exec": sum_json(stats::summarize(&stats::paired_ratios(&channels[0], &channels[2]))),
        "stdout": sum_json(stats::summarize(&stats::paired_ratios(&channels[1], &channels[3]))),
    });
    let errors: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            !["NESTED ", "SHARE ", "CHANNEL "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    Ok(json!({
        "drivers": drivers,
        "kvm_native_to_qemu_kvm_paired": sum_json(ratio),
        "warm_to_cold_paired": warm,
        "kvm_native_create": share_times,
        "virtiofs_to_image_paired": share_ratios,
        "qemu_kvm_channel": channel_times,
        "vsock_to_serial_paired": channel_ratios,
        "failed_run_output": errors,
    }))
}

/// The table lines of section 7.
pub fn table(r: &Value) -> String {
    const TITLE: &str = "7. nested KVM (run of /bin/true in the test host; warm: from a template)";
    if let Some(s) = r.as_str() {
        return format!("\n{TITLE}: {s}\n");
    }
    let mut s = format!("\n{TITLE}\n");
    for (name, _) in variants() {
        let d = &r["drivers"][&name]["seconds"];
        s.push_str(&format!(
            "  {name:<16} {:>6.2} s median (min {:.2}, max {:.2}, n {})\n",
            d["median"].as_f64().unwrap_or(f64::NAN),
            d["min"].as_f64().unwrap_or(f64::NAN),
            d["max"].as_f64().unwrap_or(f64::NAN),
            d["n"]
        ));
    }
    let q = &r["kvm_native_to_qemu_kvm_paired"];
    s.push_str(&format!(
        "  kvm-native / qemu-kvm (cold), paired per round: {:.2}x (min {:.2}, max {:.2})\n",
        q["median"].as_f64().unwrap_or(f64::NAN),
        q["min"].as_f64().unwrap_or(f64::NAN),
        q["max"].as_f64().unwrap_or(f64::NAN)
    ));
    for (name, _) in DRIVERS {
        let w = &r["warm_to_cold_paired"][name];
        let median = w["median"].as_f64().unwrap_or(f64::NAN);
        let met = if stats::met(median, TARGET_WARM_COLD_RATIO, true) {
            "met"
        } else {
            "NOT met"
        };
        s.push_str(&format!(
            "  {name} warm / cold, paired per round: {median:.2}x (min {:.2}, max {:.2}); \
             <= {TARGET_WARM_COLD_RATIO}x the cold start: {met}\n",
            w["min"].as_f64().unwrap_or(f64::NAN),
            w["max"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    s.push_str(
        "  kvm-native `runv create` (the rootfs shared by virtio-fs, or copied into an image):\n",
    );
    for (name, _, _) in share_variants() {
        let d = &r["kvm_native_create"][&name]["seconds"];
        s.push_str(&format!(
            "    {name:<14} {:>6.2} s median (min {:.2}, max {:.2}, n {})\n",
            d["median"].as_f64().unwrap_or(f64::NAN),
            d["min"].as_f64().unwrap_or(f64::NAN),
            d["max"].as_f64().unwrap_or(f64::NAN),
            d["n"]
        ));
    }
    for mib in ROOTFS_MIB {
        let q = &r["virtiofs_to_image_paired"][mib.to_string()];
        s.push_str(&format!(
            "    {mib} MiB rootfs: virtio-fs / image, paired per round: {:.2}x (min {:.2}, max {:.2})\n",
            q["median"].as_f64().unwrap_or(f64::NAN),
            q["min"].as_f64().unwrap_or(f64::NAN),
            q["max"].as_f64().unwrap_or(f64::NAN)
        ));
    }
    s.push_str("  qemu-kvm's agent channel (vsock, or virtio-serial):\n");
    for (name, _) in CHANNELS {
        let exec = &r["qemu_kvm_channel"][format!("{name}-exec")]["seconds"];
        let out = &r["qemu_kvm_channel"][format!("{name}-stdout")]["seconds"];
        let secs = out["median"].as_f64().unwrap_or(f64::NAN);
        s.push_str(&format!(
            "    {name:<7} exec /bin/true {:>6.1} ms median; stdout {STDOUT_MIB} MiB in {secs:.2} s ({:.0} MiB/s)\n",
            exec["median"].as_f64().unwrap_or(f64::NAN) * 1e3,
            STDOUT_MIB as f64 / secs,
        ));
    }
    let v = &r["vsock_to_serial_paired"];
    s.push_str(&format!(
        "    vsock / serial, paired per round: exec {:.2}x, stdout time {:.2}x\n",
        v["exec"]["median"].as_f64().unwrap_or(f64::NAN),
        v["stdout"]["median"].as_f64().unwrap_or(f64::NAN),
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
                   NESTED 9 kvm-native 0 1\nNESTED 1 kvm-native-warm 0 500000\n";
        let s = samples(out, 2);
        assert_eq!(s[0], [Some(2.5), Some(3.0)]);
        assert_eq!(s[1], [Some(5.0), None]);
        assert_eq!(s[2], [Some(0.5), None]);
        assert_eq!(s[3], [None, None]);
        assert_eq!(stats::paired_ratios(&s[0], &s[1]), [0.5]);
        assert_eq!(stats::paired_ratios(&s[2], &s[0]), [0.2]);
    }

    #[test]
    fn share_lines_become_samples_per_size_and_way() {
        let v = share_variants();
        let names: Vec<&str> = v.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["virtiofs-10", "image-10", "virtiofs-500", "image-500"]
        );
        assert_eq!(v[1].2, "RUNV_VIRTIOFSD=off");
        let out = "SHARE 1 virtiofs-10 0 2000000\nSHARE 1 image-10 0 4000000\n\
                   NESTED 1 kvm-native 0 1\nSHARE 2 image-500 1 5\nSHARE 1 image-500 0 9000000\n";
        let s = share_samples(out, 2);
        assert_eq!(s[0], [Some(2.0), None]);
        assert_eq!(s[1], [Some(4.0), None]);
        assert_eq!(s[3], [Some(9.0), None]);
        assert_eq!(stats::paired_ratios(&s[0], &s[1]), [0.5]);
        // The share lines are not the drivers' rounds.
        assert_eq!(samples(out, 2)[0], [Some(1e-6), None]);
    }

    #[test]
    fn channel_lines_become_exec_and_stdout_samples() {
        assert_eq!(
            channel_variants(),
            ["vsock-exec", "vsock-stdout", "serial-exec", "serial-stdout"]
        );
        let out = "CHANNEL 1 vsock-exec 0 20000\nCHANNEL 1 vsock-stdout 0 500000\n\
                   CHANNEL 1 serial-exec 0 40000\nCHANNEL 1 serial-stdout 1 9\n";
        let c = channel_samples(out, 1);
        assert_eq!(c[0], [Some(0.02)]);
        assert_eq!(c[3], [None]);
        assert_eq!(stats::paired_ratios(&c[0], &c[2]), [0.5]);
    }

    #[test]
    fn warm_variants_name_their_driver_and_template() {
        let v = variants();
        assert_eq!(v.len(), 4);
        assert_eq!(v[2].0, "kvm-native-warm");
        assert_eq!(
            v[3].1,
            "--driver qemu --accel kvm --template-dir /tmp/tpl --template bench-qemu-kvm"
        );
    }
}
