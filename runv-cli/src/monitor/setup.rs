//! How a monitor brings its container up, phase by phase: the container's host context
//! (network namespace, cgroup), storage, fitting the rootfs to the driver, the VM's config,
//! the runtime hooks and network, the VM's start (cold or from a template), the agent, and the
//! container created in the guest. Each phase records in `Cleanup` what a later failure must
//! undo.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use runv_api::{HypervisorClient, PreparedRootfs, RootfsSource, SharedDir, VmClient, VmConfig};
use runv_proto::client::AgentClient;
use runv_proto::{Request, ResponseBody, Rootfs};

use super::Monitor;
use super::{
    Cleanup, MonitorConfig, REQUEST_TIMEOUT, ROOTFS_IMAGE, ROOTFS_TAG, STORAGE_REQUEST, agent_call,
    config, container_stdio, logs, pod_host, rootfs_image, stdio, storage_request, volumes,
};
use crate::bundle::Bundle;
use crate::hooks::{self, Point};
use crate::network::{Netns, VmNetwork};
use crate::plugins::{Loaded, Registry};
use crate::state::{Status, Store};

pub(super) fn setup(
    config: &MonitorConfig,
    dir: &Path,
    registry: &Registry,
    cleanup: &mut Cleanup,
) -> anyhow::Result<Monitor> {
    tracing::debug!(phase = "monitor-up", "monitor started for {}", config.id);
    let store = Store::new(Some(&config.root));
    let mut bundle = Bundle::load(&config.bundle)?;
    let netns = enter_host_context(config, &bundle)?;
    let hypervisor = registry.choose_hypervisor(Some(&config.driver))?;
    let prepared = prepare_storage(config, dir, registry, &bundle, cleanup)?;
    let driver_caps = usable_capabilities(config, hypervisor.client.info().capabilities);
    let prepared = fit_rootfs(config, dir, driver_caps, prepared)?;
    tracing::debug!(phase = "rootfs-ready", "rootfs ready");
    let (mut vm_config, rootfs) = vm_config(config, dir, &prepared)?;
    share_volumes(
        config,
        dir,
        driver_caps,
        &mut bundle,
        &mut vm_config,
        cleanup,
    )?;
    run_runtime_hooks(config, &store, &bundle)?;
    let network = crate::network::prepare(&netns)?;
    let network_links = crate::network::links_of(&network);
    cleanup.network_links = network_links.clone();
    vm_config.network_interfaces = network.nics.clone();
    let (vm, restored) = start_vm(config, dir, hypervisor, &vm_config)?;
    cleanup.vm = Some(vm.clone());
    let client = connect_agent(config, &vm, &vm_config, restored, network)?;
    let relay = create_container(config, &client, &bundle, rootfs)?;
    record_created(config, &store, &bundle, &vm, &prepared)?;
    // From here on, the monitor stops the VM and `delete` cleans the storage up.
    cleanup.storage = None;
    cleanup.vm = None;
    cleanup.network_links.clear();
    Ok(Monitor {
        id: config.id.clone(),
        dir: dir.to_path_buf(),
        store,
        spec: bundle.spec,
        vm,
        client,
        execs: Mutex::new(HashMap::new()),
        relay: Mutex::new(Some(relay)),
        network_links,
        pod: (config.pod == config::PodConfig::Sandbox).then(pod_host::Pod::default),
    })
}

/// Joins the container's network namespace and host cgroup: the namespace before any thread
/// starts (engines look at /proc/<our pid>/ns/net), the cgroup before the VMM starts (so that
/// it is born in it).
fn enter_host_context(config: &MonitorConfig, bundle: &Bundle) -> anyhow::Result<Netns> {
    let netns = Netns::from_spec(&bundle.spec);
    crate::network::enter(&netns)?;
    crate::host_cgroup::join(
        &bundle.spec,
        &config.id,
        config.systemd_cgroup,
        config.memory_mib,
    )?;
    Ok(netns)
}

/// The rootfs from the storage driver, or the bundle's directory as it is.
fn prepare_storage(
    config: &MonitorConfig,
    dir: &Path,
    registry: &Registry,
    bundle: &Bundle,
    cleanup: &mut Cleanup,
) -> anyhow::Result<PreparedRootfs> {
    let Some(name) = &config.storage else {
        return Ok(PreparedRootfs {
            source: RootfsSource::SharedDir {
                path: bundle.rootfs.clone(),
            },
            readonly: bundle.rootfs_readonly,
        });
    };
    let storage = registry
        .choose_storage(Some(name))?
        .context("storage driver vanished")?;
    let request = storage_request(&config.id, dir, bundle);
    if let Err(e) = crate::state::private_dir(&request.state_dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(e).with_context(|| format!("creating {}", request.state_dir.display()));
        }
    }
    crate::state::write_private(&dir.join(STORAGE_REQUEST), &serde_json::to_vec(&request)?)?;
    let prepared = storage
        .client
        .prepare(&request)
        .map_err(|e| anyhow::anyhow!("storage driver {name}: preparing the rootfs: {e}"));
    cleanup.storage = Some((name.clone(), request));
    prepared
}

/// What the driver can do for this container: with a named template, what its clones can do
/// (that template was made for them). Under `auto` a driver whose clones cannot share
/// directories keeps its shares and boots cold (see `templates::clone::start`): the
/// container's writes reaching its bundle, as under runc, weigh more than a faster start.
fn usable_capabilities(
    config: &MonitorConfig,
    caps: runv_api::Capabilities,
) -> runv_api::Capabilities {
    match config.template {
        crate::templates::Mode::Named(_) => crate::templates::clone_capabilities(caps),
        crate::templates::Mode::Off | crate::templates::Mode::Auto => caps,
    }
}

/// A directory for a driver that cannot share directories becomes an ext4 image.
fn fit_rootfs(
    config: &MonitorConfig,
    dir: &Path,
    driver_caps: runv_api::Capabilities,
    prepared: PreparedRootfs,
) -> anyhow::Result<PreparedRootfs> {
    Ok(
        match rootfs_image::fit(&config.driver, driver_caps, prepared)? {
            Ok(prepared) => prepared,
            Err(PreparedRootfs {
                source: RootfsSource::SharedDir { path },
                readonly,
            }) => {
                tracing::debug!(
                    "driver {} cannot share directories: copying {} into an ext4 image",
                    config.driver,
                    path.display()
                );
                rootfs_image::build(&path, &dir.join(ROOTFS_IMAGE), readonly)?
            }
            Err(other) => other,
        },
    )
}

/// The VM's config with the rootfs device, and where the agent finds the rootfs.
fn vm_config(
    config: &MonitorConfig,
    dir: &Path,
    prepared: &PreparedRootfs,
) -> anyhow::Result<(VmConfig, runv_proto::RootfsSource)> {
    let vm_dir = dir.join("vm");
    crate::state::private_dir(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    // The VMM binds its sockets there: go through a short alias when the path is too long
    // (the fd stays open for the monitor's life; the VMM reaches it via /proc/<pid>/fd).
    let (vm_sock, vm_dir_fd) = crate::control::short_socket_path(&vm_dir, "agent.sock")?;
    let vm_dir = vm_sock.parent().map(Path::to_path_buf).unwrap_or(vm_dir);
    std::mem::forget(vm_dir_fd);
    let mut vm_config = VmConfig {
        version: runv_api::VM_CONFIG_VERSION,
        name: config.id.clone(),
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        kernel: config.kernel.clone(),
        initrd: Some(config.initrd.clone()),
        kernel_params: config.kernel_params.clone(),
        state_dir: vm_dir,
        console_log: dir.join("console.log"),
        log_file: Some(dir.join("hypervisor.log")),
        parameters: config.parameters.clone(),
        ..VmConfig::default()
    };
    // As runc: the root stays writable while the container's mount points are made in it, and
    // `root.readonly` is applied at the end of the setup (by the agent, from the spec).
    let rootfs = match &prepared.source {
        RootfsSource::SharedDir { path } => {
            vm_config.shared_dirs.push(SharedDir {
                tag: ROOTFS_TAG.into(),
                host_path: path.clone(),
                readonly: false,
            });
            runv_proto::RootfsSource::Share {
                tag: ROOTFS_TAG.into(),
            }
        }
        RootfsSource::Block { path, fs_type } => {
            vm_config.block_devices.push(runv_api::BlockDevice {
                id: ROOTFS_TAG.into(),
                host_path: path.clone(),
                readonly: false,
            });
            runv_proto::RootfsSource::Block {
                serial: ROOTFS_TAG.into(),
                fs_type: fs_type.clone(),
            }
        }
    };
    Ok((vm_config, rootfs))
}

/// The spec's host bind mounts go through one share; a pod sandbox has it even when empty.
fn share_volumes(
    config: &MonitorConfig,
    dir: &Path,
    driver_caps: runv_api::Capabilities,
    bundle: &mut Bundle,
    vm_config: &mut VmConfig,
    cleanup: &mut Cleanup,
) -> anyhow::Result<()> {
    cleanup.volumes = Some(dir.to_path_buf());
    let can_share = driver_caps.contains(runv_api::Capabilities::SHARED_DIR_ROOTFS);
    match volumes::prepare(&mut bundle.spec, dir, can_share)? {
        Some(share) => vm_config.shared_dirs.push(share),
        // A pod's members are bound into the share after boot: the VM needs it from the
        // start.
        None if config.pod == config::PodConfig::Sandbox => {
            if !can_share {
                bail!(
                    "driver {} cannot share directories, which a pod's containers need \
                     (use a driver with shared directories, such as qemu)",
                    config.driver
                );
            }
            let share = volumes::share(dir);
            crate::state::private_dir(&share.host_path)
                .with_context(|| format!("creating {}", share.host_path.display()))?;
            volumes::make_propagating(&share.host_path)?;
            vm_config.shared_dirs.push(share);
        }
        None => {}
    }
    Ok(())
}

/// Runtime-namespace hooks run before the VM boots, with our pid in the state: docker
/// configures the network namespace in a prestart hook, and the VM's NICs come from it.
fn run_runtime_hooks(config: &MonitorConfig, store: &Store, bundle: &Bundle) -> anyhow::Result<()> {
    let state = store.update(&config.id, |s| {
        s.pid = std::process::id() as i32;
        s.runv.monitor_start_time = crate::state::process_start_time(s.pid).unwrap_or_default();
    })?;
    let mut oci_state = state.to_oci_json();
    // The spec's lifecycle runs these hooks after the runtime environment was created
    // (step 2), which is "created", not "creating" (the status in state.json until the VM is
    // up).
    oci_state["status"] = Status::Created.as_str().into();
    for point in [Point::Prestart, Point::CreateRuntime] {
        crate::network::in_host_netns(|| hooks::run(&bundle.spec, point, &oci_state))?;
    }
    Ok(())
}

/// Starts the VM: restored from a template (then the agent is already connected), or cold.
fn start_vm(
    config: &MonitorConfig,
    dir: &Path,
    hypervisor: &Loaded<HypervisorClient>,
    vm_config: &VmConfig,
) -> anyhow::Result<(Arc<VmClient>, Option<AgentClient>)> {
    // The VMM (and the driver, for it) creates the console and hypervisor logs and its
    // sockets (QMP: full control of the guest) in the state dir: whatever our caller's umask,
    // they are root's only. The VMM keeps this umask for whatever it creates later. No other
    // thread of ours creates files meanwhile (the control socket is not bound yet).
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let (started, restored) =
        match crate::templates::clone::start(config, &hypervisor.client, vm_config, dir) {
            Ok(crate::templates::clone::Start::Restored { vm, client, meta }) => {
                tracing::debug!("restored from template {}", meta.key);
                (Ok(vm), Some(client))
            }
            Ok(crate::templates::clone::Start::Cold) => {
                (hypervisor.client.start_vm(vm_config), None)
            }
            Err(e) => (Err(format!("{e:#}")), None),
        };
    nix::sys::stat::umask(old_umask);
    let vm = Arc::new(
        started
            .map_err(|e| anyhow::anyhow!("starting the VM with driver {}: {e}", config.driver))?,
    );
    logs::spawn_rotation(vec![
        vm_config.console_log.clone(),
        vm_config
            .log_file
            .clone()
            .unwrap_or_else(|| dir.join("hypervisor.log")),
    ]);
    tracing::debug!(phase = "vmm-up", "VM started, pids {:?}", vm.pids());
    Ok((vm, restored))
}

/// The agent's connection (a restored VM's is made already), and the guest's network.
fn connect_agent(
    config: &MonitorConfig,
    vm: &VmClient,
    vm_config: &VmConfig,
    restored: Option<AgentClient>,
    network: VmNetwork,
) -> anyhow::Result<AgentClient> {
    let client = match restored {
        Some(client) => client,
        None => {
            let channel = vm
                .take_agent_channel()
                .map_err(|e| anyhow::anyhow!("agent channel: {e}"))?;
            AgentClient::connect(channel, Duration::from_secs(config.agent_timeout_secs)).map_err(
                |e| {
                    anyhow::anyhow!(
                        "{e} (guest console log: {})",
                        vm_config.console_log.display()
                    )
                },
            )?
        }
    };
    tracing::debug!(
        phase = "agent-ready",
        "agent {} answered",
        client.agent_version()
    );
    if client.skipped_bytes() > 0 {
        // The channel is meant to be the agent's alone: say so, since it worked anyway.
        tracing::warn!(
            "the agent channel carried {} bytes of other output before the agent's hello \
             (skipped; see the driver's channel setup)",
            client.skipped_bytes()
        );
    }
    client.request(
        Request::SetPowerOffWhenIdle { enabled: true },
        REQUEST_TIMEOUT,
    )?;
    if !network.interfaces.is_empty() {
        agent_call(
            &client,
            Request::ConfigureNetwork {
                interfaces: network.interfaces,
                routes: network.routes,
            },
        )?;
    }
    Ok(client)
}

/// Creates the container in the guest, its init blocked until `start`, with its stdio relay.
fn create_container(
    config: &MonitorConfig,
    client: &AgentClient,
    bundle: &Bundle,
    rootfs: runv_proto::RootfsSource,
) -> anyhow::Result<stdio::Relay> {
    let (hosts, resolv_conf) = crate::network::dns_files(&bundle.spec);
    let host = container_stdio(config, bundle)?;
    let ids = stdio::allocate(bundle.terminal, true);
    let id = config.id.clone();
    let relay = stdio::start(client, ids, host, move |rows, cols| Request::WindowSize {
        container_id: id.clone(),
        exec_id: None,
        rows,
        cols,
    })?;
    let answer = agent_call(
        client,
        Request::CreateContainer {
            id: config.id.clone(),
            spec: bundle.spec.clone(),
            rootfs: Rootfs {
                source: rootfs,
                readonly: false,
            },
            stdio: ids,
            hostname: bundle.hostname(),
            hosts,
            resolv_conf,
            pod_sandbox: None,
        },
    )?;
    if let ResponseBody::Process { pid } = answer {
        tracing::debug!(
            phase = "container-created",
            "container init is guest pid {pid}"
        );
    }
    Ok(relay)
}

/// The state says created (with the VM's processes), then the createContainer hooks run.
fn record_created(
    config: &MonitorConfig,
    store: &Store,
    bundle: &Bundle,
    vm: &VmClient,
    prepared: &PreparedRootfs,
) -> anyhow::Result<()> {
    let rootfs_path = match &prepared.source {
        RootfsSource::SharedDir { path } | RootfsSource::Block { path, .. } => path.clone(),
    };
    let state = store.update(&config.id, |s| {
        s.status = Status::Created;
        s.pid = std::process::id() as i32;
        s.runv.monitor_start_time = crate::state::process_start_time(s.pid).unwrap_or_default();
        s.runv.vm_pids = vm.pids();
        s.runv.vm_start_times = s
            .runv
            .vm_pids
            .iter()
            .map(|p| crate::state::process_start_time(*p as i32).unwrap_or_default())
            .collect();
        s.runv.rootfs = rootfs_path.display().to_string();
        s.runv.console_log = vm.console_log().display().to_string();
    })?;
    let oci_state = state.to_oci_json();
    crate::network::in_host_netns(|| hooks::run(&bundle.spec, Point::CreateContainer, &oci_state))
}
