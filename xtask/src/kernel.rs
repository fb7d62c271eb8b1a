//! `cargo xtask kernel [--jobs N] [--rebuild]`: runv's own guest kernel, into
//! `target/guest/runv/` beside Debian's (`cargo xtask guest`):
//!
//! - `vmlinux` (stripped ELF, booted through its PVH entry by qemu and kvm-native),
//!   `vmlinuz` (the bzImage, for kvmtool), `kernel.release`, `config` (the whole `.config`);
//! - `initrd.img`: an uncompressed cpio holding only the agent as `/init` (every driver is
//!   built in: no modules, no `/lib/modules`).
//!
//! The kernel is Debian's `linux-source-6.1` (apt) configured with `make allnoconfig` and
//! the fragment `guest/kernel/runv.config` on top (`KCONFIG_ALLCONFIG`), so the fragment is
//! the whole configuration a reviewer reads. An option of the fragment that Kconfig drops (a
//! missing dependency, a renamed symbol) fails the build, naming it.
//!
//! Built kernels are cached outside the clone (it survives `cargo clean`), keyed by the
//! SHA-256 of the fragment, the source package's version, the compiler and [`RECIPE`]: an
//! unchanged kernel is never rebuilt (CI, `cargo xtask bench`). The unpacked source and the
//! object tree stay there too, so a changed fragment rebuilds only what it touches.
//! Progress goes to stderr (`cargo xtask bench --json` runs this first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::run_cmd;

/// The configuration fragment, relative to the workspace.
pub const FRAGMENT: &str = "guest/kernel/runv.config";
/// Debian's package with the kernel source tarball.
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The directory the tarball unpacks into.
const TARBALL_DIR: &str = "linux-source-6.1";
/// Bumped when the way the kernel is built changes: every cached kernel gets a new key.
const RECIPE: u32 = 1;
/// Built kernels kept in the cache (the newest); each is ~25 MB.
const KEEP_BUILT: usize = 4;
/// Where the kernel and its initrd go, under the workspace.
pub const OUT_DIR: &str = "target/guest/runv";

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// parallel make jobs (default: the number of CPUs)
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// build the kernel even when the cache holds it
    #[arg(long)]
    rebuild: bool,
}

pub fn run(args: Args) -> Result<()> {
    let ws = crate::workspace_root()?;
    let fragment = ws.join(FRAGMENT);
    let fragment_text =
        std::fs::read_to_string(&fragment).with_context(|| format!("{}", fragment.display()))?;
    let version = source_version()?;
    let cache = cache_dir()?.join("kernel");
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("creating the cache {}", cache.display()))?;
    // Worktrees and concurrent CI jobs share the cache: one build at a time.
    let _lock = lock(&cache.join("lock"))?;

    let key = cache_key(&fragment_text, &version, &compiler_version());
    let built = cache.join("built").join(&key);
    if args.rebuild || !built.join("done").exists() {
        let jobs = args.jobs.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let t0 = Instant::now();
        build(&cache, &version, &fragment, &built, jobs)?;
        eprintln!(
            "kernel built in {:.0} s ({jobs} jobs)",
            t0.elapsed().as_secs_f64()
        );
        prune_built(&cache.join("built"), KEEP_BUILT)?;
    } else {
        eprintln!("kernel {key} from the cache {}", built.display());
        // Mark it used, so pruning keeps the kernels in use.
        std::fs::write(built.join("done"), "")?;
    }

    let out = ws.join(OUT_DIR);
    std::fs::create_dir_all(&out)?;
    for f in ["vmlinux", "vmlinuz", "kernel.release", "config"] {
        install(&built.join(f), &out.join(f))?;
    }
    let agent = crate::guest::build_agent_static()?;
    let stage = out.join("initrd.stage");
    crate::guest::agent_stage(&stage, &agent)?;
    crate::guest::pack_initrd(&stage, &out.join("initrd.img"))?;
    std::fs::remove_dir_all(&stage)?;

    let release = std::fs::read_to_string(out.join("kernel.release"))?;
    eprintln!("kernel {} (cache key {key})", release.trim());
    for f in ["vmlinux", "vmlinuz", "initrd.img"] {
        let p = out.join(f);
        eprintln!(
            "{:>12} bytes  {}",
            std::fs::metadata(&p)?.len(),
            p.display()
        );
    }
    Ok(())
}

/// The cache: `$RUNV_BUILD_CACHE`, else `$XDG_CACHE_HOME/runv`, else `~/.cache/runv`, else
/// `/var/cache/runv-build`.
pub fn cache_dir() -> Result<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let dir = env("RUNV_BUILD_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("runv")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/runv")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/runv-build"));
    if dir.is_relative() {
        bail!("the build cache {} is not an absolute path", dir.display());
    }
    Ok(dir)
}

/// The installed version of the source package.
fn source_version() -> Result<String> {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", SOURCE_PACKAGE])
        .output()
        .context("running dpkg-query")?;
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if !o.status.success() || v.is_empty() || !Path::new(TARBALL).is_file() {
        bail!(
            "{SOURCE_PACKAGE} is not installed (no {TARBALL}): run scripts/setup.sh or \
             apt-get install {SOURCE_PACKAGE}"
        );
    }
    Ok(v)
}

/// The C compiler's version line: a new compiler makes another kernel.
fn compiler_version() -> String {
    Command::new("gcc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// What a built kernel depends on, hashed.
pub fn cache_key(fragment: &str, source_version: &str, compiler: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "recipe {RECIPE}\nsource {SOURCE_PACKAGE} {source_version}\ncompiler {compiler}\n"
    ));
    h.update(fragment.as_bytes());
    h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn lock(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("{}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).or_else(|(f, _)| {
        eprintln!("waiting for another kernel build ({})", path.display());
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
    })
}

/// Unpacks the source (once per version), configures, checks the fragment survived, builds,
/// and puts the results into `built` (complete once `built/done` exists).
fn build(cache: &Path, version: &str, fragment: &Path, built: &Path, jobs: usize) -> Result<()> {
    let src = unpack(cache, version)?;
    let obj = cache.join("obj").join(version);
    std::fs::create_dir_all(&obj)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(&src)
            .arg(format!("O={}", obj.display()))
            .arg("ARCH=x86_64")
            // The same version string on every machine.
            .env("KBUILD_BUILD_USER", "runv")
            .env("KBUILD_BUILD_HOST", "runv")
            .args(args);
        c
    };
    eprintln!("configuring: make allnoconfig + {}", fragment.display());
    run_cmd(
        make(&["-s", "allnoconfig"])
            .env("KCONFIG_ALLCONFIG", fragment)
            .stdout(std::process::Stdio::null()),
    )?;
    let config = std::fs::read_to_string(obj.join(".config"))?;
    let dropped = dropped_options(&std::fs::read_to_string(fragment)?, &config);
    if !dropped.is_empty() {
        bail!(
            "{}: Kconfig did not keep {} (a missing dependency or a renamed option; see {})",
            fragment.display(),
            dropped.join(", "),
            obj.join(".config").display()
        );
    }
    eprintln!(
        "building vmlinux and bzImage with {jobs} jobs in {}",
        obj.display()
    );
    // Its output goes to stderr: `cargo xtask bench --json` builds through here.
    run_cmd(make(&["-s", &format!("-j{jobs}"), "vmlinux", "bzImage"]).stdout(std::io::stderr()))?;
    let release = Command::new("make")
        .arg("-C")
        .arg(&src)
        .arg(format!("O={}", obj.display()))
        .args(["-s", "ARCH=x86_64", "kernelrelease"])
        .output()
        .context("make kernelrelease")?;
    let release = String::from_utf8_lossy(&release.stdout).trim().to_string();

    let tmp = built.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    // What the bzImage decompresses to (its own `vmlinux.bin`): no symbols or comments.
    run_cmd(
        Command::new("objcopy")
            .args(["-R", ".comment", "-S"])
            .arg(obj.join("vmlinux"))
            .arg(tmp.join("vmlinux")),
    )?;
    std::fs::copy(obj.join("arch/x86/boot/bzImage"), tmp.join("vmlinuz"))?;
    std::fs::copy(obj.join(".config"), tmp.join("config"))?;
    std::fs::write(tmp.join("kernel.release"), format!("{release}\n"))?;
    std::fs::write(tmp.join("done"), "")?;
    let _ = std::fs::remove_dir_all(built);
    std::fs::create_dir_all(built.parent().context("cache dir")?)?;
    std::fs::rename(&tmp, built)?;
    Ok(())
}

/// The source tree for `version`, unpacked from the tarball once; trees of other versions
/// (and their object trees) are removed.
fn unpack(cache: &Path, version: &str) -> Result<PathBuf> {
    let srcs = cache.join("src");
    let dir = srcs.join(version);
    let tree = dir.join(TARBALL_DIR);
    if !dir.join("done").exists() {
        for sub in ["src", "obj"] {
            if let Ok(entries) = std::fs::read_dir(cache.join(sub)) {
                for e in entries.flatten() {
                    eprintln!("removing {} (another source version)", e.path().display());
                    std::fs::remove_dir_all(e.path())?;
                }
            }
        }
        std::fs::create_dir_all(&dir)?;
        eprintln!("unpacking {TARBALL} ({SOURCE_PACKAGE} {version})");
        run_cmd(
            Command::new("tar")
                .arg("-C")
                .arg(&dir)
                .arg("-xf")
                .arg(TARBALL),
        )?;
        std::fs::write(dir.join("done"), "")?;
    }
    Ok(tree)
}

/// The fragment's settings that the final `.config` does not have as given: `CONFIG_X=v`
/// lines must be there verbatim, `# CONFIG_X is not set` ones must not be set.
pub fn dropped_options(fragment: &str, config: &str) -> Vec<String> {
    let have: std::collections::HashSet<&str> = config.lines().map(str::trim).collect();
    let set = |name: &str| {
        config
            .lines()
            .any(|l| l.split_once('=').is_some_and(|(k, _)| k == name))
    };
    let mut out = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            if set(name) {
                out.push(format!("{name} (set, should not be)"));
            }
        } else if line.starts_with("CONFIG_") && !have.contains(line) {
            out.push(line.to_string());
        }
    }
    out
}

/// Keeps the `keep` most recently used built kernels.
fn prune_built(dir: &Path, keep: usize) -> Result<()> {
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let used = e.path().join("done").metadata().ok()?.modified().ok()?;
            Some((used, e.path()))
        })
        .collect();
    all.sort();
    let excess = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&p)?;
    }
    Ok(())
}

/// Copies `src` to `dst` through a temporary file (a VM booting the old file keeps it).
fn install(src: &Path, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).with_context(|| format!("copying {}", src.display()))?;
    std::fs::rename(&tmp, dst)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_options_names_what_kconfig_did_not_keep() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n# CONFIG_M is not set\n\
                        # CONFIG_Q is not set\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=32\nCONFIG_Q=y\n";
        assert_eq!(
            dropped_options(fragment, config),
            ["CONFIG_B=y", "CONFIG_N=64", "CONFIG_Q (set, should not be)"]
        );
        assert!(dropped_options(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=64\n").is_empty());
    }

    #[test]
    fn cache_key_changes_with_each_input() {
        let k = cache_key("CONFIG_A=y\n", "6.1.1-1", "gcc 12");
        assert_eq!(k.len(), 24);
        assert_eq!(k, cache_key("CONFIG_A=y\n", "6.1.1-1", "gcc 12"));
        assert_ne!(k, cache_key("CONFIG_A=n\n", "6.1.1-1", "gcc 12"));
        assert_ne!(k, cache_key("CONFIG_A=y\n", "6.1.1-2", "gcc 12"));
        assert_ne!(k, cache_key("CONFIG_A=y\n", "6.1.1-1", "gcc 13"));
    }

    #[test]
    fn the_fragment_in_the_repo_keeps_modules_off() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join(FRAGMENT),
        )
        .unwrap();
        assert!(text.lines().any(|l| l == "# CONFIG_MODULES is not set"));
    }
}
