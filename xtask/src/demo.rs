//! `cargo xtask demo`: boots a busybox container in a VM with the default driver and shows
//! that it ran there (the guest kernel's release, not the host's).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{run_cmd, workspace_root};

/// A busybox bundle at `dir` whose container runs `args`.
pub fn make_bundle(runv: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox not found: install busybox-static");
    }
    fs::copy(busybox, rootfs.join("bin/busybox")).context("copying busybox")?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("busybox", rootfs.join("bin").join(applet));
        }
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    run_cmd(Command::new(runv).args(["spec", "--bundle"]).arg(dir))?;
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(args);
    spec["root"]["readonly"] = false.into();
    fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// `cargo xtask demo` takes no arguments.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let root = workspace_root()?;
    let runv = root.join("target/release/runv");
    if !runv.exists() {
        bail!(
            "{} is missing: build with `cargo build --release --workspace`",
            runv.display()
        );
    }
    let bundle: PathBuf = root.join("target/demo/bundle");
    let state = root.join("target/demo/state");
    make_bundle(
        &runv,
        &bundle,
        &[
            "sh",
            "-c",
            "echo \"hello from busybox in a VM: kernel $(uname -r), $(nproc) vCPU, $(free -m | awk '/Mem:/{print $2}') MiB\"",
        ],
    )?;
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("host kernel: {}", host.trim());
    println!("$ runv run --bundle {} demo", bundle.display());
    let status = Command::new(&runv)
        .arg("--root")
        .arg(&state)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg("demo")
        .status()
        .context("running runv")?;
    if !status.success() {
        bail!("runv run failed: {status}");
    }
    Ok(())
}
