//! Starting a container's VM from a template (the monitor's side of `--template`).

use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use runv_api::{Capabilities, HypervisorClient, VmClient, VmConfig};
use runv_proto::client::AgentClient;
use runv_proto::{MacChange, Request};

use super::build::{self, WANTED};
use super::{Meta, Mode, Store, template_mac};
use crate::monitor::MonitorConfig;
use crate::state::write_private;

/// How the VM came up.
pub enum Start {
    /// Restored from a template, made unique, its agent connected.
    Restored {
        vm: VmClient,
        client: AgentClient,
        meta: Box<Meta>,
    },
    /// Boot as usual.
    Cold,
}

/// Restores the VM from a template when the mode and the shape allow it. Under `auto`, a
/// missing template is asked for (see [`build::spawn_wanted`]) and a failed restore falls back
/// to a cold start with a warning; a template named with `--template NAME` must fit and work.
pub fn start(
    config: &MonitorConfig,
    driver: &HypervisorClient,
    vm_config: &VmConfig,
    container_dir: &Path,
) -> anyhow::Result<Start> {
    if config.template == Mode::Off {
        return Ok(Start::Cold);
    }
    let named = match &config.template {
        Mode::Named(name) => Some(name.as_str()),
        _ => None,
    };
    if let Some(why) = why_not(&config.driver, driver.info().capabilities, vm_config) {
        if let Some(name) = named {
            bail!("template {name} cannot be used: {why}");
        }
        tracing::debug!("no template: {why}");
        return Ok(Start::Cold);
    }
    let request = build::Request {
        store: config.template_dir.clone(),
        driver_dirs: config.driver_dirs.clone(),
        driver: config.driver.clone(),
        name: None,
        kernel: vm_config.kernel.clone(),
        initrd: vm_config.initrd.clone().unwrap_or_default(),
        kernel_params: vm_config.kernel_params.clone(),
        vcpus: vm_config.vcpus,
        memory_mib: vm_config.memory_mib,
        shares: vm_config
            .shared_dirs
            .iter()
            .map(|s| s.tag.clone())
            .collect(),
        nics: vm_config.network_interfaces.len(),
        disks: vm_config
            .block_devices
            .iter()
            .map(|d| d.id.clone())
            .collect(),
        parameters: vm_config.parameters.clone(),
        agent_timeout_secs: config.agent_timeout_secs,
    };
    // Under `auto` a store that cannot be opened or a file that cannot be hashed costs the
    // template, not the container: it boots (and fails there if the kernel is unreadable).
    let opened = Store::open(&config.template_dir)
        .and_then(|store| Ok((request.shape(&store, driver)?.key(), store)));
    let (key, store) = match opened {
        Ok(found) => found,
        Err(e) if named.is_none() => {
            // A store this user may not write (runv as non-root, a read-only /var) is how
            // `auto`, the default, meets such hosts: not worth a warning on every start.
            if not_permitted(&e) {
                tracing::debug!("templates: {e:#}; booting instead");
            } else {
                tracing::warn!("templates: {e:#}; booting instead");
            }
            return Ok(Start::Cold);
        }
        Err(e) => return Err(e),
    };
    let meta = match named {
        Some(name) => {
            let meta = store
                .find(name)?
                .with_context(|| format!("template {name} does not exist"))?;
            if meta.key != key {
                bail!(
                    "template {name} does not fit this container: it was made for another \
                     VM size, device set, kernel, initrd or runv/driver version (its key is {}, \
                     this container needs {key}); make one with `runv template create`",
                    meta.key
                );
            }
            meta
        }
        None => match store.get(&key) {
            Some(meta) => meta,
            None => {
                tracing::debug!("no template {key} yet: cold start, one is built afterwards");
                write_private(&container_dir.join(WANTED), &serde_json::to_vec(&request)?)?;
                return Ok(Start::Cold);
            }
        },
    };
    match restore(&store, driver, vm_config, &request, &meta) {
        Ok((vm, client)) => Ok(Start::Restored {
            vm,
            client,
            meta: Box::new(meta),
        }),
        Err(e) if named.is_none() => {
            tracing::warn!("restoring template {key} failed, booting instead: {e:#}");
            Ok(Start::Cold)
        }
        Err(e) => Err(e.context(format!("restoring template {}", meta.key))),
    }
}

fn not_permitted(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            io.kind() == std::io::ErrorKind::PermissionDenied
                || io.raw_os_error() == Some(nix::libc::EROFS)
        })
}

/// Why a VM of this shape cannot come from a template of `driver`, if it cannot.
fn why_not(driver: &str, caps: Capabilities, vm_config: &VmConfig) -> Option<String> {
    if !caps.contains(Capabilities::SNAPSHOT) {
        Some(format!("driver {driver} cannot restore VMs"))
    } else if !vm_config.block_devices.is_empty() && !caps.contains(Capabilities::TEMPLATE_DISKS) {
        Some(format!(
            "driver {driver} cannot give a clone its own disks, so a block-device rootfs is not \
             templated"
        ))
    } else if !vm_config.shared_dirs.is_empty() && caps.contains(Capabilities::NO_TEMPLATE_SHARES) {
        Some(format!(
            "driver {driver} cannot give a clone shared directories (it boots with them instead \
             of copying the rootfs into an image)"
        ))
    } else {
        None
    }
}

fn restore(
    store: &Store,
    driver: &HypervisorClient,
    vm_config: &VmConfig,
    request: &build::Request,
    meta: &Meta,
) -> anyhow::Result<(VmClient, AgentClient)> {
    let mut clone = vm_config.clone();
    clone.kernel_params = request.template_kernel_params();
    let vm = {
        // Held while qemu maps the RAM file and reads the state: `rm` waits for it.
        let _lock = store.lock_shared(&meta.key)?;
        if store.get(&meta.key).is_none() {
            bail!("template {} was removed", meta.key);
        }
        driver
            .restore_vm(&clone, &store.path(&meta.key))
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    tracing::debug!(
        phase = "vm-restored",
        "VM restored from template {}",
        meta.key
    );
    let result = (|| -> anyhow::Result<AgentClient> {
        let channel = vm
            .take_agent_channel()
            .map_err(|e| anyhow::anyhow!("agent channel: {e}"))?;
        let client =
            AgentClient::connect_restored(channel, Duration::from_secs(request.agent_timeout_secs))
                .map_err(|e| anyhow::anyhow!("restored agent: {e}"))?;
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut entropy))
            .context("reading host entropy for the clone")?;
        let unix_time_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let macs = vm_config
            .network_interfaces
            .iter()
            .enumerate()
            .map(|(i, nic)| MacChange {
                template: template_mac(i),
                clone: nic.mac.clone(),
            })
            .filter(|m| !m.clone.is_empty())
            .collect();
        client
            .request(
                Request::Restored {
                    entropy: runv_proto::Secret(entropy),
                    unix_time_ns,
                    macs,
                },
                Duration::from_secs(30),
            )
            .map_err(|e| anyhow::anyhow!("making the clone unique: {e}"))?;
        tracing::debug!(
            phase = "clone-unique",
            "the clone reseeded, set its clock and MACs"
        );
        Ok(client)
    })();
    match result {
        Ok(client) => Ok((vm, client)),
        Err(e) => {
            let _ = vm.stop(Duration::ZERO);
            let _ = vm.wait();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runv_api::{BlockDevice, SharedDir};

    #[test]
    fn which_shapes_a_driver_can_clone() {
        use Capabilities as C;
        let share = VmConfig {
            shared_dirs: vec![SharedDir::default()],
            ..VmConfig::default()
        };
        let disk = VmConfig {
            block_devices: vec![BlockDevice::default()],
            ..VmConfig::default()
        };
        let qemu = C::SNAPSHOT | C::SHARED_DIR_ROOTFS | C::TEMPLATE_DISKS;
        let kvm_native = C::SNAPSHOT | C::SHARED_DIR_ROOTFS | C::NO_TEMPLATE_SHARES;
        assert_eq!(why_not("qemu", qemu, &share), None);
        assert_eq!(why_not("qemu", qemu, &disk), None);
        // kvm-native with virtiofsd: its shares win, the VM boots.
        let why = why_not("kvm-native", kvm_native, &share).unwrap();
        assert!(why.contains("shared directories"), "{why}");
        assert!(
            why_not("kvm-native", kvm_native, &disk)
                .unwrap()
                .contains("disks")
        );
        let kvm_native_image = C::SNAPSHOT | C::TEMPLATE_DISKS | C::NO_TEMPLATE_SHARES;
        assert_eq!(why_not("kvm-native", kvm_native_image, &disk), None);
        assert!(why_not("kvmtool", C::SHARED_DIR_ROOTFS, &share).is_some());
    }

    #[test]
    fn a_store_runv_may_not_write_is_no_warning() {
        let denied = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            .context("creating /var/lib/runv/templates");
        assert!(not_permitted(&denied));
        let read_only = anyhow::Error::new(std::io::Error::from_raw_os_error(nix::libc::EROFS));
        assert!(not_permitted(&read_only));
        let other = anyhow::Error::new(std::io::Error::from_raw_os_error(nix::libc::ENOSPC));
        assert!(!not_permitted(&other));
    }
}
