//! A Xen domain run through xl.
//!
//! * `xl create -F -p CONFIG`: the domain is built paused and this xl process stays in the
//!   foreground until the domain dies, so it is the VM's process: one reaper thread per VM
//!   spawns and waits for it (spawning from that thread matters: `PR_SET_PDEATHSIG` fires when
//!   the spawning *thread* exits). Its exit status is the VM's end.
//! * The agent channel is an xl `channel` with `connection=socket`: the device model listens on
//!   a unix socket in the state dir; the driver connects and hands the stream over.
//! * `xl console -t pv NAME`, with stdout appended to the console log, copies the guest's PV
//!   console (hvc0); it is started before `xl unpause` so the whole boot is captured.
//! * pause/resume: `xl pause|unpause NAME`; stop: `xl destroy NAME`, then SIGKILL for xl.
//! * A Xen domain is not a host process: if the monitor is killed outright, xl dies with it but
//!   the domain stays until `xl destroy runv-<id>`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use runv_api::{Vm, VmExit, VmStats};

use crate::domcfg::DomainPaths;

/// Prefix of the lines the driver itself writes into the log file (the rest is xl's output).
pub const LOG_PREFIX: &str = "runv-driver-xen:";

const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after `xl destroy` before SIGKILL of xl.
const DESTROY_GRACE: Duration = Duration::from_secs(10);
const KILL_GRACE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct ProcState {
    exit: Option<Result<ExitStatus, String>>,
    ended_by_host: Option<&'static str>,
}

struct Shared {
    state: Mutex<ProcState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while state.exit.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// Appends one diagnostic line to the driver log file (best effort).
pub fn log_line(log_file: &Path, message: &str) {
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log_file) {
        let _ = writeln!(f, "{LOG_PREFIX} {message}");
    }
}

/// The last line xl wrote to the log after `offset` (the driver's own lines skipped).
pub fn last_tool_line(log_file: &Path, offset: u64) -> Option<String> {
    let mut f = File::open(log_file).ok()?;
    let len = f.metadata().ok()?.len();
    let start = offset.max(len.saturating_sub(64 * 1024));
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    String::from_utf8_lossy(&buf)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with(LOG_PREFIX))
        .map(str::to_string)
}

/// How the domain ended, from the status of `xl create -F`.
pub fn describe_status(status: &Result<ExitStatus, String>, ended_by_host: Option<&str>) -> VmExit {
    match status {
        Err(e) => VmExit {
            code: -1,
            signal: 0,
            description: format!("xl ended, status unknown: {e}").into(),
        },
        Ok(status) => {
            let code = status.code().unwrap_or(-1);
            let signal = status.signal().unwrap_or(0);
            let what = if signal != 0 {
                let name = Signal::try_from(signal)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {signal}"));
                match ended_by_host {
                    Some(how) => format!("{how}: xl killed by {name}"),
                    None => format!("xl killed by {name}"),
                }
            } else if let Some(how) = ended_by_host {
                how.to_string()
            } else if code == 0 {
                "the guest shut down".to_string()
            } else {
                format!("xl exited with code {code}")
            };
            VmExit {
                code: if signal != 0 { 0 } else { code },
                signal,
                description: what.into(),
            }
        }
    }
}

/// Runs a short xl command; its stdout on success, its last output line otherwise.
pub fn run_xl(xl: &Path, args: &[&str]) -> Result<String, String> {
    let what = format!("xl {}", args.join(" "));
    let mut child = Command::new(xl)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {what}: {e}"))?;
    let deadline = Instant::now() + CONTROL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish in {CONTROL_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_string(&mut err);
    }
    if status.success() {
        Ok(out)
    } else {
        let why = err
            .lines()
            .chain(out.lines())
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| status.to_string());
        Err(format!("{what} failed: {why}"))
    }
}

/// What [`XenVm::start`] needs.
pub struct StartSpec {
    pub xl: PathBuf,
    pub paths: DomainPaths,
    pub console_log: PathBuf,
    pub guest_memory_bytes: u64,
    pub start_timeout: Duration,
}

pub struct XenVm {
    pid: u32,
    shared: Arc<Shared>,
    xl: PathBuf,
    paths: DomainPaths,
    log_offset: u64,
    console_log: PathBuf,
    guest_memory_bytes: u64,
    agent: runv_api::AgentChannel,
    console: Mutex<Option<Child>>,
}

impl XenVm {
    /// Creates the domain paused from `paths.config_file` (already written), connects the
    /// agent channel, starts the console copy and unpauses the domain.
    pub fn start(spec: StartSpec) -> Result<Self, String> {
        let StartSpec {
            xl,
            paths,
            console_log,
            guest_memory_bytes,
            start_timeout,
        } = spec;
        let deadline = Instant::now() + start_timeout;
        match fs::remove_file(&paths.agent_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "removing stale {}: {e}",
                    paths.agent_socket.display()
                ));
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.log_file)
            .map_err(|e| format!("opening {}: {e}", paths.log_file.display()))?;
        let log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log_err = log
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", paths.log_file.display()))?;

        let mut command = Command::new(&xl);
        command
            .arg("create")
            .arg("-F")
            .arg("-p")
            .arg(&paths.config_file)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0);
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, getppid), without allocating.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    return Err(nix::errno::Errno::ESRCH.into());
                }
                Ok(())
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(ProcState::default()),
            changed: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel();
        let reaper_shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("xl-reaper".into())
            .spawn(move || reaper(command, tx, reaper_shared))
            .map_err(|e| format!("starting the xl reaper thread: {e}"))?;
        let pid = rx
            .recv()
            .map_err(|_| "the xl reaper thread ended early".to_string())?
            .map_err(|e| format!("starting {}: {e}", xl.display()))?;

        let vm = Self {
            pid,
            shared,
            xl,
            paths,
            log_offset,
            console_log,
            guest_memory_bytes,
            agent: runv_api::AgentChannel::default(),
            console: Mutex::new(None),
        };
        // From here on an error drops `vm`, which destroys the domain and kills xl.
        let agent = vm.connect_agent(deadline)?;
        vm.agent.set(agent.into());
        vm.start_console()?;
        run_xl(&vm.xl, &["unpause", &vm.paths.domain_name])?;
        Ok(vm)
    }

    /// Waits for the device model's agent socket to accept a connection.
    fn connect_agent(&self, deadline: Instant) -> Result<UnixStream, String> {
        loop {
            if self.shared.lock().exit.is_some() {
                return Err(self.early_exit_error());
            }
            match UnixStream::connect(&self.paths.agent_socket) {
                Ok(stream) => return Ok(stream),
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    return Err(format!(
                        "xl did not open the agent channel socket {} in time: {e}",
                        self.paths.agent_socket.display()
                    ));
                }
            }
        }
    }

    /// `xl console -t pv NAME` appending to the console log.
    fn start_console(&self) -> Result<(), String> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.console_log)
            .map_err(|e| format!("opening {}: {e}", self.console_log.display()))?;
        let err = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.paths.log_file)
            .map_err(|e| format!("opening {}: {e}", self.paths.log_file.display()))?;
        let child = Command::new(&self.xl)
            .args(["console", "-t", "pv", &self.paths.domain_name])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("running xl console: {e}"))?;
        *self.console.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    fn early_exit_error(&self) -> String {
        self.shared.wait_exit(Duration::from_secs(2));
        let status = self.shared.lock().exit.clone();
        match last_tool_line(&self.paths.log_file, self.log_offset) {
            Some(line) => format!("xl create failed: {line}"),
            None => match status {
                Some(status) => format!(
                    "xl create exited before the domain started ({})",
                    describe_status(&status, None).description
                ),
                None => "xl create stopped before the domain started".to_string(),
            },
        }
    }

    fn xl_on_domain(&self, verb: &str) -> Result<(), String> {
        if self.shared.lock().exit.is_some() {
            return Err("the VM has already exited".into());
        }
        run_xl(&self.xl, &[verb, &self.paths.domain_name]).map(drop)
    }

    fn signal(&self, signal: Signal, why: &'static str) -> bool {
        let mut state = self.shared.lock();
        if state.exit.is_some() {
            return false;
        }
        state.ended_by_host.get_or_insert(why);
        kill(Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    pub fn domain_name(&self) -> &str {
        &self.paths.domain_name
    }
}

fn reaper(mut command: Command, tx: mpsc::Sender<std::io::Result<u32>>, shared: Arc<Shared>) {
    let spawned = command.spawn();
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let pid = child.id();
    let _ = tx.send(Ok(pid));
    let waited = loop {
        match waitid(
            Id::Pid(Pid::from_raw(pid as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    let mut state = shared.lock();
    let status = match waited {
        Ok(_) => child.wait().map_err(|e| e.to_string()),
        Err(e) => Err(format!("waiting for xl (pid {pid}): {e}")),
    };
    state.exit = Some(status);
    shared.changed.notify_all();
}

impl Vm for XenVm {
    fn take_agent_channel(&self) -> Result<OwnedFd, String> {
        self.agent.take()
    }

    fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    fn pause(&self) -> Result<(), String> {
        self.xl_on_domain("pause")
    }

    fn resume(&self) -> Result<(), String> {
        self.xl_on_domain("unpause")
    }

    /// Waits up to `timeout` for the domain to end by itself (the core asks the agent first),
    /// then `xl destroy`, then SIGKILL for xl.
    fn stop(&self, timeout: Duration) -> Result<(), String> {
        if self.shared.wait_exit(timeout) {
            return Ok(());
        }
        {
            let mut state = self.shared.lock();
            if state.exit.is_some() {
                return Ok(());
            }
            state
                .ended_by_host
                .get_or_insert("destroyed by the host (xl destroy)");
        }
        if let Err(e) = run_xl(&self.xl, &["destroy", &self.paths.domain_name]) {
            log_line(&self.paths.log_file, &format!("warning: {e}"));
        }
        if self.shared.wait_exit(DESTROY_GRACE) {
            return Ok(());
        }
        self.signal(Signal::SIGKILL, "killed by the host: xl did not exit");
        if self.shared.wait_exit(KILL_GRACE) {
            Ok(())
        } else {
            Err(format!("xl (pid {}) did not exit after SIGKILL", self.pid))
        }
    }

    fn wait(&self) -> Result<VmExit, String> {
        let mut state = self.shared.lock();
        while state.exit.is_none() {
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let status = state
            .exit
            .clone()
            .unwrap_or_else(|| Err("no status".into()));
        let mut exit = describe_status(&status, state.ended_by_host);
        drop(state);
        if exit.code != 0 {
            if let Some(line) = last_tool_line(&self.paths.log_file, self.log_offset) {
                exit.description = format!("{}: {line}", exit.description).into();
            }
        }
        Ok(exit)
    }

    /// The `xl create -F` process (the domain itself is not a host process).
    fn pids(&self) -> Vec<u32> {
        if self.shared.lock().exit.is_some() {
            Vec::new()
        } else {
            vec![self.pid]
        }
    }

    /// Guest memory belongs to Xen, not to a host process: host RSS/PSS are reported as 0.
    fn stats(&self) -> Result<VmStats, String> {
        if self.shared.lock().exit.is_some() {
            return Err("the VM has exited".into());
        }
        Ok(VmStats {
            host_rss_bytes: 0,
            host_pss_bytes: 0,
            guest_memory_bytes: self.guest_memory_bytes,
        })
    }
}

impl Drop for XenVm {
    /// A domain does not outlive its handle: destroyed, xl reaped, the console copy ended.
    fn drop(&mut self) {
        if self.shared.lock().exit.is_none() {
            self.shared
                .lock()
                .ended_by_host
                .get_or_insert("destroyed by the host: the VM handle was dropped");
            if let Err(e) = run_xl(&self.xl, &["destroy", &self.paths.domain_name]) {
                log_line(&self.paths.log_file, &format!("warning: {e}"));
            }
            if !self.shared.wait_exit(DESTROY_GRACE)
                && self.signal(Signal::SIGKILL, "killed by the host: xl did not exit")
            {
                self.shared.wait_exit(KILL_GRACE);
            }
        }
        if let Some(mut console) = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = console.kill();
            let _ = console.wait();
        }
        let state = self.shared.lock();
        if let Some(status) = &state.exit {
            let exit = describe_status(status, state.ended_by_host);
            log_line(
                &self.paths.log_file,
                &format!(
                    "domain {} (xl pid {}) ended: {}",
                    self.paths.domain_name, self.pid, exit.description
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions() {
        let ok = describe_status(&Ok(ExitStatus::from_raw(0)), None);
        assert_eq!(ok.description.as_str(), "the guest shut down");
        let destroyed = describe_status(
            &Ok(ExitStatus::from_raw(0)),
            Some("destroyed by the host (xl destroy)"),
        );
        assert_eq!(
            destroyed.description.as_str(),
            "destroyed by the host (xl destroy)"
        );
        let failed = describe_status(&Ok(ExitStatus::from_raw(3 << 8)), None);
        assert_eq!(
            (failed.code, failed.description.as_str()),
            (3, "xl exited with code 3")
        );
        let killed = describe_status(&Ok(ExitStatus::from_raw(9)), None);
        assert_eq!((killed.code, killed.signal), (0, 9));
    }

    #[test]
    fn xl_errors_carry_the_last_line() {
        let err = run_xl(Path::new("/nonexistent/xl"), &["list"]).unwrap_err();
        assert!(err.contains("running xl list"), "{err}");
        // `sh -c` stands in for a failing xl: its last stderr line is the reason.
        let err = run_xl(
            Path::new("/bin/sh"),
            &["-c", "echo 'libxl: error: no such domain' >&2; exit 1"],
        )
        .unwrap_err();
        assert!(err.ends_with("libxl: error: no such domain"), "{err}");
        assert_eq!(
            run_xl(Path::new("/bin/sh"), &["-c", "echo ok"]).unwrap(),
            "ok\n"
        );
    }
}
