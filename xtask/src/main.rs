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
    Fuzz(fuzz::Args),
    /// N real-VM lifecycles, with random kills, stops, races and damaged state; checks leaks
    Soak(soak::Args),
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
        Task::Fuzz(args) => fuzz::run(args),
        Task::Soak(args) => soak::run(args),
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

/// Parses a task's arguments as clap would after `cargo xtask TASK` (for the tasks' tests).
#[cfg(test)]
pub fn parse_task_args<A: clap::Args + clap::FromArgMatches>(
    argv: &[&str],
) -> Result<A, clap::Error> {
    let cmd = A::augment_args(clap::Command::new("task"));
    let matches = cmd.try_get_matches_from(std::iter::once("task").chain(argv.iter().copied()))?;
    A::from_arg_matches(&matches)
}
