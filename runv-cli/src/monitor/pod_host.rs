//! The sandbox's side of a pod: its monitor owns the pod's VM and runs the pod's other
//! containers in it for their own monitors (`pod_member`). Each member's rootfs (and its
//! volumes) is bound into the sandbox's share (`<state dir>/mounts/c-<id>`), which the VM has
//! had since it booted; its stdio fds come over the control socket and are relayed from here.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::mount::{MsFlags, mount};
use runv_proto::{ExitStatus, Request as AgentRequest, ResponseBody, Rootfs, RootfsSource};
use serde_json::json;

use super::stdio::{self, HostStdio};
use super::{Monitor, agent_call, require_status, volumes};
use crate::control::{self, PodContainer, Reply};
use crate::state::Status;

/// A running member: where its init's exit goes, and its stdio relay.
struct Member {
    exit: Sender<ExitStatus>,
    relay: stdio::Relay,
}

/// The members of the pod whose sandbox this monitor runs.
#[derive(Default)]
pub struct Pod {
    members: Mutex<HashMap<String, Member>>,
}

impl Pod {
    /// Hands a member's exit to the connection waiting for it. False if `id` is no member.
    pub fn exited(&self, id: &str, status: ExitStatus) -> bool {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        match members.get(id) {
            Some(m) => {
                let _ = m.exit.send(status);
                true
            }
            None => false,
        }
    }

    pub fn is_member(&self, id: &str) -> bool {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Sends the member's terminal size to the guest (before its process runs).
    pub fn sync_tty_size(&self, id: &str) {
        if let Some(m) = self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            m.relay.sync_tty_size();
        }
    }

    fn take(&self, id: &str) -> Option<Member> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
    }
}

/// Serves a `PodCreate`: creates the member in the VM, answers its guest pid, waits for its
/// init to exit, cleans up (guest and host) and answers the exit code.
pub fn create(monitor: &Monitor, stream: &UnixStream, member: PodContainer, fds: Vec<OwnedFd>) {
    let (rx, host_dir) = match start_member(monitor, member.clone(), fds) {
        Ok((pid, rx, host_dir)) => {
            if control::reply(stream, &Reply::ok(json!({ "pid": pid }))).is_err() {
                tracing::warn!("pod member {}: its monitor went away", member.id);
            }
            (rx, host_dir)
        }
        Err(e) => {
            let _ = control::reply(stream, &Reply::err(format!("{e:#}"), None));
            return;
        }
    };
    let code = match rx.recv() {
        Ok(status) => status.code(),
        Err(_) => 137,
    };
    if let Some(m) = monitor.pod.as_ref().and_then(|p| p.take(&member.id)) {
        m.relay.wait_output(Duration::from_secs(2));
    }
    remove_member(monitor, &member.id, &host_dir);
    tracing::debug!("pod member {} exited with {code}", member.id);
    let _ = control::reply(stream, &Reply::ok(json!({ "exit": code })));
}

fn start_member(
    monitor: &Monitor,
    member: PodContainer,
    fds: Vec<OwnedFd>,
) -> anyhow::Result<(i32, Receiver<ExitStatus>, std::path::PathBuf)> {
    let pod = monitor
        .pod
        .as_ref()
        .with_context(|| format!("container {} is not a pod sandbox", monitor.id))?;
    require_status(
        monitor,
        &[Status::Created, Status::Running],
        "add a container to the pod of",
    )?;
    crate::container_id::validate(&member.id)?;
    if member.id == monitor.id || pod.is_member(&member.id) {
        bail!("container with id exists: {}", member.id);
    }
    let host = HostStdio::from_fds(member.terminal, fds, "a pod member")?;
    let (host_dir, rel) = volumes::member_dir(&monitor.dir, &member.id);
    let r = (|| {
        let rootfs = host_dir.join("rootfs");
        crate::state::private_dir(&host_dir)
            .and_then(|()| crate::state::private_dir(&rootfs))
            .with_context(|| format!("creating {}", rootfs.display()))?;
        bind(&member.rootfs, &rootfs)?;
        let mut spec = member.spec.clone();
        volumes::bind_sources(&mut spec, &host_dir, &volumes::guest_path(&rel), true)?;

        let ids = stdio::allocate(member.terminal, true);
        let answer = agent_call(
            &monitor.client,
            AgentRequest::CreateContainer {
                id: member.id.clone(),
                spec,
                rootfs: Rootfs {
                    source: RootfsSource::SharePath {
                        tag: volumes::TAG.into(),
                        path: format!("{rel}/rootfs"),
                    },
                    readonly: false,
                },
                stdio: ids,
                hostname: None,
                hosts: member.hosts.clone(),
                resolv_conf: member.resolv_conf.clone(),
                pod_sandbox: Some(monitor.id.clone()),
            },
        )?;
        let pid = match answer {
            ResponseBody::Process { pid } => pid,
            other => bail!("unexpected answer to create: {other:?}"),
        };
        // Attached once the process exists, as for an exec: a create that fails leaves no
        // relay holding the member's stdio (its caller would wait for EOF forever). Nothing
        // is lost: the guest's output waits in the channel until a sink is attached.
        let id = member.id.clone();
        let relay = stdio::start(&monitor.client, ids, host, move |rows, cols| {
            AgentRequest::WindowSize {
                container_id: id.clone(),
                exec_id: None,
                rows,
                cols,
            }
        })
        .inspect_err(|_| {
            let request = AgentRequest::RemoveContainer {
                id: member.id.clone(),
            };
            let _ = agent_call(&monitor.client, request);
        })?;
        let (tx, rx) = channel();
        pod.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(member.id.clone(), Member { exit: tx, relay });
        Ok((pid, rx))
    })();
    match r {
        Ok((pid, rx)) => Ok((pid, rx, host_dir)),
        Err(e) => {
            volumes::remove_bound_dir(&host_dir);
            Err(e)
        }
    }
}

/// Binds the member's rootfs (the engine's mount) where the VM sees it, private so that
/// nothing mounted under it reaches the host's other mounts.
fn bind(source: &Path, target: &Path) -> anyhow::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("binding rootfs {} into the pod's share", source.display()))?;
    let _ = mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    );
    Ok(())
}

fn remove_member(monitor: &Monitor, id: &str, host_dir: &Path) {
    if monitor.client.disconnected().is_none() {
        if let Err(e) = agent_call(
            &monitor.client,
            AgentRequest::RemoveContainer { id: id.to_string() },
        ) {
            tracing::warn!("removing pod member {id} from the VM: {e:#}");
        }
    }
    volumes::remove_bound_dir(host_dir);
}

/// Serves `Member { id, request }`: a request of a member's monitor for its container. The
/// member's monitor checked its container's status; this checks that it is one of ours.
pub fn member_request(
    monitor: &Monitor,
    stream: &UnixStream,
    id: &str,
    request: control::Request,
    fds: Vec<OwnedFd>,
) {
    let known = monitor.pod.as_ref().is_some_and(|p| p.is_member(id));
    if !known {
        let message = format!("container {id} is not in the pod of {}", monitor.id);
        let _ = control::reply(stream, &Reply::err(message, None));
        return;
    }
    let agent = |request| agent_call(&monitor.client, request);
    let result = match request {
        control::Request::Exec { process, tty } => {
            return super::server::exec(monitor, stream, id, process, tty, fds);
        }
        control::Request::Start => {
            if let Some(pod) = &monitor.pod {
                pod.sync_tty_size(id);
            }
            agent(AgentRequest::StartContainer { id: id.to_string() }).map(|_| json!({}))
        }
        control::Request::Kill { signal, all } => agent(AgentRequest::Signal {
            container_id: id.to_string(),
            exec_id: None,
            signal,
            all,
        })
        .map(|_| json!({})),
        // Pausing one container of a pod freezes its cgroup in the guest, not the VM.
        control::Request::Pause | control::Request::Resume => agent(AgentRequest::Freeze {
            container_id: id.to_string(),
            frozen: matches!(request, control::Request::Pause),
        })
        .map(|_| json!({})),
        control::Request::Ps => match agent(AgentRequest::Ps {
            container_id: id.to_string(),
        }) {
            Ok(ResponseBody::Ps { processes }) => {
                serde_json::to_value(processes).map_err(Into::into)
            }
            Ok(other) => Err(anyhow::anyhow!("unexpected answer to ps: {other:?}")),
            Err(e) => Err(e),
        },
        control::Request::Stats => super::server::stats(monitor),
        // The member's `delete --force`: its processes go, the pod stays.
        control::Request::Destroy => agent(AgentRequest::Signal {
            container_id: id.to_string(),
            exec_id: None,
            signal: 9,
            all: true,
        })
        .map(|_| json!({})),
        control::Request::PodCreate(_) | control::Request::Member { .. } => {
            Err(anyhow::anyhow!("not a request for a pod member"))
        }
    };
    let reply = match result {
        Ok(data) => Reply::ok(data),
        Err(e) => Reply::err(format!("{e:#}"), None),
    };
    let _ = control::reply(stream, &reply);
}
