//! `runv create`: checks everything it can, then starts the container's monitor and waits
//! until the VM is up and the container created in it (its init blocked until `start`).

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::context::Ctx;
use crate::bundle::{self, Bundle};
use crate::container_id;
use crate::monitor::{self, MonitorConfig};
use crate::state::{ContainerState, RunvDetails, Status};

pub struct CreateArgs<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub console_socket: Option<&'a Path>,
    pub pid_file: Option<&'a Path>,
}

pub const ENV_AGENT_TIMEOUT: &str = "RUNV_AGENT_TIMEOUT";
const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 60;

pub fn run(ctx: &Ctx, args: &CreateArgs) -> anyhow::Result<()> {
    let child = create(ctx, args)?;
    // The monitor outlives us; it is reaped by whoever adopts it (the engine's shim).
    drop(child);
    Ok(())
}

/// Creates the container and returns its monitor process.
pub fn create(ctx: &Ctx, args: &CreateArgs) -> anyhow::Result<Child> {
    create_keep(ctx, args, false)
}

/// [`create`]; with `keep` (`run --keep`) a failed create leaves its state dir, marked
/// stopped, for `runv delete`; without, its logs are moved out (see [`keep_failure_logs`]).
pub fn create_keep(ctx: &Ctx, args: &CreateArgs, keep: bool) -> anyhow::Result<Child> {
    container_id::validate(args.id)?;
    let bundle = Bundle::load(args.bundle)?;
    if bundle.terminal && args.console_socket.is_none() {
        bail!("the spec has process.terminal set, so --console-socket is required");
    }
    let registry = ctx.registry();
    let hypervisor = registry.choose_hypervisor(ctx.opts.driver.as_deref())?;
    let storage = registry.choose_storage(ctx.opts.storage.as_deref())?;
    let info = hypervisor.client.info();
    let vm = bundle.vm_section();
    let (kernel, initrd) = bundle::guest_files(&ctx.opts, &vm, &ctx.host)?;
    let (vcpus, memory_mib) = bundle.vm_size(ctx.host.vcpus.value, ctx.host.memory_mib.value);

    let parameters = hypervisor_parameters(ctx, info.name.as_str(), &vm)?;
    let kernel_params = kernel_params(&vm, ctx.debug);
    let agent_timeout_secs = agent_timeout()?;
    let pod = match crate::pod::role(&bundle.annotations()) {
        crate::pod::Role::Alone => monitor::config::PodConfig::Alone,
        crate::pod::Role::Sandbox => monitor::config::PodConfig::Sandbox,
        crate::pod::Role::Member { sandbox } => {
            // Said now, in create's own words, rather than by a monitor that cannot start.
            monitor::sandbox_dir(&ctx.store, &sandbox)?;
            monitor::config::PodConfig::Member { sandbox }
        }
    };
    let member = matches!(pod, monitor::config::PodConfig::Member { .. });

    // Unix socket paths (control, agent, QMP) are limited to 107 bytes; longer ones (docker:
    // 64-character ids under /run/docker/runtime-runc/moby) go through
    // `control::short_socket_path`, so any id engines use works.
    let dir = ctx.store.create_dir(args.id)?;
    let result = (|| {
        let state = ContainerState {
            oci_version: bundle.oci_version(),
            id: args.id.to_string(),
            status: Status::Creating,
            pid: 0,
            bundle: bundle.dir.display().to_string(),
            annotations: bundle.annotations(),
            created: crate::logging::rfc3339_now(),
            owner: "root".into(),
            runv: RunvDetails {
                driver: info.name.to_string(),
                driver_file: hypervisor.file.display().to_string(),
                // A pod member's rootfs is shared into the pod's VM as it is.
                storage: storage
                    .filter(|_| !member)
                    .map(|s| s.client.info().name.to_string()),
                rootfs: bundle.rootfs.display().to_string(),
                pod_sandbox: match &pod {
                    monitor::config::PodConfig::Member { sandbox } => Some(sandbox.clone()),
                    _ => None,
                },
                ..RunvDetails::default()
            },
        };
        ctx.store.save(&state)?;
        let config = MonitorConfig {
            id: args.id.to_string(),
            root: ctx.store.root().to_path_buf(),
            bundle: bundle.dir.clone(),
            console_socket: args.console_socket.map(absolute).transpose()?,
            driver_dirs: ctx
                .opts
                .driver_dirs
                .iter()
                .map(|d| absolute(d))
                .collect::<Result<_, _>>()?,
            driver: info.name.to_string(),
            storage: ctx.opts.storage.clone().filter(|_| !member),
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            kernel_params,
            parameters,
            vcpus,
            memory_mib,
            netns: bundle.netns_path(),
            log: ctx.log.as_deref().map(absolute).transpose()?,
            log_format: ctx.log_format.clone(),
            debug: ctx.debug,
            agent_timeout_secs,
            systemd_cgroup: ctx.systemd_cgroup,
            template: crate::templates::Mode::parse(ctx.opts.template.as_deref())?,
            template_dir: absolute(&crate::templates::store_dir(
                ctx.opts.template_dir.as_deref(),
            ))?,
            pod: pod.clone(),
        };
        config.save(&dir)?;
        let child = spawn_monitor(
            &dir,
            bundle.terminal,
            Duration::from_secs(agent_timeout_secs + 60),
            ctx.host.log_level.value.as_deref(),
        )?;
        if let Some(pid_file) = args.pid_file {
            write_pid_file(pid_file, child.id())?;
        }
        if !member {
            crate::templates::build::spawn_wanted(&dir);
        }
        Ok(child)
    })();
    match result {
        Ok(child) => Ok(child),
        Err(e) if keep => {
            let _ = ctx.store.update(args.id, |s| s.status = Status::Stopped);
            Err(anyhow::anyhow!(
                "{e:#} (state kept in {}: runv delete {} removes it)",
                dir.display(),
                args.id
            ))
        }
        Err(e) => {
            // The state dir goes: keep its logs where the error can name them.
            let kept = ctx.store.keep_failed_logs(args.id);
            // The monitor may have joined the host cgroup before it failed.
            crate::host_cgroup::remove(&bundle.spec, args.id, ctx.systemd_cgroup);
            let _ = ctx.store.remove(args.id);
            let message = format!("{e:#}");
            match kept {
                Some(kept) => {
                    let kept = kept.display().to_string();
                    let message = message.replace(&dir.display().to_string(), &kept);
                    if message.contains(&kept) {
                        bail!("{message}")
                    }
                    bail!("{message} (logs kept in {kept})")
                }
                None => Err(e),
            }
        }
    }
}

/// `RUNV_AGENT_TIMEOUT` (seconds), or the default. A value that is not a positive number is
/// an error: silently using the default would hide the typo.
/// The guest kernel parameters for a container (and for the templates of its shape).
pub fn kernel_params(vm: &bundle::VmSection, debug: bool) -> String {
    let mut kernel_params = vm.kernel_params.clone();
    if debug {
        // The kernel rate-limits /dev/kmsg writers to 10 lines per 5 s, which would drop the
        // agent's debug lines.
        kernel_params.push_str(" runv.log=debug printk.devkmsg=on");
    }
    kernel_params
}

pub fn agent_timeout() -> anyhow::Result<u64> {
    match std::env::var(ENV_AGENT_TIMEOUT) {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_AGENT_TIMEOUT_SECS),
        Err(std::env::VarError::NotUnicode(v)) => {
            bail!("invalid {ENV_AGENT_TIMEOUT} {v:?}: want a number of seconds")
        }
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if (1..=86_400).contains(&n) => Ok(n),
            _ => {
                bail!("invalid {ENV_AGENT_TIMEOUT} {v:?}: want a number of seconds from 1 to 86400")
            }
        },
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

pub fn write_pid_file(path: &Path, pid: u32) -> anyhow::Result<()> {
    let path = absolute(path)?;
    let tmp = path.with_extension("runv-tmp");
    fs::write(&tmp, pid.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("writing pid file {}", path.display()))
}

/// Starts `runv __monitor DIR` with our stdio and waits until it reports ready or failed.
/// With a terminal the container's stdio is the pty, and the monitor must not hold ours:
/// engines (go-runc) read create's output until EOF when a console socket is used.
fn spawn_monitor(
    dir: &Path,
    terminal: bool,
    timeout: Duration,
    log_level: Option<&str>,
) -> anyhow::Result<Child> {
    let (ready_r, ready_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg("__monitor").arg(dir);
    // The monitor logs at the level this runv resolved (it may come from the config file).
    if let Some(level) = log_level {
        cmd.env("RUNV_LOG_LEVEL", level);
    }
    if terminal {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
    }
    let ready_raw = ready_w.as_raw_fd();
    // SAFETY: the closure only calls async-signal-safe functions (setsid, dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if ready_raw == monitor::READY_FD {
                let flags = fcntl(ready_raw, FcntlArg::F_GETFD)?;
                let flags = FdFlag::from_bits_truncate(flags) - FdFlag::FD_CLOEXEC;
                fcntl(ready_raw, FcntlArg::F_SETFD(flags))?;
            } else if nix::libc::dup2(ready_raw, monitor::READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the container monitor")?;
    drop(ready_w);
    match read_ready(ready_r, timeout) {
        Ok(message) if message == "ok" => Ok(child),
        Ok(message) => {
            let _ = child.wait();
            let reason = message.strip_prefix("error ").unwrap_or(&message);
            if reason.is_empty() {
                bail!(
                    "the container monitor exited during setup (see {})",
                    dir.join("monitor.log").display()
                );
            }
            bail!("{reason}")
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn read_ready(fd: OwnedFd, timeout: Duration) -> anyhow::Result<String> {
    let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let n = poll(
        &mut pfd,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    )
    .context("waiting for the monitor")?;
    if n == 0 {
        bail!(
            "the container monitor did not get ready within {}s",
            timeout.as_secs()
        );
    }
    let mut message = String::new();
    fs::File::from(fd)
        .read_to_string(&mut message)
        .context("reading the monitor's report")?;
    Ok(message.trim().to_string())
}

/// The driver's parameters for a container: host defaults (file, env) first, the spec's over
/// them, `--accel` over all. Templates key on the same, so they use this too.
pub fn hypervisor_parameters(
    ctx: &Ctx,
    driver: &str,
    vm: &bundle::VmSection,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    // Host defaults (file, env) first, the spec's parameters over them, --accel over all.
    let mut parameters: std::collections::BTreeMap<String, String> = ctx
        .host
        .driver_parameters
        .get(driver)
        .map(|p| {
            p.iter()
                .map(|(k, s)| (k.clone(), s.value.clone()))
                .collect()
        })
        .unwrap_or_default();
    let accel_flag = matches!(ctx.host.accel.source, crate::host_config::Source::Flag(_));
    if let (Some(accel), false) = (&ctx.opts.accel, accel_flag) {
        parameters.insert("accel".into(), accel.clone());
    }
    parameters.extend(vm.hypervisor_params.clone());
    if let (Some(accel), true) = (&ctx.opts.accel, accel_flag) {
        if accel != "kvm" && accel != "tcg" {
            bail!("invalid --accel {accel:?}: want kvm or tcg");
        }
        parameters.insert("accel".into(), accel.clone());
    }
    if let Some(path) = &vm.hypervisor_path {
        parameters.insert(driver.to_string(), path.display().to_string());
    }
    Ok(parameters)
}
