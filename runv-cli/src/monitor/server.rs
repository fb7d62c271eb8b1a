//! The control socket: `start`, `kill`, `pause`, `resume`, `ps`, `exec`, stats and destroy.

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use runv_proto::{Request as AgentRequest, ResponseBody};

use super::stdio::{self, HostStdio};
use super::{Monitor, REQUEST_TIMEOUT, require_status};
use crate::control::{self, Reply, Request};
use crate::hooks::{self, Point};
use crate::state::{CONTROL_SOCKET, Status};

pub fn spawn(monitor: Arc<Monitor>) -> anyhow::Result<()> {
    let dir = monitor.dir.clone();
    listen(&dir, move |stream, request, fds| {
        handle(&monitor, stream, request, fds)
    })
}

/// Binds the control socket in `dir` and serves each connection on a thread of its own with
/// `handler`, once its peer is allowed and its request read.
pub fn listen(
    dir: &std::path::Path,
    handler: impl Fn(&UnixStream, Request, Vec<OwnedFd>) + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let (short, _dir_fd) = control::short_socket_path(dir, CONTROL_SOCKET)?;
    let listener = UnixListener::bind(&short)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    // The state dir (0700) already keeps others out; the socket's own mode does too, for a
    // root or state dir someone loosened.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("securing control socket {}", path.display()))?;
    }
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let handler = handler.clone();
            thread::spawn(move || {
                if let Some((request, fds)) = accept(&stream) {
                    handler(&stream, request, fds);
                }
            });
        }
    });
    Ok(())
}

/// Whether the peer of a control connection may drive the container: root, or the user the
/// monitor runs as. The socket controls a VM (exec as root in the guest, destroy): no one
/// else, whatever the file modes say.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials) {
        Ok(cred) if cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw() => Ok(()),
        Ok(cred) => Err(format!(
            "permission denied: uid {} (pid {}) may not use this container's control socket",
            cred.uid(),
            cred.pid()
        )),
        Err(e) => Err(format!("permission denied: peer credentials unknown: {e}")),
    }
}

/// Checks the peer and reads its request; a refusal or a bad request is answered here.
fn accept(stream: &UnixStream) -> Option<(Request, Vec<OwnedFd>)> {
    if let Err(e) = peer_allowed(stream) {
        tracing::warn!("control socket: {e}");
        // Read (and drop) the request first, briefly: closing a unix socket with unread
        // data resets the connection, and the refusal would be lost.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = control::receive(stream);
        let _ = control::reply(stream, &Reply::err(e, None));
        return None;
    }
    match control::receive(stream) {
        Ok(r) => Some(r),
        Err(e) => {
            let _ = control::reply(stream, &Reply::err(format!("{e:#}"), None));
            None
        }
    }
}

fn handle(monitor: &Monitor, stream: &UnixStream, request: Request, fds: Vec<OwnedFd>) {
    tracing::debug!("control request: {request:?}");
    let result = match request {
        Request::Exec { process, tty } => {
            return exec(monitor, stream, &monitor.id, process, tty, fds);
        }
        Request::PodCreate(member) => {
            return super::pod_host::create(monitor, stream, *member, fds);
        }
        Request::Member { id, request } => {
            return super::pod_host::member_request(monitor, stream, &id, *request, fds);
        }
        Request::Start => start(monitor),
        Request::Kill { signal, all } => kill(monitor, signal, all),
        Request::Pause => pause(monitor, true),
        Request::Resume => pause(monitor, false),
        Request::Ps => ps(monitor),
        Request::Stats => stats(monitor),
        Request::Destroy => destroy(monitor),
    };
    let reply = match result {
        Ok(data) => Reply::ok(data),
        Err(e) => Reply::err(format!("{e:#}"), None),
    };
    let _ = control::reply(stream, &reply);
}

fn agent(monitor: &Monitor, request: AgentRequest) -> anyhow::Result<ResponseBody> {
    super::agent_call(&monitor.client, request)
}

fn start(monitor: &Monitor) -> anyhow::Result<serde_json::Value> {
    require_status(monitor, &[Status::Created], "start")?;
    let state = monitor.store.load(&monitor.id)?;
    let oci_state = state.to_oci_json();
    crate::network::in_host_netns(|| hooks::run(&monitor.spec, Point::StartContainer, &oci_state))?;
    if let Some(relay) = monitor
        .relay
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        relay.sync_tty_size();
    }
    agent(
        monitor,
        AgentRequest::StartContainer {
            id: monitor.id.clone(),
        },
    )?;
    tracing::debug!(phase = "container-started", "container started");
    let state = monitor
        .store
        .update(&monitor.id, |s| s.status = Status::Running)?;
    let oci_state = state.to_oci_json();
    if let Err(e) =
        crate::network::in_host_netns(|| hooks::run(&monitor.spec, Point::Poststart, &oci_state))
    {
        // runc: a failing poststart hook is logged, the container keeps running.
        tracing::warn!("{e:#}");
    }
    Ok(json!({}))
}

fn kill(monitor: &Monitor, signal: i32, all: bool) -> anyhow::Result<serde_json::Value> {
    agent(
        monitor,
        AgentRequest::Signal {
            container_id: monitor.id.clone(),
            exec_id: None,
            signal,
            all,
        },
    )?;
    Ok(json!({}))
}

fn pause(monitor: &Monitor, pause: bool) -> anyhow::Result<serde_json::Value> {
    if pause {
        require_status(monitor, &[Status::Running, Status::Created], "pause")?;
        monitor
            .vm
            .pause()
            .map_err(|e| anyhow::anyhow!("pausing the VM: {e}"))?;
        monitor
            .store
            .update(&monitor.id, |s| s.status = Status::Paused)?;
    } else {
        require_status(monitor, &[Status::Paused], "resume")?;
        monitor
            .vm
            .resume()
            .map_err(|e| anyhow::anyhow!("resuming the VM: {e}"))?;
        monitor
            .store
            .update(&monitor.id, |s| s.status = Status::Running)?;
    }
    Ok(json!({}))
}

fn ps(monitor: &Monitor) -> anyhow::Result<serde_json::Value> {
    require_status(
        monitor,
        &[Status::Created, Status::Running],
        "list processes of",
    )?;
    match agent(
        monitor,
        AgentRequest::Ps {
            container_id: monitor.id.clone(),
        },
    )? {
        ResponseBody::Ps { processes } => Ok(serde_json::to_value(processes)?),
        other => bail!("unexpected answer to ps: {other:?}"),
    }
}

pub(super) fn stats(monitor: &Monitor) -> anyhow::Result<serde_json::Value> {
    let stats = monitor
        .vm
        .stats()
        .map_err(|e| anyhow::anyhow!("VM stats: {e}"))?;
    Ok(json!({
        "host_rss_bytes": stats.host_rss_bytes,
        "host_pss_bytes": stats.host_pss_bytes,
        "guest_memory_bytes": stats.guest_memory_bytes,
        "monitor_rss_bytes": crate::stats::rss_bytes(std::process::id()),
    }))
}

fn destroy(monitor: &Monitor) -> anyhow::Result<serde_json::Value> {
    monitor.client.close();
    monitor
        .vm
        .stop(Duration::from_millis(500))
        .map_err(|e| anyhow::anyhow!("stopping the VM: {e}"))?;
    Ok(json!({}))
}

static NEXT_EXEC: AtomicU64 = AtomicU64::new(1);

/// Runs a process in the container; replies `{"pid":N}` once it started and `{"exit":N}` when
/// it ended. The caller's stdio fds came with the request.
pub(super) fn exec(
    monitor: &Monitor,
    stream: &UnixStream,
    container_id: &str,
    process: serde_json::Value,
    tty: bool,
    fds: Vec<OwnedFd>,
) {
    let mut code = None;
    let mut phases = runv_proto::Phases::start(crate::logging::debug_enabled());
    let result = (|| -> anyhow::Result<(String, std::sync::mpsc::Receiver<runv_proto::ExitStatus>, stdio::Relay)> {
        // A pod member's own monitor checked its status.
        if container_id == monitor.id {
            require_status(monitor, &[Status::Running], "exec into")?;
        }
        phases.mark("status");
        let host = HostStdio::from_fds(tty, fds, "exec")?;
        let exec_id = format!("exec-{}", NEXT_EXEC.fetch_add(1, Ordering::SeqCst));
        let ids = stdio::allocate(tty, true);
        let (tx, rx) = std::sync::mpsc::channel();
        monitor
            .execs
            .lock()
            .map_err(|_| anyhow::anyhow!("exec table poisoned"))?
            .insert(exec_id.clone(), tx);
        // The relay starts once the process exists: output sent before is kept by the client,
        // and a process that failed to start leaves no relay holding the caller's stdio.
        let answer = monitor.client.request(
            AgentRequest::Exec {
                container_id: container_id.to_string(),
                exec_id: exec_id.clone(),
                process,
                stdio: ids,
            },
            REQUEST_TIMEOUT,
        );
        phases.mark("agent");
        if let Err(e) = answer {
            if let Ok(mut m) = monitor.execs.lock() {
                m.remove(&exec_id);
            }
            if let runv_proto::client::Error::Agent(a) = &e {
                code = Some(a.code);
            }
            bail!("{e}");
        }
        let (cid, eid) = (container_id.to_string(), exec_id.clone());
        let relay = stdio::start(&monitor.client, ids, host, move |rows, cols| {
            AgentRequest::WindowSize {
                container_id: cid.clone(),
                exec_id: Some(eid.clone()),
                rows,
                cols,
            }
        })?;
        phases.mark("relay");
        Ok((exec_id, rx, relay))
    })();
    let (exec_id, rx, relay) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = control::reply(stream, &Reply::err(format!("{e:#}"), code));
            return;
        }
    };
    if control::reply(stream, &Reply::ok(json!({"exec_id": exec_id}))).is_err() {
        tracing::debug!("exec client went away; the process keeps running");
    }
    phases.mark("started");
    let code = match rx.recv() {
        Ok(status) => status.code(),
        Err(_) => 137,
    };
    phases.mark("exit-event");
    relay.wait_output(Duration::from_secs(2));
    phases.mark("output");
    let _ = control::reply(stream, &Reply::ok(json!({"exit": code})));
    phases.mark("replied");
    if phases.enabled() {
        tracing::debug!("exec {exec_id} phases: {phases}");
        for (name, stats) in relay.output_stats() {
            tracing::debug!("exec {exec_id} {name} relayed: {stats}");
        }
    }
    drop(relay);
}
