//! `cargo xtask fuzz [--time 10m] [--target NAME]... [--no-build] [--out DIR]`: coverage-guided
//! fuzzing of the host-side decoders (frames, control messages and the agent's replies, the
//! preamble reader) and the state and monitor-config parsers, with Debian's AFL++ on the
//! stable toolchain.
//!
//! The targets live in `fuzz/` (outside the workspace). They are built with LLVM's
//! SanitizerCoverage (what cargo-afl does, without it) and linked with AFL++'s runtime and its
//! libFuzzer-style driver, so each runs in persistent mode. `--time` is the whole budget,
//! shared evenly by the targets. A crash fails the task and names its input; replay it with
//! `cargo run --manifest-path fuzz/Cargo.toml --bin TARGET -- FILE`, then make it a test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::workspace_root;

pub const TARGETS: [&str; 5] = ["frames", "messages", "preamble", "state", "monitor"];
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
const AFL_LIB_DIR: &str = "/usr/lib/afl";

/// cargo-afl's instrumentation: edge coverage with comparison tracing, checks on.
const RUSTFLAGS: &str = "-C debug-assertions -C overflow-checks -C passes=sancov-module \
    -C codegen-units=1 -C llvm-args=-sanitizer-coverage-level=3 \
    -C llvm-args=-sanitizer-coverage-trace-pc-guard \
    -C llvm-args=-sanitizer-coverage-prune-blocks=0 \
    -C llvm-args=-sanitizer-coverage-trace-compares -C opt-level=3 --cfg fuzzing";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// total fuzzing time, shared by the targets (e.g. 100s, 10m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    time: Duration,
    /// fuzz only these targets (default: all)
    #[arg(long = "target", value_name = "NAME",
          value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
    /// use the fuzz targets as built
    #[arg(long)]
    no_build: bool,
    /// keep AFL++'s output here (default: target/fuzz/out)
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// `10m`, `30s`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?} (use e.g. 30s, 10m, 1h)"))?;
    if n == 0 {
        bail!("bad duration {s:?}: must be more than 0");
    }
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .with_context(|| format!("bad duration {s:?}: too long"))
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    if a.targets.is_empty() {
        a.targets = TARGETS.iter().map(|s| s.to_string()).collect();
    }
    let root = workspace_root()?;
    let afl = which("afl-fuzz").context(
        "afl-fuzz not found: install AFL++ (`apt-get install afl++`, scripts/setup.sh does)",
    )?;
    for f in ["afl-compiler-rt.o", "libAFLDriver.a"] {
        let p = Path::new(AFL_LIB_DIR).join(f);
        if !p.exists() {
            bail!(
                "{} missing: install AFL++ (`apt-get install afl++`)",
                p.display()
            );
        }
    }
    let target_dir = root.join("target/fuzz");
    let bin_dir = target_dir.join(TRIPLE).join("release");
    if !a.no_build {
        // --target keeps the flags off build scripts and proc macros (they are not linked
        // with AFL++'s runtime).
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bins", "--target", TRIPLE])
            .arg("--manifest-path")
            .arg(root.join("fuzz/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", RUSTFLAGS)
            .env("RUNV_FUZZ_AFL", "1")
            .env("AFL_LIB_DIR", AFL_LIB_DIR)
            .status()
            .context("running cargo build for fuzz/")?;
        if !status.success() {
            bail!("building the fuzz targets failed ({status})");
        }
    }
    let out = a.out.unwrap_or_else(|| target_dir.join("out"));
    let seeds = out.join("seeds");
    let _ = std::fs::remove_dir_all(&seeds);
    let status = Command::new(bin_dir.join("seeds"))
        .arg(&seeds)
        .status()
        .with_context(|| format!("running {}", bin_dir.join("seeds").display()))?;
    if !status.success() {
        bail!("writing the seed corpus failed ({status})");
    }

    let per_target = (a.time.as_secs() / a.targets.len() as u64).max(1);
    println!(
        "fuzzing {} target(s), {per_target} s each, with {}",
        a.targets.len(),
        afl.display()
    );
    let mut crashed = Vec::new();
    for t in &a.targets {
        let dir = out.join(t);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("afl.log"))?;
        let status = Command::new(&afl)
            .arg("-i")
            .arg(seeds.join(t))
            .arg("-o")
            .arg(&dir)
            .args(["-V", &per_target.to_string(), "--"])
            .arg(bin_dir.join(t))
            .env("AFL_NO_UI", "1")
            .env("AFL_SKIP_CPUFREQ", "1")
            // The machine is shared: no CPU pinning; core_pattern is the host's business.
            .env("AFL_NO_AFFINITY", "1")
            .env("AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES", "1")
            .env("AFL_SKIP_BIN_CHECK", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("running afl-fuzz")?;
        let stats = std::fs::read_to_string(dir.join("default/fuzzer_stats")).unwrap_or_default();
        let stat = |k: &str| {
            stats
                .lines()
                .find_map(|l| {
                    let (key, v) = l.split_once(':')?;
                    (key.trim() == k).then(|| v.trim().to_string())
                })
                .unwrap_or_else(|| "?".into())
        };
        let crashes = inputs(&dir.join("default/crashes"));
        let hangs = inputs(&dir.join("default/hangs"));
        println!(
            "{t}: {} execs ({}/s), corpus {}, edges {}, crashes {}, hangs {}",
            stat("execs_done"),
            stat("execs_per_sec"),
            stat("corpus_count"),
            stat("edges_found"),
            crashes.len(),
            hangs.len()
        );
        if !status.success() {
            bail!(
                "afl-fuzz for {t} failed ({status}); see {}",
                dir.join("afl.log").display()
            );
        }
        for c in crashes.iter().chain(&hangs) {
            println!("  {}", c.display());
        }
        if !crashes.is_empty() || !hangs.is_empty() {
            crashed.push(t.clone());
        }
    }
    if !crashed.is_empty() {
        bail!(
            "crashes or hangs in {}: replay with `cargo run --manifest-path fuzz/Cargo.toml --bin TARGET -- FILE` and add each as a regression test",
            crashed.join(", ")
        );
    }
    println!("no crashes, no hangs");
    Ok(())
}

/// The input files AFL++ saved in `dir` (not its README).
fn inputs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n != "README.txt"))
                .collect()
        })
        .unwrap_or_default()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("ten").is_err());
    }

    #[test]
    fn overlong_durations_are_refused() {
        assert!(parse_duration("99999999999999999h").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    /// The targets named here are fuzz/'s programs (all but `seeds`), also those its build
    /// script links with AFL++'s driver.
    #[test]
    fn targets_are_the_fuzz_crates_programs() {
        let fuzz = workspace_root().unwrap().join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        let mut bins: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .filter_map(|b| b.lines().find_map(|l| l.trim().strip_prefix("name = ")))
            .map(|n| n.trim_matches('"'))
            .filter(|n| *n != "seeds")
            .collect();
        bins.sort_unstable();
        let mut ours = TARGETS.to_vec();
        ours.sort_unstable();
        assert_eq!(bins, ours);
        let build = std::fs::read_to_string(fuzz.join("build.rs")).unwrap();
        let quoted: Vec<String> = TARGETS.iter().map(|t| format!("\"{t}\"")).collect();
        assert!(
            build.contains(&format!("[{}]", quoted.join(", "))),
            "fuzz/build.rs lists other targets"
        );
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        crate::parse_task_args(argv)
    }

    #[test]
    fn arguments() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.time, Duration::from_secs(600));
        assert!(a.targets.is_empty() && !a.no_build);
        let a = parse(&["--target", "state", "--target", "frames", "--time", "20s"]).unwrap();
        assert_eq!(a.targets, ["state", "frames"]);
        assert_eq!(a.time, Duration::from_secs(20));
        assert!(parse(&["--target", "nope"]).is_err());
        assert!(parse(&["--time", "0"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}
