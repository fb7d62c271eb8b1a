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
mod setup;
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
use runv_api::{StorageRequest, VmClient};
use runv_proto::client::AgentClient;
use runv_proto::{Event, ExitStatus, Request, ResponseBody};

use crate::bundle::Bundle;
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
    match setup::setup(&config, dir, &registry, &mut cleanup) {
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
            volumes::unmount_share(&dir);
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
    let synced = monitor.client.disconnected().is_none()
        && matches!(
            monitor
                .client
                .request(Request::Shutdown, Duration::from_secs(2)),
            Ok(ResponseBody::Synced)
        );
    monitor.client.close();
    // A synced guest has nothing left to lose: the driver ends it now instead of waiting for
    // its power-off path (under TCG new code to translate in every clone of a template).
    let grace = if synced {
        Duration::ZERO
    } else {
        Duration::from_secs(5)
    };
    if let Err(e) = monitor.vm.stop(grace) {
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
