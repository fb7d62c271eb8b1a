//! `cargo xtask guest [--kernel PATH]`: the guest kernel and initrd in `target/guest/`.
//!
//! - `vmlinuz`: the bzImage; `vmlinux`: the uncompressed ELF extracted from it (QEMU boots it
//!   via PVH, which skips the in-guest decompression that is slow under TCG);
//! - `initrd.img`: an uncompressed cpio (newc; gunzip of the ~2.3 MiB cost ~170 ms at TCG speed,
//!   reading the few extra MiB from the host page cache costs nothing) with the static agent as `/init`, exactly the kernel
//!   modules the agent may need plus their dependencies, and `/lib/modules/order` (one line per
//!   module in dependency order: `name path deps...`);
//! - `kernel.release`.
//!
//! Without `--kernel`, Debian's `linux-image-amd64` dependency is fetched with `apt-get
//! download` into `target/guest/cache` and unpacked there (cached across runs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Modules the agent may load; their dependencies are added automatically.
const MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "virtio_blk",
    "ext4",
    "crc32c_generic",
    "overlay",
    "vmw_vsock_virtio_transport",
    "virtio_net",
    // Shares of the kvm-native driver (virtio-fs, with fuse).
    "virtiofs",
    // Free page reporting in the qemu driver's cold VMs.
    "virtio_balloon",
    // Xen guests (driver-xen): block and network front-ends, 9p over Xen.
    "xen_blkfront",
    "xen_netfront",
    "9pnet_xen",
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Builds the agent as a static release binary and returns its path.
pub fn build_agent_static() -> Result<PathBuf> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run_cmd(
        Command::new(cargo)
            .current_dir(&root)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            // The agent compiles OCI seccomp profiles with libseccomp, linked in statically
            // (Debian's libseccomp-dev ships the archive).
            .env("LIBSECCOMP_LINK_TYPE", "static")
            .env("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu")
            .args([
                "build",
                "--release",
                "-p",
                "runv-agent",
                "--target",
                "x86_64-unknown-linux-gnu",
            ]),
    )?;
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/runv-agent"))
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// a bzImage to use instead of Debian's linux-image-amd64 (its modules come from
    /// /lib/modules/<its release>)
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let kernel = args.kernel;
    let out = workspace_root().join("target/guest");
    let cache = out.join("cache");
    std::fs::create_dir_all(&cache)?;

    // The kernel and its module tree.
    let (bzimage, modroot, release) = match kernel {
        Some(k) => {
            let release = kernel_release_of(&k)?;
            let modroot = PathBuf::from(format!("/lib/modules/{release}"));
            (k, modroot, release)
        }
        None => debian_kernel(&cache)?,
    };
    println!("kernel {release}: {}", bzimage.display());

    std::fs::copy(&bzimage, out.join("vmlinuz"))?;
    extract_vmlinux(&bzimage, &out.join("vmlinux"))?;
    std::fs::write(out.join("kernel.release"), format!("{release}\n"))?;

    let agent = build_agent_static()?;
    let stage = out.join("initrd.stage");
    agent_stage(&stage, &agent)?;
    std::fs::create_dir_all(stage.join("lib/modules"))?;

    let order = module_order(&modroot)?;
    let mut lines = String::new();
    for (name, rel, deps) in &order {
        let dst = stage.join("lib/modules").join(rel);
        std::fs::create_dir_all(dst.parent().unwrap())?;
        let src = modroot.join(rel);
        if rel.ends_with(".xz") || rel.ends_with(".zst") {
            bail!(
                "compressed module {} not supported; decompress first",
                src.display()
            );
        }
        std::fs::copy(&src, &dst).with_context(|| format!("copy {}", src.display()))?;
        lines.push_str(&format!("{name} {rel} {}\n", deps.join(" ")));
    }
    std::fs::write(stage.join("lib/modules/order"), &lines)?;

    pack_initrd(&stage, &out.join("initrd.img"))?;
    std::fs::remove_dir_all(&stage)?;

    println!(
        "modules ({}): {}",
        order.len(),
        order
            .iter()
            .map(|o| o.0.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for f in ["vmlinuz", "vmlinux", "initrd.img", "kernel.release"] {
        let p = out.join(f);
        println!(
            "{:>12} bytes  {}",
            std::fs::metadata(&p)?.len(),
            p.display()
        );
    }
    Ok(())
}

/// A fresh initrd tree at `stage`: the agent as `/init` and the directories it mounts on.
pub fn agent_stage(stage: &Path, agent: &Path) -> Result<()> {
    if stage.exists() {
        std::fs::remove_dir_all(stage)?;
    }
    for d in ["proc", "sys", "dev", "run", "tmp"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy(agent, stage.join("init"))
        .with_context(|| format!("copying the agent {}", agent.display()))?;
    Ok(())
}

/// Packs `stage` into an uncompressed newc cpio at `initrd` (gunzip of a few MiB costs ~170
/// ms at TCG speed; reading the extra MiB from the host page cache costs nothing).
pub fn pack_initrd(stage: &Path, initrd: &Path) -> Result<()> {
    run_cmd(Command::new("sh").current_dir(stage).arg("-c").arg(format!(
        "find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 > '{}'",
        initrd.display()
    )))
}

fn kernel_release_of(bz: &Path) -> Result<String> {
    // bzImage header: at 0x20E a u16 offset (minus 0x200) of the version string.
    let data = std::fs::read(bz)?;
    let off = u16::from_le_bytes([data[0x20e], data[0x20f]]) as usize + 0x200;
    let s = data
        .get(off..off + 256)
        .context("kernel version string out of range")?;
    let s = String::from_utf8_lossy(s);
    Ok(s.split_whitespace().next().unwrap_or_default().to_string())
}

/// Fetches (once) and unpacks Debian's current amd64 kernel; returns bzImage, module dir, release.
fn debian_kernel(cache: &Path) -> Result<(PathBuf, PathBuf, String)> {
    let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
        .context("linux-image-amd64 has no linux-image-*-amd64 dependency (run apt-get update?)")?
        .to_string();
    let release = pkg.trim_start_matches("linux-image-").to_string();
    let tree = cache.join(&pkg);
    let bz = tree.join(format!("boot/vmlinuz-{release}"));
    if !bz.exists() {
        let have_deb = |c: &Path| -> Option<PathBuf> {
            std::fs::read_dir(c)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                })
        };
        let deb = match have_deb(cache) {
            Some(d) => d,
            None => {
                println!("downloading {pkg} into {}", cache.display());
                run_cmd(
                    Command::new("apt-get")
                        .current_dir(cache)
                        .args(["download", &pkg]),
                )?;
                have_deb(cache).context("apt-get download produced no .deb")?
            }
        };
        let tmp = cache.join(format!("{pkg}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp))?;
        std::fs::rename(&tmp, &tree)?;
    }
    let modroot = tree.join(format!("lib/modules/{release}"));
    Ok((bz, modroot, release))
}

/// The wanted modules plus dependencies, each after its dependencies: (name, path, deps).
fn module_order(modroot: &Path) -> Result<Vec<(String, String, Vec<String>)>> {
    // name -> relative path, for every module file in the tree.
    let mut paths = BTreeMap::new();
    let mut stack = vec![modroot.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if let Some(stem) = n.strip_suffix(".ko") {
                    let rel = p.strip_prefix(modroot)?.to_string_lossy().into_owned();
                    paths.insert(stem.replace('-', "_"), rel);
                }
            }
        }
    }
    let builtin = std::fs::read_to_string(modroot.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
        .map(|n| n.replace('-', "_"))
        .collect();

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    fn visit(
        name: &str,
        modroot: &Path,
        paths: &BTreeMap<String, String>,
        builtin: &BTreeSet<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<(String, String, Vec<String>)>,
        depth: usize,
    ) -> Result<()> {
        if done.contains(name) || depth > 64 {
            return Ok(());
        }
        done.insert(name.to_string());
        let Some(rel) = paths.get(name) else {
            if builtin.contains(name) {
                return Ok(());
            }
            bail!(
                "module {name} is neither in {} nor built in",
                modroot.display()
            );
        };
        let deps = output(
            Command::new("modinfo")
                .args(["-F", "depends"])
                .arg(modroot.join(rel)),
        )?;
        let deps: Vec<String> = deps
            .trim()
            .split(',')
            .filter(|d| !d.is_empty())
            .map(|d| d.replace('-', "_"))
            .collect();
        for d in &deps {
            visit(d, modroot, paths, builtin, done, order, depth + 1)?;
        }
        order.push((name.to_string(), rel.clone(), deps));
        Ok(())
    }
    for m in MODULES {
        visit(m, modroot, &paths, &builtin, &mut done, &mut order, 0)?;
    }
    Ok(order)
}

/// Finds the compressed payload inside a bzImage and decompresses the first one that yields
/// an ELF file (what the kernel's extract-vmlinux script does).
fn extract_vmlinux(bz: &Path, out: &Path) -> Result<()> {
    let data = std::fs::read(bz)?;
    let candidates: [(&[u8], &[&str]); 4] = [
        (b"\xfd7zXZ\x00", &["xz", "-dc"]),
        (b"\x1f\x8b\x08", &["gzip", "-dc"]),
        (b"\x28\xb5\x2f\xfd", &["zstd", "-dc"]),
        (b"\x5d\x00\x00", &["xz", "--format=lzma", "-dc"]),
    ];
    for (magic, cmd) in candidates {
        let mut start = 0;
        while let Some(pos) = find(&data[start..], magic) {
            let at = start + pos;
            let mut child = Command::new(cmd[0])
                .args(&cmd[1..])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let mut stdin = child.stdin.take().unwrap();
            let payload = data[at..].to_vec();
            let feeder = std::thread::spawn(move || {
                use std::io::Write;
                let _ = stdin.write_all(&payload);
            });
            let o = child.wait_with_output()?;
            let _ = feeder.join();
            // Trailing garbage after the stream makes the tools exit non-zero; accept any
            // output that is an ELF image.
            if o.stdout.starts_with(b"\x7fELF") {
                std::fs::write(out, &o.stdout)?;
                return Ok(());
            }
            start = at + 1;
        }
    }
    bail!("no compressed ELF kernel found in {}", bz.display())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
