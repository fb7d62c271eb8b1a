//! Making a template: boot a VM of the wanted shape with its RAM in a shared file, wait for
//! the agent, save the device state, end the VM, and move the finished directory into place.
//! Also the background build that `--template auto` starts after a cold start.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use runv_api::{BlockDevice, Capabilities, HypervisorClient, NetInterface, SharedDir, VmConfig};
use runv_proto::client::AgentClient;
use serde::{Deserialize, Serialize};

use super::{KERNEL_PARAM, Meta, Shape, Store, template_mac};
use crate::plugins::{self, Registry};
use crate::state::{FILE_MODE, private_dir, write_private};

/// What a template is made of: the shape's inputs, and where to find the driver and store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub store: PathBuf,
    pub driver_dirs: Vec<PathBuf>,
    pub driver: String,
    #[serde(default)]
    pub name: Option<String>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The container's kernel parameters; [`KERNEL_PARAM`] is added to them.
    pub kernel_params: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub shares: Vec<String>,
    pub nics: usize,
    /// The disks' ids (see [`Shape::disks`]).
    #[serde(default)]
    pub disks: Vec<String>,
    pub parameters: BTreeMap<String, String>,
    pub agent_timeout_secs: u64,
}

/// The file in a container's state dir through which the monitor asks `create` to start a
/// background build (`create` runs in the caller's namespaces and cgroup, the monitor in the
/// container's).
pub const WANTED: &str = "template-wanted.json";

impl Request {
    /// The kernel parameters of the template and its clones.
    pub fn template_kernel_params(&self) -> String {
        let base = self.kernel_params.trim();
        if base.is_empty() {
            KERNEL_PARAM.to_string()
        } else {
            format!("{base} {KERNEL_PARAM}")
        }
    }

    pub fn shape(&self, store: &Store, driver: &HypervisorClient) -> anyhow::Result<Shape> {
        let info = driver.info();
        Ok(Shape {
            driver: info.name.to_string(),
            driver_version: info.version.to_string(),
            runv_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_sha256: store.content_hash(&self.kernel)?,
            initrd_sha256: store.content_hash(&self.initrd)?,
            kernel_params: self.template_kernel_params(),
            vcpus: self.vcpus.max(1),
            memory_mib: self.memory_mib,
            shares: self.shares.clone(),
            nics: self.nics,
            disks: self.disks.clone(),
            parameters: self.parameters.clone(),
        })
    }
}

/// Removes a half-built template directory unless disarmed.
struct TmpDir(Option<PathBuf>);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Builds the template for `request` unless it exists. With `wait` false, returns `None` when
/// another process holds the key's lock (it is building or removing that template).
pub fn build(request: &Request, wait: bool) -> anyhow::Result<Option<Meta>> {
    let store = Store::open(&request.store)?;
    let registry = Registry::load(plugins::search_dirs(&request.driver_dirs));
    let hypervisor = registry.choose_hypervisor(Some(&request.driver))?;
    let driver = &hypervisor.client;
    let caps = driver.info().capabilities;
    if !caps.contains(Capabilities::SNAPSHOT) {
        bail!(
            "driver {} cannot save VMs (no snapshot capability), so it has no templates",
            request.driver
        );
    }
    if !request.disks.is_empty() && !caps.contains(Capabilities::TEMPLATE_DISKS) {
        bail!(
            "driver {} cannot give a clone its own disks (no template-disks capability), so \
             containers with a block rootfs have no templates",
            request.driver
        );
    }
    let shape = request.shape(&store, driver)?;
    let key = shape.key();
    let _lock = if wait {
        store.lock_exclusive(&key)?
    } else {
        match store.try_lock_exclusive(&key)? {
            Some(lock) => lock,
            None => return Ok(None),
        }
    };
    if let Some(mut meta) = store.get(&key) {
        if request.name.is_some() && request.name != meta.name {
            meta.name = request.name.clone();
            write_private(
                &store.path(&key).join(super::META),
                &serde_json::to_vec_pretty(&meta)?,
            )?;
        }
        return Ok(Some(meta));
    }
    remove_leftovers(&store, &key)?;
    if let Some(name) = &request.name {
        if let Some(other) = store.find(name)? {
            bail!(
                "a template named {name} exists for another shape ({}); remove it first",
                other.key
            );
        }
    }

    let tmp = store
        .dir()
        .join(format!(".tmp-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    private_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut guard = TmpDir(Some(tmp.clone()));
    // The template's shares: an empty directory each (never mounted by the template's agent:
    // 9p migrates no open files, and a clone's shares are its own directories).
    let empty = tmp.join("empty");
    private_dir(&empty).with_context(|| format!("creating {}", empty.display()))?;
    let config = VmConfig {
        version: runv_api::VM_CONFIG_VERSION,
        name: format!("runv-template-{key}"),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        kernel: request.kernel.clone(),
        initrd: Some(request.initrd.clone()),
        kernel_params: shape.kernel_params.clone(),
        shared_dirs: shape
            .shares
            .iter()
            .map(|tag| SharedDir {
                tag: tag.clone(),
                host_path: empty.clone(),
                readonly: true,
            })
            .collect(),
        // Empty disk slots: each clone puts its own disks there.
        block_devices: shape
            .disks
            .iter()
            .map(|id| BlockDevice {
                id: id.clone(),
                host_path: PathBuf::new(),
                readonly: false,
            })
            .collect(),
        network_interfaces: (0..shape.nics)
            .map(|i| NetInterface {
                tap: String::new(),
                mac: template_mac(i),
                mtu: 0,
            })
            .collect(),
        state_dir: tmp.clone(),
        console_log: tmp.join("console.log"),
        log_file: Some(tmp.join("hypervisor.log")),
        parameters: request.parameters.clone(),
        memory_file: Some(tmp.join(runv_api::TEMPLATE_MEMORY_FILE)),
        ..VmConfig::default()
    };
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let started = driver.start_vm(&config);
    nix::sys::stat::umask(old_umask);
    let vm = started.map_err(|e| anyhow::anyhow!("starting the template VM: {e}"))?;
    let result = (|| -> anyhow::Result<()> {
        let channel = vm
            .take_agent_channel()
            .map_err(|e| anyhow::anyhow!("agent channel: {e}"))?;
        // The agent greets once it has loaded its modules (runv.template=1 loads them all).
        let client = AgentClient::connect(channel, Duration::from_secs(request.agent_timeout_secs))
            .map_err(|e| {
                anyhow::anyhow!(
                    "template VM: {e} (console: {})",
                    config.console_log.display()
                )
            })?;
        client
            .request(runv_proto::Request::Ping, Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("template VM: {e}"))?;
        vm.save(&tmp)
            .map_err(|e| anyhow::anyhow!("saving the template VM: {e}"))?;
        Ok(())
    })();
    // Paused after the save (or broken): end it; its RAM file does not change any more.
    let _ = vm.stop(Duration::ZERO);
    let _ = vm.wait();
    result?;

    for leftover in ["agent.sock", "qmp.sock"] {
        let _ = fs::remove_file(tmp.join(leftover));
    }
    let _ = fs::remove_dir(&empty);
    for file in [
        runv_api::TEMPLATE_MEMORY_FILE,
        runv_api::TEMPLATE_STATE_FILE,
    ] {
        let path = tmp.join(file);
        fs::set_permissions(&path, fs::Permissions::from_mode(FILE_MODE))
            .with_context(|| format!("template file {}", path.display()))?;
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", path.display()))?;
    }
    let meta = Meta {
        key: key.clone(),
        name: request.name.clone(),
        shape,
        kernel: request.kernel.clone(),
        initrd: request.initrd.clone(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    write_private(&tmp.join(super::META), &serde_json::to_vec_pretty(&meta)?)?;
    let dest = store.path(&key);
    fs::rename(&tmp, &dest)
        .with_context(|| format!("moving the template into {}", dest.display()))?;
    guard.0 = None;
    drop(_lock);
    remove_superseded(&store, &meta);
    Ok(Some(meta))
}

/// Removes what is left of `key` but no complete template: the directories of builds that
/// died (`.tmp-<key>-<pid>`), of removals that died (`.trash-<key>-<pid>`), and a damaged
/// `<key>/` (its `template.json` or a file missing or unreadable), which would otherwise make
/// every later build of `key` fail at the rename. Called under the key's exclusive lock, so no
/// build or restore of it is under way; running clones keep their unlinked RAM file.
fn remove_leftovers(store: &Store, key: &str) -> anyhow::Result<()> {
    let (tmp, trash) = (format!(".tmp-{key}-"), format!(".trash-{key}-"));
    let dir = store.dir();
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == key || name.starts_with(&tmp) || name.starts_with(&trash) {
            let path = entry.path();
            tracing::debug!("removing the template leftover {}", path.display());
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Removes the unnamed templates that `meta` replaces: made from the same kernel and initrd
/// paths for the same shape, with other file contents or versions. They can never be restored
/// again (the files at those paths changed), so they would only take disk space. Named ones
/// are the user's to remove. Best effort: a template in use is removed once its restores end;
/// running clones are not affected.
fn remove_superseded(store: &Store, meta: &Meta) {
    let same_shape = |other: &Shape| {
        let mut other = other.clone();
        other.kernel_sha256.clone_from(&meta.shape.kernel_sha256);
        other.initrd_sha256.clone_from(&meta.shape.initrd_sha256);
        other.driver_version.clone_from(&meta.shape.driver_version);
        other.runv_version.clone_from(&meta.shape.runv_version);
        other == meta.shape
    };
    let Ok(all) = store.list() else {
        return;
    };
    for old in all {
        if old.key != meta.key
            && old.name.is_none()
            && old.kernel == meta.kernel
            && old.initrd == meta.initrd
            && same_shape(&old.shape)
        {
            if let Err(e) = store.remove(&old.key) {
                tracing::warn!("removing superseded template {}: {e:#}", old.key);
            }
        }
    }
}

/// After a cold start under `--template auto`, `create` starts the template build the monitor
/// asked for, detached and at the lowest CPU priority, and does not wait for it.
pub fn spawn_wanted(container_dir: &Path) {
    let path = container_dir.join(WANTED);
    let Ok(json) = fs::read_to_string(&path) else {
        return;
    };
    let _ = fs::remove_file(&path);
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("__template-build")
        .arg(json)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (setsid, nice) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            nix::libc::nice(19);
            Ok(())
        });
    }
    match cmd.spawn() {
        Ok(child) => tracing::debug!("building a template in the background (pid {})", child.id()),
        Err(e) => tracing::warn!("starting a background template build: {e}"),
    }
}

/// `runv __template-build JSON`: the background build. Its failures go to
/// `<store>/build-errors.log` (one line each), since nobody waits for it.
pub fn background_main(json: &str) -> ExitCode {
    let request: Request = match serde_json::from_str(json) {
        Ok(r) => r,
        Err(_) => return ExitCode::from(2),
    };
    match build(&request, false) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let log = request.store.join("build-errors.log");
            if let Ok(mut f) = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(FILE_MODE)
                .open(&log)
            {
                let _ = writeln!(
                    f,
                    "{} {}: {e:#}",
                    crate::logging::rfc3339_now(),
                    request.driver
                );
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftovers_of_one_key_are_removed_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("runv-tpl-left-{}", std::process::id()));
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let _remove = Remove(dir.clone());
        let store = Store::open(&dir).unwrap();
        let (gone, kept) = (
            ["k", ".tmp-k-1", ".trash-k-2"],
            ["kk", "other", ".tmp-other-3", ".tmp-kk-4", ".locks"],
        );
        for d in gone.iter().chain(&kept) {
            fs::create_dir_all(dir.join(d).join("sub")).unwrap();
        }
        // A damaged template: its state file is there, template.json is not.
        fs::write(dir.join("k").join(runv_api::TEMPLATE_STATE_FILE), b"x").unwrap();
        assert!(store.get("k").is_none());
        remove_leftovers(&store, "k").unwrap();
        for d in gone {
            assert!(!dir.join(d).exists(), "{d} left");
        }
        for d in kept {
            assert!(dir.join(d).exists(), "{d} removed");
        }
    }
}
