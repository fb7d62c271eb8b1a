//! A pod member's monitor: it stands for its container on the host as every monitor does (its
//! pid, its stdio, its exit status) but owns no VM. It hands its container (spec, rootfs,
//! stdio fds) to the monitor of the pod's sandbox, which runs it in the pod's VM, and forwards
//! its control requests there. It exits with the container's status, or 137 when the pod's VM
//! went away first.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::MonitorConfig;
use super::stdio::HostStdio;
use crate::bundle::Bundle;
use crate::control::{self, PodContainer, Reply, Request};
use crate::hooks::{self, Point};
use crate::state::{Status, Store};

/// How long the sandbox's monitor may take to create the container in the VM.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

struct Member {
    id: String,
    store: Store,
    spec: serde_json::Value,
    /// The sandbox's state dir (its control socket).
    sandbox_dir: PathBuf,
}

pub fn main(
    config: &MonitorConfig,
    sandbox: &str,
    dir: &Path,
    report: &mut dyn FnMut(&str),
) -> ExitCode {
    let (member, mut created) = match setup(config, sandbox) {
        Ok(m) => m,
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!("{message}");
            report(&format!("error {message}"));
            return ExitCode::from(1);
        }
    };
    let member = Arc::new(member);
    let served = member.clone();
    if let Err(e) = super::server::listen(dir, move |stream, request, fds| {
        handle(&served, stream, request, fds)
    }) {
        let message = format!("{e:#}");
        tracing::error!("{message}");
        report(&format!("error {message}"));
        // The container exists in the pod's VM: take it out again.
        let _ = forward(&member, Request::Destroy);
        return ExitCode::from(1);
    }
    report("ok");
    // The sandbox's monitor answers once more, when the container's init ended; a closed
    // connection means the pod's VM (or its monitor) is gone, and the container with it.
    let code = match created.next(None) {
        Ok(Reply {
            error: None, data, ..
        }) => data["exit"].as_i64().unwrap_or(137) as i32,
        Ok(Reply { error: Some(e), .. }) => {
            tracing::warn!("the pod's sandbox: {e}");
            137
        }
        Err(e) => {
            tracing::warn!("the pod's VM ended before the container: {e:#}");
            137
        }
    };
    tracing::debug!(
        phase = "container-exited",
        "container exited with status {code}"
    );
    if let Err(e) = member.store.update(&member.id, |s| {
        s.status = Status::Stopped;
        s.runv.exit_status = Some(code);
    }) {
        tracing::warn!("recording the exit: {e:#}");
    }
    let _ = std::fs::remove_file(dir.join(crate::state::CONTROL_SOCKET));
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn setup(config: &MonitorConfig, sandbox: &str) -> anyhow::Result<(Member, control::Call)> {
    tracing::debug!(
        phase = "monitor-up",
        "monitor started for {} (pod {sandbox})",
        config.id
    );
    let store = Store::new(Some(&config.root));
    let bundle = Bundle::load(&config.bundle)?;
    // As every monitor: engines look at /proc/<our pid>/ns/net (the pod's).
    crate::network::enter(&crate::network::Netns::from_spec(&bundle.spec))?;
    crate::host_cgroup::join(
        &bundle.spec,
        &config.id,
        config.systemd_cgroup,
        config.memory_mib,
    )?;
    let sandbox_dir = sandbox_dir(&store, sandbox)?;

    let state = store.update(&config.id, |s| {
        s.pid = std::process::id() as i32;
        s.runv.monitor_start_time = crate::state::process_start_time(s.pid).unwrap_or_default();
        s.runv.pod_sandbox = Some(sandbox.to_string());
    })?;
    let mut oci_state = state.to_oci_json();
    oci_state["status"] = Status::Created.as_str().into();
    for point in [Point::Prestart, Point::CreateRuntime] {
        crate::network::in_host_netns(|| hooks::run(&bundle.spec, point, &oci_state))?;
    }

    let stdio = super::container_stdio(config, &bundle)?;
    let fds: Vec<OwnedFd> = match stdio {
        HostStdio::Tty(tty) => vec![tty],
        HostStdio::Plain {
            stdin,
            stdout,
            stderr,
        } => {
            let stdin = match stdin {
                Some(fd) => fd,
                None => std::fs::File::open("/dev/null")?.into(),
            };
            vec![stdin, stdout, stderr]
        }
    };
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let (hosts, resolv_conf) = crate::network::dns_files(&bundle.spec);
    let request = Request::PodCreate(Box::new(PodContainer {
        id: config.id.clone(),
        spec: bundle.spec.clone(),
        rootfs: bundle.rootfs.clone(),
        terminal: bundle.terminal,
        hosts,
        resolv_conf,
    }));
    let mut call = control::send(&sandbox_dir, &request, &raw)
        .with_context(|| format!("pod sandbox {sandbox}"))?;
    // The sandbox's monitor holds its own copies now (and ours are kept for our life, as
    // every monitor keeps the stdio it was given).
    let created = call.next(Some(CREATE_TIMEOUT))?;
    if let Some(e) = created.error {
        bail!("{e}");
    }
    tracing::debug!(
        phase = "container-created",
        "container init is guest pid {} in the VM of pod {sandbox}",
        created.data["pid"]
    );
    let state = store.update(&config.id, |s| {
        s.status = Status::Created;
        s.runv.rootfs = bundle.rootfs.display().to_string();
    })?;
    let oci_state = state.to_oci_json();
    crate::network::in_host_netns(|| hooks::run(&bundle.spec, Point::CreateContainer, &oci_state))?;
    Ok((
        Member {
            id: config.id.clone(),
            store,
            spec: bundle.spec,
            sandbox_dir,
        },
        call,
    ))
}

/// The state dir of a running pod sandbox in the same root.
pub fn sandbox_dir(store: &Store, sandbox: &str) -> anyhow::Result<PathBuf> {
    crate::container_id::validate(sandbox).context("the pod's sandbox id")?;
    let state = store
        .load(sandbox)
        .with_context(|| format!("pod sandbox {sandbox}"))?;
    match state.effective_status() {
        Status::Created | Status::Running => Ok(store.dir(sandbox)),
        other => bail!("pod sandbox {sandbox} is {}", other.as_str()),
    }
}

/// One request to the sandbox's monitor for our container; its error as one line.
fn forward(member: &Member, request: Request) -> anyhow::Result<serde_json::Value> {
    let request = Request::Member {
        id: member.id.clone(),
        request: Box::new(request),
    };
    control::call(&member.sandbox_dir, &request, REQUEST_TIMEOUT)
}

fn require(member: &Member, allowed: &[Status], what: &str) -> anyhow::Result<()> {
    let state = member.store.load(&member.id)?;
    if !allowed.contains(&state.status) {
        bail!(
            "cannot {what} a container that is {}",
            state.status.as_str()
        );
    }
    Ok(())
}

fn handle(member: &Member, stream: &UnixStream, request: Request, fds: Vec<OwnedFd>) {
    tracing::debug!("control request: {request:?}");
    let result = match request {
        Request::Exec { process, tty } => return exec(member, stream, process, tty, fds),
        Request::Start => start(member),
        Request::Pause | Request::Resume => pause(member, matches!(request, Request::Pause)),
        Request::Ps => require(
            member,
            &[Status::Created, Status::Running],
            "list processes of",
        )
        .and_then(|()| forward(member, Request::Ps)),
        Request::PodCreate(_) | Request::Member { .. } => Err(anyhow::anyhow!(
            "container {} is a pod member, not a pod sandbox",
            member.id
        )),
        other @ (Request::Kill { .. } | Request::Stats | Request::Destroy) => {
            forward(member, other)
        }
    };
    let reply = match result {
        Ok(data) => Reply::ok(data),
        Err(e) => Reply::err(format!("{e:#}"), None),
    };
    let _ = control::reply(stream, &reply);
}

fn start(member: &Member) -> anyhow::Result<serde_json::Value> {
    require(member, &[Status::Created], "start")?;
    let oci_state = member.store.load(&member.id)?.to_oci_json();
    crate::network::in_host_netns(|| hooks::run(&member.spec, Point::StartContainer, &oci_state))?;
    forward(member, Request::Start)?;
    tracing::debug!(phase = "container-started", "container started");
    let state = member
        .store
        .update(&member.id, |s| s.status = Status::Running)?;
    let oci_state = state.to_oci_json();
    if let Err(e) =
        crate::network::in_host_netns(|| hooks::run(&member.spec, Point::Poststart, &oci_state))
    {
        tracing::warn!("{e:#}");
    }
    Ok(json!({}))
}

fn pause(member: &Member, pause: bool) -> anyhow::Result<serde_json::Value> {
    let (allowed, what, next, request): (&[Status], _, _, _) = if pause {
        (
            &[Status::Running, Status::Created],
            "pause",
            Status::Paused,
            Request::Pause,
        )
    } else {
        (
            &[Status::Paused],
            "resume",
            Status::Running,
            Request::Resume,
        )
    };
    require(member, allowed, what)?;
    forward(member, request)?;
    member.store.update(&member.id, |s| s.status = next)?;
    Ok(json!({}))
}

/// Passes the exec (and the caller's stdio fds) on to the sandbox's monitor and its answers
/// (the exec's id, then its exit) back.
fn exec(
    member: &Member,
    stream: &UnixStream,
    process: serde_json::Value,
    tty: bool,
    fds: Vec<OwnedFd>,
) {
    if let Err(e) = require(member, &[Status::Running], "exec into") {
        let _ = control::reply(stream, &Reply::err(format!("{e:#}"), None));
        return;
    }
    let request = Request::Member {
        id: member.id.clone(),
        request: Box::new(Request::Exec { process, tty }),
    };
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut call = match control::send(&member.sandbox_dir, &request, &raw) {
        Ok(c) => c,
        Err(e) => {
            let _ = control::reply(stream, &Reply::err(format!("{e:#}"), None));
            return;
        }
    };
    drop(fds);
    // The first answer comes once the process started; the second when it ended.
    for timeout in [Some(REQUEST_TIMEOUT), None] {
        let reply = call
            .next(timeout)
            .unwrap_or_else(|e| Reply::err(format!("{e:#}"), Some(137)));
        let last = reply.error.is_some();
        if control::reply(stream, &reply).is_err() && timeout.is_some() {
            tracing::debug!("exec client went away; the process keeps running");
        }
        if last {
            return;
        }
    }
}
