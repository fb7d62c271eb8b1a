//! `cargo xtask deb`: Debian packages built with `dpkg-deb` from the workspace's build.
//!
//! - `runv`: `/usr/bin/runv`, its man pages and completions, the guest kernel and initrd in
//!   `/usr/share/runv`, and a commented `/etc/runv/config.toml` (a conffile). It Provides
//!   `runv-abi-<0.y>`, the plugin ABI it loads (runv-api's `0.y`, see the runv-api crate docs).
//! - one package per plugin, its `.so` in `/usr/lib/runv`, which Pre-Depends on that
//!   `runv-abi-<0.y>`. Pre- rather than plain Depends because dpkg then refuses to unpack a
//!   plugin built for another ABI (with Depends it would unpack the file, where runv would find
//!   it and skip it with a warning, and only leave the package unconfigured).
//!
//! dpkg-deb rather than cargo-deb: nothing to install from crates.io, and one place (this file)
//! that says what goes where. Binaries are stripped as dh_strip does, library dependencies come
//! from dpkg-shlibdeps, files are root's with explicit modes (`--root-owner-group`).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{run_cmd, workspace_root};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// which build to package
    #[arg(long, default_value = "release", value_parser = ["release", "dev"])]
    profile: String,
    /// package what is built, without running cargo build first
    #[arg(long)]
    no_build: bool,
    /// where to write the .deb files (default: target/deb)
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// build only these packages (default: runv and every plugin package)
    #[arg(long, value_name = "a,b,...", value_delimiter = ',')]
    packages: Option<Vec<String>>,
    /// run lintian on the packages (fails on errors and warnings)
    #[arg(long)]
    lintian: bool,
    /// for tests: claim this plugin ABI (`0.y`) instead of runv-api's
    #[arg(long, hide = true, value_name = "0.y")]
    abi: Option<String>,
}

struct Plugin {
    package: &'static str,
    file: &'static str,
    depends: &'static str,
    recommends: &'static str,
    summary: &'static str,
    description: &'static str,
}

const PLUGINS: &[Plugin] = &[
    Plugin {
        package: "runv-driver-qemu",
        file: "librunv_driver_qemu.so",
        depends: "qemu-system-x86",
        recommends: "",
        summary: "QEMU hypervisor driver for runv",
        description: "Runs runv's container VMs under QEMU (a microvm booted through PVH), with KVM\n\
                      where the host has a usable one and TCG emulation otherwise.",
    },
    Plugin {
        package: "runv-driver-kvm-native",
        file: "librunv_driver_kvm_native.so",
        // A directory rootfs is shared by virtio-fs where virtiofsd is installed (Debian 13
        // packages it), else copied into an ext4 image (mkfs.ext4 -d).
        depends: "e2fsprogs",
        recommends: "virtiofsd",
        summary: "in-process KVM hypervisor driver for runv",
        description: "Runs runv's container VMs inside runv's monitor process on the rust-vmm\n\
                      crates, with no VMM process. It needs a usable KVM (vmx or svm and /dev/kvm).\n\
                      With virtiofsd, directories are shared into the VM by virtio-fs.",
    },
    Plugin {
        package: "runv-driver-kvmtool",
        file: "librunv_driver_kvmtool.so",
        // lkvm itself is not packaged by Debian 12; see the README.
        depends: "e2fsprogs",
        recommends: "",
        summary: "kvmtool hypervisor driver for runv",
        description: "Runs runv's container VMs with kvmtool (lkvm run). lkvm is not packaged by\n\
                      Debian: install it in PATH or name it with RUNV_KVMTOOL.",
    },
    Plugin {
        package: "runv-driver-xen",
        file: "librunv_driver_xen.so",
        depends: "",
        recommends: "xen-utils",
        summary: "Xen hypervisor driver for runv",
        description: "Runs runv's container VMs as Xen domains through the xl toolstack; it needs a\n\
                      host booted under the Xen hypervisor.",
    },
    Plugin {
        package: "runv-storage-overlay",
        file: "librunv_storage_overlay.so",
        depends: "",
        recommends: "",
        summary: "overlayfs storage driver for runv",
        description: "Gives each container an overlay over its bundle's rootfs (runv --storage\n\
                      overlay), so that the container's writes leave the bundle untouched.",
    },
    Plugin {
        package: "runv-storage-devmapper",
        file: "librunv_storage_devmapper.so",
        // mkfs.ext4 and losetup (mount) are what it runs (and blockdev, from the essential
        // util-linux). It drives device-mapper through ioctls, but where udev runs,
        // dmsetup's udev rules (95-dm-notify.rules) are what completes each udev sync.
        depends: "dmsetup, e2fsprogs, mount",
        recommends: "",
        summary: "device-mapper thin snapshot storage driver for runv",
        description: "Gives each container a thin snapshot of a per-image ext4 volume in a\n\
                      device-mapper thin pool, handed to the VM as a block device (runv --storage\n\
                      devmapper).",
    },
];

const GUEST_FILES: [&str; 4] = ["vmlinux", "vmlinuz", "initrd.img", "kernel.release"];

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = workspace_root()?;
    let out = match &args.out {
        Some(out) => out.clone(),
        None => root.join("target/deb"),
    };
    let mut wanted: Vec<&str> = std::iter::once("runv")
        .chain(PLUGINS.iter().map(|p| p.package))
        .collect();
    if let Some(only) = &args.packages {
        for name in only {
            if !wanted.contains(&name.as_str()) {
                bail!("no package named {name:?} (known: {})", wanted.join(", "));
            }
        }
        wanted.retain(|p| only.iter().any(|o| o == p));
    }
    if !args.no_build {
        run_cmd(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&root)
                .args([
                    "build",
                    "--workspace",
                    "--exclude",
                    "xtask",
                    "--profile",
                    &args.profile,
                ]),
        )?;
    }
    let built = root.join("target").join(if args.profile == "dev" {
        "debug"
    } else {
        "release"
    });
    let abi = match &args.abi {
        Some(abi) => abi.clone(),
        None => runv_api_abi(&root)?,
    };
    let ctx = Ctx {
        root: root.clone(),
        built,
        work: out.join("work"),
        version: env!("CARGO_PKG_VERSION").to_string(),
        arch: output(Command::new("dpkg").arg("--print-architecture"))?,
        abi,
        maintainer: maintainer(),
    };
    if ctx.work.exists() {
        fs::remove_dir_all(&ctx.work)
            .with_context(|| format!("clearing {}", ctx.work.display()))?;
    }
    let _work = WorkDir(ctx.work.clone());
    mkdir(&ctx.work.join("debian"))?;
    // dpkg-shlibdeps wants to run in a source tree: a debian/control naming the packages.
    write(
        &ctx.work.join("debian/control"),
        "Source: runv\n\nPackage: runv\nArchitecture: any\n",
        0o644,
    )?;

    let mut debs = Vec::new();
    for package in wanted {
        let deb = if package == "runv" {
            ctx.runv_package()?
        } else {
            let plugin = PLUGINS
                .iter()
                .find(|p| p.package == package)
                .context("a wanted package that is no plugin")?;
            ctx.plugin_package(plugin)?
        };
        fix_dir_modes(&deb)?;
        let dest = out.join(format!("{package}_{}_{}.deb", ctx.version, ctx.arch));
        run_cmd(
            Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Zgzip", "--build"])
                .arg(&deb)
                .arg(&dest)
                .stdout(std::process::Stdio::null()),
        )?;
        println!("{}", dest.display());
        debs.push(dest);
    }
    fs::remove_dir_all(&ctx.work).with_context(|| format!("removing {}", ctx.work.display()))?;
    if args.lintian {
        let mut cmd = Command::new("lintian");
        cmd.args(["--fail-on", "error,warning"]).args(&debs);
        run_cmd(&mut cmd).context("lintian (install it with scripts/setup.sh)")?;
    }
    Ok(())
}

/// Removes the packaging work tree on every way out, failures included.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Ctx {
    root: PathBuf,
    built: PathBuf,
    work: PathBuf,
    version: String,
    arch: String,
    abi: String,
    maintainer: String,
}

impl Ctx {
    fn runv_package(&self) -> anyhow::Result<PathBuf> {
        let pkg = self.work.join("debian/runv");
        let guest = self.root.join("target/guest");
        for f in GUEST_FILES {
            if !guest.join(f).is_file() {
                bail!(
                    "{} is missing: run `cargo xtask guest` first",
                    guest.join(f).display()
                );
            }
        }
        install_stripped(&self.built.join("runv"), &pkg.join("usr/bin/runv"), 0o755)?;
        for f in GUEST_FILES {
            install(&guest.join(f), &pkg.join("usr/share/runv").join(f), 0o644)?;
        }
        let man = pkg.join("usr/share/man/man1");
        let generated = self.work.join("generated");
        for page in crate::docs::man_pages(&generated.join("man"))? {
            let name = page.file_name().context("a man page without a name")?;
            install(&page, &man.join(name), 0o644)?;
            gzip(&man.join(name))?;
        }
        let completions = generated.join("completions");
        crate::docs::completions(&completions)?;
        for (file, dest) in [
            ("runv.bash", "usr/share/bash-completion/completions/runv"),
            ("_runv", "usr/share/zsh/vendor-completions/_runv"),
            ("runv.fish", "usr/share/fish/vendor_completions.d/runv.fish"),
        ] {
            install(&completions.join(file), &pkg.join(dest), 0o644)?;
        }
        fs::remove_dir_all(&generated)
            .with_context(|| format!("removing {}", generated.display()))?;
        let deb = self.root.join("xtask/deb");
        install(
            &deb.join("config.toml"),
            &pkg.join("etc/runv/config.toml"),
            0o644,
        )?;
        let copyright = read(&deb.join("copyright"))? + &read(&deb.join("copyright-guest"))?;
        self.doc_files(&pkg, "runv", &copyright)?;
        write(
            &pkg.join("usr/share/lintian/overrides/runv"),
            // The guest kernel is what the VMs boot, not code for this host, and runv looks
            // for it in PREFIX/share/runv (as the issue and the README's layout say).
            "runv: arch-dependent-file-in-usr-share [usr/share/runv/vmlinux]\n\
             runv: statically-linked-binary [usr/share/runv/vmlinux]\n",
            0o644,
        )?;
        let hypervisors: Vec<&str> = PLUGINS
            .iter()
            .filter(|p| p.package.starts_with("runv-driver-"))
            .map(|p| p.package)
            .collect();
        let control = self.control(
            &pkg,
            "runv",
            &[
                ("Depends", self.shlibs(&[&pkg.join("usr/bin/runv")])?),
                // tc and ip connect the VM to the container's network namespace.
                (
                    "Recommends",
                    format!("iproute2, {}", hypervisors.join(" | ")),
                ),
                ("Provides", format!("runv-abi-{}", self.abi)),
            ],
            "OCI runtime that runs every container in its own lightweight VM",
            "runv is an OCI runtime, command-line compatible with runc, that runs every\n\
             container inside its own virtual machine, for docker, containerd and podman.\n\
             .\n\
             Hypervisor and storage drivers are plugins in separate packages\n\
             (runv-driver-*, runv-storage-*); install at least one hypervisor driver.",
        )?;
        write(&pkg.join("DEBIAN/control"), &control, 0o644)?;
        write(
            &pkg.join("DEBIAN/conffiles"),
            "/etc/runv/config.toml\n",
            0o644,
        )?;
        Ok(pkg)
    }

    fn plugin_package(&self, plugin: &Plugin) -> anyhow::Result<PathBuf> {
        let pkg = self.work.join("debian").join(plugin.package);
        let so = pkg.join("usr/lib/runv").join(plugin.file);
        install_stripped(&self.built.join(plugin.file), &so, 0o644)?;
        let copyright = read(&self.root.join("xtask/deb/copyright"))?;
        self.doc_files(&pkg, plugin.package, &copyright)?;
        let mut depends = self.shlibs(&[&so])?;
        if !plugin.depends.is_empty() {
            depends = format!("{depends}, {}", plugin.depends);
        }
        let mut fields = vec![
            ("Pre-Depends", format!("runv-abi-{}", self.abi)),
            ("Depends", depends),
        ];
        if !plugin.recommends.is_empty() {
            fields.push(("Recommends", plugin.recommends.to_string()));
        }
        let control = self.control(
            &pkg,
            plugin.package,
            &fields,
            plugin.summary,
            &format!(
                "{}\n.\nA plugin for runv, an OCI runtime that runs every container in its own\n\
                 lightweight VM; it is loaded from /usr/lib/runv.",
                plugin.description
            ),
        )?;
        write(&pkg.join("DEBIAN/control"), &control, 0o644)?;
        Ok(pkg)
    }

    fn control(
        &self,
        pkg: &Path,
        name: &str,
        fields: &[(&str, String)],
        summary: &str,
        description: &str,
    ) -> anyhow::Result<String> {
        let mut text = format!(
            "Package: {name}\nSource: runv\nVersion: {}\nArchitecture: {}\nMaintainer: {}\n\
             Installed-Size: {}\nSection: admin\nPriority: optional\n\
             Homepage: https://github.com/runv-rs/runv\n",
            self.version,
            self.arch,
            self.maintainer,
            installed_size_kib(pkg)?,
        );
        for (field, value) in fields {
            text.push_str(&format!("{field}: {value}\n"));
        }
        text.push_str(&format!("Description: {summary}\n"));
        for line in description.lines() {
            text.push_str(&format!(" {}\n", line.trim()));
        }
        Ok(text)
    }

    /// copyright and a changelog (native packages carry `changelog.gz`).
    fn doc_files(&self, pkg: &Path, name: &str, copyright: &str) -> anyhow::Result<()> {
        let doc = pkg.join("usr/share/doc").join(name);
        write(&doc.join("copyright"), copyright, 0o644)?;
        let date = output(Command::new("date").arg("-R"))?;
        let changelog = format!(
            "runv ({}) unstable; urgency=medium\n\n  * Built from the runv workspace by \
             `cargo xtask deb`.\n\n -- {}  {date}\n",
            self.version, self.maintainer
        );
        write(&doc.join("changelog"), &changelog, 0o644)?;
        gzip(&doc.join("changelog"))
    }

    /// `Depends` for the libraries that `files` link (dpkg-shlibdeps).
    fn shlibs(&self, files: &[&Path]) -> anyhow::Result<String> {
        let mut cmd = Command::new("dpkg-shlibdeps");
        cmd.current_dir(&self.work).arg("-O");
        for f in files {
            cmd.arg(f);
        }
        let out = output(&mut cmd)?;
        Ok(out
            .split_once("Depends=")
            .map(|(_, deps)| deps.trim().to_string())
            .unwrap_or_default())
    }
}

/// runv-api's ABI as `0.y` (its major while the version is 0.y.z), or `x` from 1.0 on.
fn runv_api_abi(root: &Path) -> anyhow::Result<String> {
    let meta = output(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ]),
    )?;
    let meta: serde_json::Value = serde_json::from_str(&meta).context("cargo metadata")?;
    let version = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "runv-api"))
        .and_then(|p| p["version"].as_str())
        .context("runv-api not found in cargo metadata")?;
    Ok(abi_of(version))
}

fn abi_of(version: &str) -> String {
    let mut parts = version.split('.');
    match (parts.next(), parts.next()) {
        (Some("0"), Some(minor)) => format!("0.{minor}"),
        (Some(major), _) => major.to_string(),
        _ => version.to_string(),
    }
}

fn maintainer() -> String {
    match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(email)) if !name.is_empty() && !email.is_empty() => {
            format!("{name} <{email}>")
        }
        _ => "runv developers <runv@runv-rs.github.io>".to_string(),
    }
}

fn mkdir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Every directory of a package is 0755 whatever the umask.
fn fix_dir_modes(dir: &Path) -> anyhow::Result<()> {
    let context = || format!("setting the modes under {}", dir.display());
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).with_context(context)?;
    for entry in fs::read_dir(dir).with_context(context)? {
        let entry = entry.with_context(context)?;
        if entry.file_type().with_context(context)?.is_dir() {
            fix_dir_modes(&entry.path())?;
        }
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    mkdir(path.parent().context("a file without a directory")?)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn install(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    mkdir(dest.parent().context("a file without a directory")?)?;
    fs::copy(src, dest)
        .with_context(|| format!("copying {} to {}", src.display(), dest.display()))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Installs a binary stripped as dh_strip does (shared objects keep their dynamic symbols,
/// which is how runv finds a plugin's root module).
fn install_stripped(src: &Path, dest: &Path, mode: u32) -> anyhow::Result<()> {
    install(src, dest, mode)?;
    let mut cmd = Command::new("strip");
    cmd.args(["--remove-section=.comment", "--remove-section=.note"]);
    if dest.extension().is_some_and(|e| e == "so") {
        cmd.arg("--strip-unneeded");
    }
    run_cmd(cmd.arg(dest))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn gzip(path: &Path) -> anyhow::Result<()> {
    // -n: no name or time stamp in the header (reproducible, and lintian asks for it).
    run_cmd(Command::new("gzip").args(["-9nf"]).arg(path))
}

fn installed_size_kib(pkg: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut stack = vec![pkg.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let context = || format!("measuring {}", dir.display());
        for entry in fs::read_dir(&dir).with_context(context)? {
            let entry = entry.with_context(context)?;
            if entry.file_name() == "DEBIAN" {
                continue;
            }
            let meta = entry.metadata().with_context(context)?;
            if meta.is_dir() {
                total += 1;
                stack.push(entry.path());
            } else {
                total += meta.len().div_ceil(1024);
            }
        }
    }
    Ok(total)
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_is_the_major_of_runv_api() {
        assert_eq!(abi_of("0.1.0"), "0.1");
        assert_eq!(abi_of("0.12.3"), "0.12");
        assert_eq!(abi_of("2.0.1"), "2");
    }
}
