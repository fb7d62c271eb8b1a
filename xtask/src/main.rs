//! `cargo xtask <task>`: building the guest image, packaging, and test entry points.

mod bench;
mod demo;
mod dist;
mod fuzz;
mod guest;
mod soak;
mod vmtest;

use std::path::PathBuf;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask <task> [args]

tasks:
  demo  boot a busybox container in a VM with the default driver (needs a release build)
  guest [--kernel PATH]
        build the guest kernel + initrd into target/guest (Debian's kernel when no --kernel)
  dist --prefix DIR [--drivers a,b,...] [--profile release|dev] [--no-build]
        install bin/runv, the chosen plugins under lib/runv and the guest files under
        share/runv (default: every built driver but the example)
  bench [--json] [--runs N] [--drivers qemu,qemu+overlay] [--no-build] [--no-nested | --nested-only]
        interleaved cold-start/exec/memory benchmarks against a bare-qemu floor and runc;
        section 7 compares kvm-native with qemu-kvm inside the test host
  vmtest [--no-build] [--timeout S] [--boot-timeout S] [--out DIR] [--keep] -- COMMAND...
        run COMMAND in a test-host VM (TCG, -cpu EPYC,+svm) with a working nested /dev/kvm
  fuzz [--time 10m] [--target NAME]... [--no-build] [--out DIR]
        AFL++ on the protocol decoders and state parsers (fuzz/), the time shared by targets
  soak --cycles N [--faults] [--seed S] [--no-build] [--keep-going]
        N real-VM lifecycles, with random kills, stops, races and damaged state; checks leaks
";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((task, rest)) = args.split_first() else {
        print!("{USAGE}");
        bail!("no task given");
    };
    match task.as_str() {
        "bench" => bench::run(rest),
        "dist" => dist::run(rest),
        "demo" => demo::run(rest),
        "guest" => guest::run(rest),
        "vmtest" => vmtest::run(rest),
        "fuzz" => fuzz::run(rest),
        "soak" => soak::run(rest),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown task {other:?}\n{USAGE}"),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")
}

/// Runs a command, failing with its name when it does not succeed.
pub fn run_cmd(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
