//! `cargo xtask dist`: a packager's install of runv with only the chosen plugins.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{run_cmd, workspace_root};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// where to install (bin/runv, lib/runv/*.so, share/runv/*)
    #[arg(long, value_name = "DIR")]
    prefix: PathBuf,
    /// plugins to install, by name (default: every built driver but the example)
    #[arg(long, value_name = "a,b,...", value_delimiter = ',')]
    drivers: Option<Vec<String>>,
    /// which build to install
    #[arg(long, default_value = "release", value_parser = ["release", "dev"])]
    profile: String,
    /// install what is built, without running cargo build first
    #[arg(long)]
    no_build: bool,
}

/// A plugin file's driver name: `librunv_driver_kvm_native.so` → `kvm-native`.
fn plugin_name(file_name: &str) -> Option<String> {
    let stem = file_name.strip_prefix("librunv_")?.strip_suffix(".so")?;
    let name = stem
        .strip_prefix("driver_")
        .or_else(|| stem.strip_prefix("storage_"))?;
    Some(name.replace('_', "-"))
}

pub fn run(mut opts: Args) -> anyhow::Result<()> {
    // `--drivers a,,b` or a trailing comma: empty names mean nothing.
    if let Some(d) = &mut opts.drivers {
        d.retain(|s| !s.is_empty());
    }
    let root = workspace_root()?;
    if !opts.no_build {
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.current_dir(&root).args([
            "build",
            "--workspace",
            "--exclude",
            "xtask",
            "--profile",
            &opts.profile,
        ]);
        run_cmd(&mut build)?;
    }
    let out_dir = root.join("target").join(if opts.profile == "dev" {
        "debug"
    } else {
        "release"
    });

    let mut built: Vec<(String, PathBuf)> = fs::read_dir(&out_dir)
        .with_context(|| format!("reading {}", out_dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = plugin_name(e.file_name().to_str()?)?;
            Some((name, e.path()))
        })
        .collect();
    built.sort();

    let chosen: Vec<&(String, PathBuf)> = match &opts.drivers {
        Some(wanted) => {
            for w in wanted {
                if !built.iter().any(|(name, _)| name == w) {
                    let names: Vec<&str> = built.iter().map(|(n, _)| n.as_str()).collect();
                    bail!(
                        "no plugin named {w:?} was built (built: {})",
                        names.join(", ")
                    );
                }
            }
            built.iter().filter(|(n, _)| wanted.contains(n)).collect()
        }
        None => built.iter().filter(|(n, _)| n != "example").collect(),
    };

    let bin_dir = opts.prefix.join("bin");
    let lib_dir = opts.prefix.join("lib/runv");
    fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    // A re-install must not leave plugins that were not chosen this time.
    if lib_dir.exists() {
        fs::remove_dir_all(&lib_dir).with_context(|| format!("clearing {}", lib_dir.display()))?;
    }
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    install(&out_dir.join("runv"), &bin_dir.join("runv"))?;
    for (name, path) in &chosen {
        let file_name = path.file_name().context("plugin without a file name")?;
        install(path, &lib_dir.join(file_name))?;
        println!("installed plugin {name}");
    }
    install_guest(&root, &opts.prefix)?;
    println!("installed runv into {}", opts.prefix.display());
    Ok(())
}

fn install_guest(root: &Path, prefix: &Path) -> anyhow::Result<()> {
    let guest = root.join("target/guest");
    let share = prefix.join("share/runv");
    let files = ["vmlinux", "vmlinuz", "initrd.img", "kernel.release"];
    if !files.iter().any(|f| guest.join(f).exists()) {
        println!(
            "note: no guest image in {} (run `cargo xtask guest`); share/runv not installed",
            guest.display()
        );
        return Ok(());
    }
    fs::create_dir_all(&share).with_context(|| format!("creating {}", share.display()))?;
    for f in files {
        let src = guest.join(f);
        if src.exists() {
            install(&src, &share.join(f))?;
        }
    }
    Ok(())
}

fn install(src: &Path, dst: &Path) -> anyhow::Result<()> {
    // Copy to a temporary name and rename, so a running runv never sees a half-written file.
    let tmp = dst.with_extension("tmp-install");
    fs::copy(src, &tmp)
        .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
    fs::rename(&tmp, dst).with_context(|| format!("installing {}", dst.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_from_files() {
        assert_eq!(
            plugin_name("librunv_driver_qemu.so").as_deref(),
            Some("qemu")
        );
        assert_eq!(
            plugin_name("librunv_driver_kvm_native.so").as_deref(),
            Some("kvm-native")
        );
        assert_eq!(
            plugin_name("librunv_storage_overlay.so").as_deref(),
            Some("overlay")
        );
        assert_eq!(plugin_name("libfoo.so"), None);
        assert_eq!(plugin_name("librunv_other_x.so"), None);
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        crate::parse_task_args(argv)
    }

    #[test]
    fn prefix_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--prefix"]).is_err());
        let o = parse(&["--prefix", "/p", "--drivers", "a,b"]).unwrap();
        assert_eq!(o.drivers.unwrap(), vec!["a", "b"]);
        assert!(parse(&["--prefix", "/p", "--profile", "fast"]).is_err());
    }
}
