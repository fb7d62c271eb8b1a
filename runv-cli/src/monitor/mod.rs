//! The monitor: one long-lived host process per container (started by `create` as
//! `runv __monitor DIR`). Its PID stands for the container; it holds the VM, the agent
//! connection and the stdio relay, serves the control socket, and exits with the container's
//! exit status.

pub mod config;
mod logs;
mod pod_host;
mod pod_member;
mod rootfs_image;
mod server;
pub mod stdio;
pub mod volumes;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use runv_api::{PreparedRootfs, RootfsSource, SharedDir, StorageRequest, VmClient, VmConfig};
use runv_proto::client::AgentClient;
use runv_proto::{Event, ExitStatus, Request, ResponseBody, Rootfs};

use crate::bundle::Bundle;
use crate::hooks::{self, Point};
use crate::plugins::{self, Registry};
use crate::state::{Status, Store};
pub use config::MonitorConfig;
pub use pod_member::sandbox_dir;

/// The fd on which the monitor reports to `create` that it is ready (or why it failed).
pub const READY_FD: i32 = 3;

/// Tag of the rootfs share in the guest.
pub const ROOTFS_TAG: &str = "rootfs";
/// The image a directory rootfs is copied into for drivers that cannot share directories.
const ROOTFS_IMAGE: &str = "rootfs.img";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Monitor {
    pub id: String,
    pub dir: PathBuf,
    pub store: Store,
    pub spec: serde_json::Value,
    pub vm: Arc<VmClient>,
    pub client: AgentClient,
    /// Exec'd processes waiting for their exit: exec id → where to send the status.
    pub execs: Mutex<HashMap<String, std::sync::mpsc::Sender<ExitStatus>>>,
    pub relay: Mutex<Option<stdio::Relay>>,
    /// The `(interface, tap)` pairs connecting the container's network to the VM.
    pub network_links: Vec<(String, String)>,
    /// A pod sandbox's: the pod's other containers, running in this VM.
    pub pod: Option<pod_host::Pod>,
}

/// Entry point of `runv __monitor DIR`.
pub fn main(dir: &Path) -> ExitCode {
    // SAFETY: create passes the write end of its readiness pipe as fd 3; nothing else owns it.
    let ready = File::from(unsafe { OwnedFd::from_raw_fd(READY_FD) });
    // The VMM we start must not inherit it, or create would wait for the VM to end.
    let _ = nix::fcntl::fcntl(
        READY_FD,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let mut ready = Some(ready);
    let mut report = |message: &str| {
        if let Some(mut f) = ready.take() {
            let _ = f.write_all(message.as_bytes());
        }
    };
    let config = match MonitorConfig::load(dir) {
        Ok(c) => c,
        Err(e) => {
            report(&format!("error {e:#}"));
            return ExitCode::from(1);
        }
    };
    let _ = init_logging(&config, dir);
    if let config::PodConfig::Member { sandbox } = &config.pod {
        return pod_member::main(&config, sandbox, dir, &mut report);
    }
    let registry = Registry::load(plugins::search_dirs(&config.driver_dirs));
    let mut cleanup = Cleanup::default();
    match setup(&config, dir, &registry, &mut cleanup) {
        Ok(monitor) => {
            let monitor = Arc::new(monitor);
            // Subscribe before anything can happen, bind before create returns.
            let events = monitor.client.subscribe();
            if let Err(e) = server::spawn(monitor.clone()) {
                let message = format!("{e:#}");
                tracing::error!("{message}");
                report(&format!("error {message}"));
                shutdown_vm(&monitor);
                crate::network::teardown(&monitor.network_links);
                return ExitCode::from(1);
            }
            report("ok");
            let code = serve(monitor, events);
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            let message = format!("{e:#}");
            log_console_tail(dir);
            tracing::error!("{message}");
            cleanup.run(&registry);
            report(&format!("error {message}"));
            ExitCode::from(1)
        }
    }
}

/// The state dir goes away with a failed create: keep the end of the guest console in the log.
fn log_console_tail(dir: &Path) {
    let Ok(console) = std::fs::read_to_string(dir.join("console.log")) else {
        return;
    };
    let lines: Vec<&str> = console.lines().collect();
    for line in &lines[lines.len().saturating_sub(20)..] {
        tracing::info!("guest console: {line}");
    }
}

fn init_logging(config: &MonitorConfig, dir: &Path) -> anyhow::Result<()> {
    // The monitor's stderr is the container's: its logs go to the --log file or the state dir.
    let log = match &config.log {
        Some(log) => log.clone(),
        None => {
            // Ours, so root's only (logging::init would create it with the umask's mode).
            let log = dir.join("monitor.log");
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(crate::state::FILE_MODE)
                .open(&log)?;
            log
        }
    };
    let format = crate::logging::Format::parse(config.log_format.as_deref())?;
    crate::logging::init(Some(&log), format, config.debug)?;
    Ok(())
}

/// What to undo when setting up fails half way.
#[derive(Default)]
struct Cleanup {
    vm: Option<Arc<VmClient>>,
    network_links: Vec<(String, String)>,
    storage: Option<(String, StorageRequest)>,
    /// The state dir whose volume binds are unmounted once the VM is gone.
    volumes: Option<PathBuf>,
}

impl Cleanup {
    fn run(&mut self, registry: &Registry) {
        if let Some(vm) = self.vm.take() {
            let _ = vm.stop(Duration::from_millis(100));
            let _ = vm.wait();
        }
        crate::network::teardown(&std::mem::take(&mut self.network_links));
        if let Some(dir) = self.volumes.take() {
            volumes::unmount_all_under(&dir.join("mounts"));
        }
        if let Some((name, request)) = self.storage.take() {
            if let Some(s) = registry.storage(&name) {
                if let Err(e) = s.client.cleanup(&request) {
                    tracing::warn!("storage cleanup: {e}");
                }
            }
        }
    }
}

const STORAGE_REQUEST: &str = "storage.json";

/// The storage request a monitor prepared the rootfs with, if it got that far.
pub fn load_storage_request(dir: &Path) -> anyhow::Result<Option<StorageRequest>> {
    match std::fs::read(dir.join(STORAGE_REQUEST)) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).context("parsing the recorded storage request")?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context("reading the recorded storage request"),
    }
}

pub fn storage_request(id: &str, dir: &Path, bundle: &Bundle) -> StorageRequest {
    StorageRequest {
        version: 1,
        container_id: id.to_string(),
        rootfs: bundle.rootfs.clone(),
        readonly: bundle.rootfs_readonly,
        state_dir: dir.join("storage"),
        options: Default::default(),
    }
}

fn setup(
    config: &MonitorConfig,
    dir: &Path,
    registry: &Registry,
    cleanup: &mut Cleanup,
) -> anyhow::Result<Monitor> {
    tracing::debug!(phase = "monitor-up", "monitor started for {}", config.id);
    let store = Store::new(Some(&config.root));
    let mut bundle = Bundle::load(&config.bundle)?;
    // Before any thread starts: engines look at /proc/<our pid>/ns/net.
    let netns = crate::network::Netns::from_spec(&bundle.spec);
    crate::network::enter(&netns)?;
    // Before the VMM starts, so that it is born in the container's cgroup.
    crate::host_cgroup::join(
        &bundle.spec,
        &config.id,
        config.systemd_cgroup,
        config.memory_mib,
    )?;
    let hypervisor = registry.choose_hypervisor(Some(&config.driver))?;

    let prepared = match &config.storage {
        Some(name) => {
            let storage = registry
                .choose_storage(Some(name))?
                .context("storage driver vanished")?;
            let request = storage_request(&config.id, dir, &bundle);
            if let Err(e) = crate::state::private_dir(&request.state_dir) {
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(e)
                        .with_context(|| format!("creating {}", request.state_dir.display()));
                }
            }
            crate::state::write_private(
                &dir.join(STORAGE_REQUEST),
                &serde_json::to_vec(&request)?,
            )?;
            let prepared = storage
                .client
                .prepare(&request)
                .map_err(|e| anyhow::anyhow!("storage driver {name}: preparing the rootfs: {e}"));
            cleanup.storage = Some((name.clone(), request));
            prepared?
        }
        None => PreparedRootfs {
            source: RootfsSource::SharedDir {
                path: bundle.rootfs.clone(),
            },
            readonly: bundle.rootfs_readonly,
        },
    };

    let driver_caps = hypervisor.client.info().capabilities;
    let prepared = match rootfs_image::fit(&config.driver, driver_caps, prepared)? {
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
    };
    tracing::debug!(phase = "rootfs-ready", "rootfs ready");

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
            vm_config.shared_dirs.push(share);
        }
        None => {}
    }

    // Runtime-namespace hooks run before the VM boots, with our pid in the state: docker
    // configures the network namespace in a prestart hook, and the VM's NICs come from it.
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
    let network = crate::network::prepare(&netns)?;
    let network_links = crate::network::links_of(&network);
    cleanup.network_links = network_links.clone();
    vm_config.network_interfaces = network.nics.clone();

    // The VMM (and the driver, for it) creates the console and hypervisor logs and its
    // sockets (QMP: full control of the guest) in the state dir: whatever our caller's umask,
    // they are root's only. The VMM keeps this umask for whatever it creates later. No other
    // thread of ours creates files meanwhile (the control socket is not bound yet).
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let (started, restored) =
        match crate::templates::clone::start(config, &hypervisor.client, &vm_config, dir) {
            Ok(crate::templates::clone::Start::Restored { vm, client, meta }) => {
                tracing::debug!("restored from template {}", meta.key);
                (Ok(vm), Some(client))
            }
            Ok(crate::templates::clone::Start::Cold) => {
                (hypervisor.client.start_vm(&vm_config), None)
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
    cleanup.vm = Some(vm.clone());
    tracing::debug!(phase = "vmm-up", "VM started, pids {:?}", vm.pids());
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
    let (hosts, resolv_conf) = crate::network::dns_files(&bundle.spec);

    let host = container_stdio(config, &bundle)?;
    let ids = stdio::allocate(bundle.terminal, true);
    let id = config.id.clone();
    let relay = stdio::start(&client, ids, host, move |rows, cols| Request::WindowSize {
        container_id: id.clone(),
        exec_id: None,
        rows,
        cols,
    })?;
    let answer = agent_call(
        &client,
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
    crate::network::in_host_netns(|| hooks::run(&bundle.spec, Point::CreateContainer, &oci_state))?;
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

/// One request to the agent; its error as one line (the client error repeats its source).
pub fn agent_call(client: &AgentClient, request: Request) -> anyhow::Result<ResponseBody> {
    client
        .request(request, REQUEST_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The container's stdio: a pty sent to the console socket, or what create was given.
pub(super) fn container_stdio(
    config: &MonitorConfig,
    bundle: &Bundle,
) -> anyhow::Result<stdio::HostStdio> {
    if bundle.terminal {
        let socket = config
            .console_socket
            .as_ref()
            .context("the spec asks for a terminal but no --console-socket was given")?;
        let pty = crate::console::open()?;
        crate::console::send_master(socket, &pty)?;
        return Ok(stdio::HostStdio::Tty(pty.slave));
    }
    let dup = |fd: i32| -> anyhow::Result<OwnedFd> {
        // SAFETY: 0, 1 and 2 are open for the life of the process; we only borrow to dup.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        Ok(borrowed.try_clone_to_owned()?)
    };
    Ok(stdio::HostStdio::Plain {
        stdin: Some(dup(0)?),
        stdout: dup(1)?,
        stderr: dup(2)?,
    })
}

/// Serves the control socket and waits for the container's init to exit. Returns its status.
fn serve(monitor: Arc<Monitor>, events: std::sync::mpsc::Receiver<Event>) -> i32 {
    let status = loop {
        match events.recv_timeout(Duration::from_millis(500)) {
            Ok(Event::ProcessExited {
                container_id,
                exec_id,
                status,
            }) => match exec_id {
                None if container_id == monitor.id => break status.code(),
                None => {
                    let member = monitor.pod.as_ref();
                    if !member.is_some_and(|p| p.exited(&container_id, status)) {
                        tracing::warn!("exit of unknown container {container_id} in the VM");
                    }
                }
                Some(exec_id) => {
                    if let Some(tx) = monitor
                        .execs
                        .lock()
                        .ok()
                        .and_then(|mut m| m.remove(&exec_id))
                    {
                        let _ = tx.send(status);
                    }
                }
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(reason) = monitor.client.disconnected() {
                    tracing::warn!("the VM ended before the container: {reason}");
                    break ExitStatus::Signaled(9).code();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The VM went away (the VMM was killed, the guest crashed): say so in
                // monitor.log, the only trace left of why the container "exited" 137.
                let reason = monitor
                    .client
                    .disconnected()
                    .unwrap_or_else(|| "the agent connection closed".into());
                tracing::warn!("the VM ended before the container: {reason}");
                break ExitStatus::Signaled(9).code();
            }
        }
    };
    tracing::debug!(
        phase = "container-exited",
        "container exited with status {status}"
    );
    if let Some(relay) = monitor.relay.lock().ok().and_then(|mut r| r.take()) {
        relay.wait_output(Duration::from_secs(2));
    }
    if let Err(e) = monitor.store.update(&monitor.id, |s| {
        s.status = Status::Stopped;
        s.runv.exit_status = Some(status);
    }) {
        tracing::warn!("recording the exit: {e:#}");
    }
    shutdown_vm(&monitor);
    crate::network::teardown(&monitor.network_links);
    if monitor.pod.is_some() {
        // The pod's members went with the VM: their rootfs binds go now, not at delete.
        for entry in std::fs::read_dir(monitor.dir.join("mounts"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("c-"))
        {
            volumes::remove_bound_dir(&entry.path());
        }
    }
    tracing::debug!(phase = "vm-stopped", "VM stopped");
    let _ = std::fs::remove_file(monitor.dir.join(crate::state::CONTROL_SOCKET));
    status
}

fn shutdown_vm(monitor: &Monitor) {
    if monitor.client.disconnected().is_none() {
        let _ = monitor
            .client
            .request(Request::Shutdown, Duration::from_secs(2));
    }
    monitor.client.close();
    if let Err(e) = monitor.vm.stop(Duration::from_secs(5)) {
        tracing::warn!("stopping the VM: {e}");
    }
    match monitor.vm.wait() {
        Ok(exit) => tracing::debug!("VM ended: {}", exit.description),
        Err(e) => tracing::warn!("waiting for the VM: {e}"),
    }
}

/// Runs `f` unless the container is in one of `allowed` states.
pub fn require_status(monitor: &Monitor, allowed: &[Status], what: &str) -> anyhow::Result<()> {
    let state = monitor.store.load(&monitor.id)?;
    if !allowed.contains(&state.status) {
        bail!(
            "cannot {what} a container that is {}",
            state.status.as_str()
        );
    }
    Ok(())
}
