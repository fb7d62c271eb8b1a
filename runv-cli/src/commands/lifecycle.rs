//! `start`, `run`, `delete`, `kill`, `pause`, `resume`.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::context::Ctx;
use super::create::{self, CreateArgs};
use crate::control::{self, Request};
use crate::hooks::{self, Point};
use crate::state::{ContainerState, NotExist, Status, process_alive, process_start_time};
use crate::{monitor, signals};

const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

fn load_live(ctx: &Ctx, id: &str) -> anyhow::Result<(ContainerState, Status)> {
    let state = ctx.store.load(id)?;
    let status = state.effective_status();
    Ok((state, status))
}

// No state lock is held across a control call: the monitor updates the state under that lock.
pub fn start(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let (_, status) = load_live(ctx, id)?;
    match status {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        Status::Running | Status::Paused => bail!("cannot start an already running container"),
        Status::Creating => bail!("cannot start a container that is still being created"),
    }
    control::call(&ctx.store.dir(id), &Request::Start, CONTROL_TIMEOUT)?;
    Ok(())
}

pub struct RunArgs<'a> {
    pub create: CreateArgs<'a>,
    pub detach: bool,
    pub keep: bool,
}

pub fn run(ctx: &Ctx, args: &RunArgs) -> anyhow::Result<ExitCode> {
    let id = args.create.id;
    let mut receiver = None;
    let mut create_args = CreateArgs { ..args.create };
    let console_path;
    if !args.detach
        && args.create.console_socket.is_none()
        && crate::bundle::Bundle::load(args.create.bundle)?.terminal
    {
        // Foreground with a terminal: be our own console socket and relay our stdio.
        let r = super::console_relay::Receiver::bind()?;
        console_path = r.path().to_path_buf();
        create_args.console_socket = Some(&console_path);
        receiver = Some(r);
    }
    let mut child = create::create_keep(ctx, &create_args, args.keep)?;
    let relay = match receiver {
        Some(r) => Some(r.accept_and_relay()?),
        None => None,
    };
    if let Err(e) = start(ctx, id) {
        let _ = destroy(ctx, id);
        let _ = child.wait();
        if args.keep {
            // Its logs stay for a look; `runv delete` removes the rest.
            return Err(anyhow::anyhow!(
                "{e:#} (state kept in {}: runv delete {id} removes it)",
                ctx.store.dir(id).display()
            ));
        }
        let _ = remove_stopped(ctx, id);
        return Err(e);
    }
    if args.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait().context("waiting for the container")?;
    drop(relay);
    let code = status.code().unwrap_or(1);
    if !args.keep {
        remove_stopped(ctx, id)?;
    }
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

pub fn kill(ctx: &Ctx, id: &str, signal: &str, all: bool) -> anyhow::Result<()> {
    let signal = signals::parse(signal)?;
    let (_, status) = load_live(ctx, id)?;
    if matches!(status, Status::Stopped | Status::Creating) {
        // runc's words: containerd takes "container not running" as "already exited".
        bail!("container not running");
    }
    control::call(
        &ctx.store.dir(id),
        &Request::Kill { signal, all },
        CONTROL_TIMEOUT,
    )?;
    Ok(())
}

pub fn pause(ctx: &Ctx, id: &str, pause: bool) -> anyhow::Result<()> {
    let (_, status) = load_live(ctx, id)?;
    match (pause, status) {
        (true, Status::Running | Status::Created) | (false, Status::Paused) => {}
        // runc's libcontainer wording.
        (true, Status::Paused) => bail!("container paused"),
        (false, Status::Running | Status::Created) => bail!("container not paused"),
        _ => bail!("container not running"),
    }
    let request = if pause {
        Request::Pause
    } else {
        Request::Resume
    };
    control::call(&ctx.store.dir(id), &request, CONTROL_TIMEOUT)?;
    Ok(())
}

/// `delete`: a stopped or created container is removed (as runc does: a created one is
/// stopped first); a running or paused one only with `--force`, else nothing changes.
/// Concurrent deletes are serialized; with `--force` a missing container is a success and a
/// damaged one (state missing or corrupt) is still cleaned up.
pub fn delete(ctx: &Ctx, id: &str, force: bool) -> anyhow::Result<()> {
    let Some(_delete_lock) = ctx.store.delete_lock(id)? else {
        if force {
            // runc: delete --force of a missing container succeeds.
            return Ok(());
        }
        return Err(NotExist.into());
    };
    let (_, status) = match load_live(ctx, id) {
        Ok(s) => s,
        Err(e) if force && e.downcast_ref::<crate::state::Damaged>().is_some() => {
            tracing::warn!("{e:#}");
            return remove_damaged(ctx, id);
        }
        Err(e) => return Err(e),
    };
    match status {
        // The monitor records the exit before it takes the VM down: let it finish.
        Status::Stopped => wait_for_monitor(ctx, id)?,
        Status::Created => destroy(ctx, id)?,
        Status::Running | Status::Paused | Status::Creating if force => destroy(ctx, id)?,
        other => bail!(
            "cannot delete container {id} that is not stopped: {}",
            other.as_str()
        ),
    }
    delete_stopped(ctx, id)
}

/// `delete_stopped` under the delete lock (for `run`, whose container may meet a concurrent
/// `delete --force`).
fn remove_stopped(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    match ctx.store.delete_lock(id)? {
        Some(_lock) => delete_stopped(ctx, id),
        None => Ok(()),
    }
}

/// Cleans up a container whose state is missing or unreadable: its monitor is found by its
/// command line (`runv __monitor <dir>`; its VMM dies with it, PDEATHSIG), storage is
/// cleaned with what the monitor recorded, then the directory goes.
fn remove_damaged(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let dir = ctx.store.dir(id);
    let monitors = find_monitors(&dir);
    for (pid, _) in &monitors {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while monitors.iter().any(|(pid, t)| process_alive(*pid, *t)) {
        if Instant::now() > deadline {
            bail!("container {id}: its monitor does not die; not removing its state");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = monitor::MonitorConfig::load(&dir).ok();
    if let Some(name) = config.as_ref().and_then(|c| c.storage.clone()) {
        cleanup_storage(ctx, id, &name)?;
    }
    if let Some(config) = config {
        if let Ok(bundle) = crate::bundle::Bundle::load(&config.bundle) {
            crate::host_cgroup::remove(&bundle.spec, id, config.systemd_cgroup);
            let oci = serde_json::json!({
                "ociVersion": bundle.oci_version(),
                "id": id,
                "status": "stopped",
                "bundle": bundle.dir.display().to_string(),
                "annotations": bundle.annotations(),
            });
            if let Err(e) = hooks::run(&bundle.spec, Point::Poststop, &oci) {
                tracing::warn!("{e:#}");
            }
        }
    }
    ctx.store.remove(id)
}

/// Live monitors of the container in `dir` (pid, start time), found by their command line.
pub fn find_monitors(dir: &Path) -> Vec<(i32, u64)> {
    let Ok(want) = std::fs::canonicalize(dir) else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() < 3 || args[1] != b"__monitor" {
            continue;
        }
        let arg = Path::new(std::ffi::OsStr::from_bytes(args[2]));
        // A relative --root was relative to the monitor's working directory.
        let path = match std::fs::read_link(format!("/proc/{pid}/cwd")) {
            Ok(cwd) => cwd.join(arg),
            Err(_) => arg.to_path_buf(),
        };
        if std::fs::canonicalize(&path).is_ok_and(|p| p == want) {
            if let Some(t) = process_start_time(pid) {
                found.push((pid, t));
            }
        }
    }
    found
}

/// Ends the VM of a live container and waits for its monitor to exit.
fn destroy(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let dir = ctx.store.dir(id);
    if let Err(e) = control::call(&dir, &Request::Destroy, Duration::from_secs(10)) {
        tracing::debug!("asking the monitor to stop: {e:#}");
    }
    wait_for_monitor(ctx, id)
}

/// Waits for the container's monitor (and with it the VM) to be gone, killing it after 10 s.
fn wait_for_monitor(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let state = ctx.store.load(id)?;
    if state.pid == 0 {
        // A create still booting has not recorded its monitor yet: find it by its command
        // line, or its directory would be removed under it.
        for (pid, t) in find_monitors(&ctx.store.dir(id)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_alive(pid, t) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if state.pid > 0 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(state.pid, state.runv.monitor_start_time) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if process_alive(state.pid, state.runv.monitor_start_time) {
            let pid = nix::unistd::Pid::from_raw(state.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_alive(state.pid, state.runv.monitor_start_time)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // A VMM whose monitor was killed dies with it (PDEATHSIG); make sure of it, but only
    // of the very processes the monitor started (start time recorded), never a reused PID.
    for (i, pid) in state.runv.vm_pids.iter().enumerate() {
        let pid = *pid as i32;
        let started = state.runv.vm_start_times.get(i).copied();
        if started.is_some_and(|t| process_alive(pid, t)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    Ok(())
}

/// Cleans up a stopped container: storage, poststop hooks, state.
fn delete_stopped(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let state = ctx.store.load(id)?;
    let dir = ctx.store.dir(id);
    if let Some(sandbox) = &state.runv.pod_sandbox {
        end_in_pod(ctx, id, sandbox);
    }
    if let Some(name) = &state.runv.storage {
        cleanup_storage(ctx, id, name)?;
    }
    if let Ok(bundle) = crate::bundle::Bundle::load(Path::new(&state.bundle)) {
        // The monitor and the VMM are gone: their host cgroup can go too, as runc's does.
        let systemd = monitor::config::MonitorConfig::load(&dir)
            .map(|c| c.systemd_cgroup)
            .unwrap_or(ctx.systemd_cgroup);
        crate::host_cgroup::remove(&bundle.spec, id, systemd);
        let mut oci = state.to_oci_json();
        oci["status"] = "stopped".into();
        if let Err(e) = hooks::run(&bundle.spec, Point::Poststop, &oci) {
            tracing::warn!("{e:#}");
        }
    }
    ctx.store.remove(id)
}

/// A pod member whose monitor died (SIGKILL) may still run in the pod's VM: the sandbox's
/// monitor ends it there, which also unbinds its rootfs from the pod's share. A member that
/// exited is no longer the sandbox's, which then says so; that is fine.
fn end_in_pod(ctx: &Ctx, id: &str, sandbox: &str) {
    if crate::container_id::validate(sandbox).is_err() {
        return;
    }
    let request = Request::Member {
        id: id.to_string(),
        request: Box::new(Request::Destroy),
    };
    if let Err(e) = control::call(&ctx.store.dir(sandbox), &request, CONTROL_TIMEOUT) {
        tracing::debug!("pod sandbox {sandbox}: ending {id}: {e:#}");
    }
}

/// Undoes what storage driver `name` prepared for the container, if it got that far.
fn cleanup_storage(ctx: &Ctx, id: &str, name: &str) -> anyhow::Result<()> {
    // The request the monitor prepared with; absent if it never got that far.
    let Some(request) = monitor::load_storage_request(&ctx.store.dir(id))? else {
        return Ok(());
    };
    let registry = ctx.registry();
    let storage = registry.storage(name).with_context(|| {
        format!("storage driver {name} is not found; cannot clean up container {id}")
    })?;
    storage
        .client
        .cleanup(&request)
        .map_err(|e| anyhow::anyhow!("storage driver {name}: cleanup: {e}"))
}
