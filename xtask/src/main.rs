//! `cargo xtask <task>`: building the guest image, packaging, and test entry points.

mod bench;
mod deb;
mod demo;
mod dist;
mod docs;
mod fuzz;
mod guest;
mod kernel;
mod soak;
mod vmtest;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// runv's build, packaging, test and benchmark tasks.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

// A new task is a module with a `#[derive(clap::Args)] pub struct Args` and a
// `pub fn run(Args)`, one variant here and one arm in `run` below.
#[derive(Subcommand, Debug)]
enum Task {
    /// Boot a busybox container in a VM with the default driver (needs a release build)
    Demo(demo::Args),
    /// Build the guest kernel + initrd into target/guest (Debian's kernel when no --kernel)
    Guest(guest::Args),
    /// Build runv's own guest kernel (linux-source-6.1 + guest/kernel/runv.config, cached)
    /// and its agent-only initrd into target/guest/runv
    Kernel(kernel::Args),
    /// Install bin/runv, the chosen plugins under lib/runv and the guest files under share/runv
    Dist(dist::Args),
    /// Interleaved cold-start/exec/memory benchmarks against a bare-qemu floor and runc
    Bench(bench::Args),
    /// Run COMMAND in a test-host VM (TCG, -cpu EPYC,+svm) with a working nested /dev/kvm
    Vmtest(vmtest::Args),
    /// Build Debian packages: runv and one per plugin (dpkg-deb), into target/deb
    Deb(deb::Args),
    /// Generate runv's man pages (runv.1, runv-<command>.1) from its clap definitions
    Man(docs::ManArgs),
    /// Generate runv's bash, zsh and fish completions (bash also completes container ids)
    Completions(docs::CompletionsArgs),
    /// AFL++ on the protocol decoders and state parsers (fuzz/), the time shared by targets
    Fuzz(FuzzArgs),
    /// N real-VM lifecycles, with random kills, stops, races and damaged state; checks leaks
    Soak(SoakArgs),
}

/// `cargo xtask fuzz` (fuzz.rs checks the values).
#[derive(clap::Args, Debug)]
struct FuzzArgs {
    /// total fuzzing time, shared by the targets (e.g. 100s, 10m)
    #[arg(long, value_name = "DURATION")]
    time: Option<String>,
    /// fuzz only these targets (frames, messages, preamble, state, monitor)
    #[arg(long, value_name = "NAME")]
    target: Vec<String>,
    /// use the fuzz targets as built
    #[arg(long)]
    no_build: bool,
    /// keep AFL++'s output here
    #[arg(long, value_name = "DIR")]
    out: Option<String>,
}

impl FuzzArgs {
    fn argv(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(t) = &self.time {
            v.extend(["--time".to_string(), t.clone()]);
        }
        for t in &self.target {
            v.extend(["--target".to_string(), t.clone()]);
        }
        if self.no_build {
            v.push("--no-build".into());
        }
        if let Some(o) = &self.out {
            v.extend(["--out".to_string(), o.clone()]);
        }
        v
    }
}

/// `cargo xtask soak` (soak.rs checks the values).
#[derive(clap::Args, Debug)]
struct SoakArgs {
    /// how many lifecycles
    #[arg(long, value_name = "N")]
    cycles: Option<String>,
    /// random SIGKILL/SIGSTOP of monitor, VMM and CLI, racing operations, damaged state
    #[arg(long)]
    faults: bool,
    /// the random seed (printed by every run, to repeat one)
    #[arg(long, value_name = "S")]
    seed: Option<String>,
    /// use the debug build as it is
    #[arg(long)]
    no_build: bool,
    /// go on after a cycle with a problem
    #[arg(long)]
    keep_going: bool,
}

impl SoakArgs {
    fn argv(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(c) = &self.cycles {
            v.extend(["--cycles".to_string(), c.clone()]);
        }
        if let Some(s) = &self.seed {
            v.extend(["--seed".to_string(), s.clone()]);
        }
        for (on, flag) in [
            (self.faults, "--faults"),
            (self.no_build, "--no-build"),
            (self.keep_going, "--keep-going"),
        ] {
            if on {
                v.push(flag.to_string());
            }
        }
        v
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.task) {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Demo(args) => demo::run(args),
        Task::Guest(args) => guest::run(args),
        Task::Kernel(args) => kernel::run(args),
        Task::Dist(args) => dist::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Vmtest(args) => vmtest::run(args),
        Task::Deb(args) => deb::run(args),
        Task::Man(args) => docs::run_man(args),
        Task::Completions(args) => docs::run_completions(args),
        Task::Fuzz(args) => fuzz::run(&args.argv()),
        Task::Soak(args) => soak::run(&args.argv()),
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
