//! `runv exec`: runs a process in a running container. In the foreground it relays stdio
//! (through the monitor) and exits with the process's status; `--detach` leaves a small
//! host process behind that does exactly that, whose PID goes to `--pid-file`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::context::Ctx;
use super::create::write_pid_file;
use crate::control::{self, Request};
use crate::state::Status;

/// Set in the background helper of `exec --detach`: the fd to report "started" on.
const ENV_READY_FD: &str = "RUNV_EXEC_READY_FD";

pub fn run(ctx: &Ctx, args: &liboci_cli::Exec) -> anyhow::Result<ExitCode> {
    let mut phases = runv_proto::Phases::start(crate::logging::debug_enabled());
    let id = &args.container_id;
    let state = ctx.store.load(id)?;
    match state.effective_status() {
        Status::Running => {}
        Status::Paused if args.ignore_paused => {}
        // runc's wording for the first two.
        Status::Paused => {
            bail!("cannot exec in a paused container (use --ignore-paused to override)")
        }
        Status::Stopped => bail!("cannot exec in a stopped container"),
        _ => bail!("cannot exec in a container that is not running"),
    }
    let process = build_process(args, Path::new(&state.bundle))?;
    phases.mark("state");
    let ready_fd = std::env::var(ENV_READY_FD)
        .ok()
        .and_then(|v| v.parse::<i32>().ok());
    if args.detach && ready_fd.is_none() {
        let tty = process["terminal"].as_bool().unwrap_or(false);
        return detach(args, tty && args.console_socket.is_some());
    }
    let tty = process["terminal"].as_bool().unwrap_or(false);
    let mut relay = None;
    let mut pty_slave = None;
    let fds: Vec<i32> = if tty {
        let pty = crate::console::open()?;
        match &args.console_socket {
            Some(socket) => crate::console::send_master(socket, &pty)?,
            None => relay = Some(super::console_relay::Relay::start(pty.master.try_clone()?)),
        }
        let fd = pty.slave.as_raw_fd();
        pty_slave = Some(pty);
        vec![fd]
    } else {
        vec![0, 1, 2]
    };
    let mut call = control::send(&ctx.store.dir(id), &Request::Exec { process, tty }, &fds)?;
    phases.mark("sent");
    // The monitor holds its own copies now.
    drop(pty_slave);
    let started = call.next(Some(Duration::from_secs(60)))?;
    phases.mark("started");
    if let Some(error) = started.error {
        let code = started.code.unwrap_or(1);
        report_ready(ready_fd, &format!("error {code} {error}"));
        return Err(super::ExitWith {
            code: code.clamp(1, 255) as u8,
            message: error,
        }
        .into());
    }
    report_ready(ready_fd, "ok");
    if ready_fd.is_none() {
        if let Some(pid_file) = &args.pid_file {
            // As runc, also in the foreground: this process stands for the exec'd one (it
            // relays its stdio and exits with its status).
            write_pid_file(pid_file, std::process::id())?;
        }
    }
    let done = call.next(None)?;
    phases.mark("exited");
    tracing::debug!("exec phases: {phases}");
    drop(relay);
    if let Some(error) = done.error {
        bail!("{error}");
    }
    let code = done.data["exit"].as_i64().unwrap_or(1);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn report_ready(fd: Option<i32>, message: &str) {
    if let Some(fd) = fd {
        // SAFETY: the parent passed this fd for us to report on; we own and close it.
        let mut f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let _ = f.write_all(message.as_bytes());
    }
}

/// Starts ourselves again in the background (same arguments, in a new session) and returns
/// once that helper reports the process started; its PID is what `--pid-file` gets.
/// With a console socket the process's stdio is the pty: the helper then keeps none of ours
/// (engines read exec's output until EOF in that case).
fn detach(args: &liboci_cli::Exec, console: bool) -> anyhow::Result<ExitCode> {
    let (r, w) = nix::unistd::pipe().context("creating a pipe")?;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(&argv).env(ENV_READY_FD, w.as_raw_fd().to_string());
    if console {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the exec helper")?;
    drop(w);
    let mut message = String::new();
    File::from(r).read_to_string(&mut message)?;
    if message == "ok" {
        if let Some(pid_file) = &args.pid_file {
            write_pid_file(pid_file, child.id())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rest = message.strip_prefix("error ").unwrap_or(&message);
    let (code, error) = rest.split_once(' ').unwrap_or(("1", rest));
    Err(super::ExitWith {
        code: code.parse::<u8>().unwrap_or(1).max(1),
        message: error.to_string(),
    }
    .into())
}

/// The OCI process to run: `--process FILE`, or the container's process with the command
/// line's args, env, cwd, user and tty, as runc does.
fn build_process(args: &liboci_cli::Exec, bundle: &Path) -> anyhow::Result<Value> {
    if let Some(path) = &args.process {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading process file {}", path.display()))?;
        let process: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if process["args"].as_array().is_none_or(|a| a.is_empty()) {
            bail!("{}: args must not be empty", path.display());
        }
        return Ok(process);
    }
    if args.command.is_empty() {
        bail!("exec needs a command to run (or --process FILE)");
    }
    let spec: Value = std::fs::read_to_string(bundle.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let mut process = spec["process"].clone();
    if !process.is_object() {
        process = json!({"cwd": "/", "user": {"uid": 0, "gid": 0}, "env": []});
    }
    process["args"] = json!(args.command);
    process["terminal"] = args.tty.into();
    let mut env: Vec<Value> = process["env"].as_array().cloned().unwrap_or_default();
    for (k, v) in &args.env {
        env.retain(|e| e.as_str().is_none_or(|s| !s.starts_with(&format!("{k}="))));
        env.push(format!("{k}={v}").into());
    }
    process["env"] = env.into();
    if let Some(cwd) = &args.cwd {
        process["cwd"] = cwd.display().to_string().into();
    }
    if let Some((uid, gid)) = args.user {
        process["user"]["uid"] = uid.into();
        process["user"]["gid"] = gid.unwrap_or(0).into();
    }
    if !args.additional_gids.is_empty() {
        process["user"]["additionalGids"] = json!(args.additional_gids);
    }
    if args.no_new_privs {
        process["noNewPrivileges"] = true.into();
    }
    Ok(process)
}
