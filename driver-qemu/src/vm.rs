//! A running QEMU process.
//!
//! One thread per VM (the "reaper") spawns qemu and waits for it. Spawning from that thread
//! matters: `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so a child
//! spawned from a short-lived caller thread would be killed with it. The reaper lives exactly as
//! long as qemu, so qemu dies when the monitor process dies, and only then.
//!
//! The reaper first waits with `WNOWAIT` (qemu stays a zombie, its pid cannot be reused), then
//! takes the state lock and reaps. Signals are sent under the same lock and only while no exit
//! status is recorded, so a signal never reaches a recycled pid.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use runv_api::{Vm, VmExit, VmStats};

use crate::cmdline::VmPaths;
use crate::qmp::Qmp;

/// Prefix of the lines the driver itself writes into the log file (the rest is qemu's stderr).
pub const LOG_PREFIX: &str = "runv-driver-qemu:";

/// How long one QMP operation may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits after QMP `quit` before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// How long `stop` and `Drop` wait for the reaper after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct ProcState {
    /// Set once, by the reaper. `Err` when the status could not be collected.
    exit: Option<Result<ExitStatus, String>>,
    /// What the host did to end the VM, for the exit description.
    ended_by_host: Option<&'static str>,
}

struct Shared {
    state: Mutex<ProcState>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ProcState> {
        // A panic while holding the lock leaves consistent data (plain assignments).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until qemu has been reaped or `timeout` passed; true when reaped.
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

/// The last line qemu wrote to the log after `offset` (the driver's own lines skipped).
pub fn last_qemu_line(log_file: &Path, offset: u64) -> Option<String> {
    let mut f = File::open(log_file).ok()?;
    let len = f.metadata().ok()?.len();
    // Only the tail matters; never read an unbounded file.
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

fn describe_status(status: &Result<ExitStatus, String>, ended_by_host: Option<&str>) -> VmExit {
    match status {
        Err(e) => VmExit {
            code: -1,
            signal: 0,
            description: format!("qemu ended, status unknown: {e}").into(),
        },
        Ok(status) => {
            let code = status.code().unwrap_or(-1);
            let signal = status.signal().unwrap_or(0);
            let what = if signal != 0 {
                let name = Signal::try_from(signal)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {signal}"));
                match ended_by_host {
                    Some(how) => format!("{how}: qemu killed by {name}"),
                    None => format!("qemu killed by {name}"),
                }
            } else if let Some(how) = ended_by_host {
                how.to_string()
            } else if code == 0 {
                "the guest shut down".to_string()
            } else {
                format!("qemu exited with code {code}")
            };
            VmExit {
                code: if signal != 0 { 0 } else { code },
                signal,
                description: what.into(),
            }
        }
    }
}

pub struct QemuVm {
    pid: u32,
    shared: Arc<Shared>,
    paths: VmPaths,
    log_offset: u64,
    console_log: PathBuf,
    guest_memory_bytes: u64,
    agent: runv_api::AgentChannel,
    /// Serializes QMP operations: the QMP socket takes one client at a time.
    qmp: Mutex<()>,
}

impl QemuVm {
    /// Starts `program args` with stdout/stderr appended to the log file, and waits until qemu
    /// serves the agent socket and QMP (`start_timeout` in all). On failure qemu is killed and
    /// the error carries qemu's last stderr line.
    pub fn start(
        program: &Path,
        args: &[String],
        paths: VmPaths,
        console_log: PathBuf,
        guest_memory_bytes: u64,
        start_timeout: Duration,
    ) -> Result<Self, String> {
        for socket in [&paths.agent_socket, &paths.qmp_socket] {
            match fs::remove_file(socket) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing stale {}: {e}", socket.display())),
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

        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C aimed at the monitor's group does not reach qemu;
            // the monitor decides how the VM ends.
            .process_group(0);
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, getppid) and builds errors from raw errno values,
        // without allocating.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died between fork and prctl: then nobody would kill us.
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
            .name("qemu-reaper".into())
            .spawn(move || reaper(command, tx, reaper_shared))
            .map_err(|e| format!("starting the qemu reaper thread: {e}"))?;
        let pid = rx
            .recv()
            .map_err(|_| "the qemu reaper thread ended early".to_string())?
            .map_err(|e| format!("starting {}: {e}", program.display()))?;

        let vm = Self {
            pid,
            shared,
            paths,
            log_offset,
            console_log,
            guest_memory_bytes,
            agent: runv_api::AgentChannel::default(),
            qmp: Mutex::new(()),
        };
        // On error `vm` is dropped, which kills and reaps qemu.
        let agent = vm.connect_agent(Instant::now() + start_timeout)?;
        vm.agent.set(agent.into());
        Ok(vm)
    }

    /// Why qemu failed to start, from its stderr.
    fn early_exit_error(&self) -> String {
        // Give the reaper a moment to collect the status that goes with the message.
        self.shared.wait_exit(Duration::from_secs(2));
        let status = self.shared.lock().exit.clone();
        match last_qemu_line(&self.paths.log_file, self.log_offset) {
            Some(line) => line,
            None => match status {
                Some(status) => format!(
                    "qemu exited before the VM started ({})",
                    describe_status(&status, None).description
                ),
                None => "qemu stopped answering before the VM started".to_string(),
            },
        }
    }

    /// Waits for the agent socket to accept a connection, then for QMP to answer, which
    /// happens only once qemu has loaded the kernel and entered its main loop (a bad `-kernel`
    /// fails after the sockets exist). Polls every 10 ms, bounded by `deadline`, and notices
    /// qemu exiting at once.
    fn connect_agent(&self, deadline: Instant) -> Result<UnixStream, String> {
        let agent = loop {
            if self.shared.lock().exit.is_some() {
                return Err(self.early_exit_error());
            }
            match UnixStream::connect(&self.paths.agent_socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    return Err(format!(
                        "qemu did not open the agent socket {} in time: {e}",
                        self.paths.agent_socket.display()
                    ));
                }
            }
        };
        // qemu creates its sockets one after the other: under load (a nested guest starting
        // qemu from a slow filesystem) the QMP socket can appear well after the agent's.
        let status = loop {
            let remaining = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_default()
                .max(Duration::from_millis(100));
            match self.qmp_status_with(remaining) {
                Err(e)
                    if e.starts_with("connecting to QMP")
                        && Instant::now() < deadline
                        && self.shared.lock().exit.is_none() =>
                {
                    thread::sleep(Duration::from_millis(10))
                }
                other => break other,
            }
        };
        match status {
            Ok(status) if status == "running" => Ok(agent),
            Ok(status) => Err(format!("qemu started but the VM is {status}")),
            Err(qmp_error) => {
                if self.shared.lock().exit.is_some()
                    || self.shared.wait_exit(Duration::from_millis(500))
                {
                    Err(self.early_exit_error())
                } else {
                    Err(format!("qemu did not answer on QMP: {qmp_error}"))
                }
            }
        }
    }

    fn qmp_status_with(&self, timeout: Duration) -> Result<String, String> {
        let _guard = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        Qmp::connect(&self.paths.qmp_socket, timeout)?.status()
    }

    /// Runs one QMP command, unless qemu has exited.
    fn qmp_execute(&self, command: &str) -> Result<(), String> {
        if self.shared.lock().exit.is_some() {
            return Err("the VM has already exited".into());
        }
        let _guard = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        Qmp::connect(&self.paths.qmp_socket, QMP_TIMEOUT)?
            .execute(command, None)
            .map(drop)
    }

    /// `query-status` of the running VM, e.g. `running` or `paused`.
    pub fn qmp_status(&self) -> Result<String, String> {
        self.qmp_status_with(QMP_TIMEOUT)
    }

    /// Sends `signal` to qemu unless it has been reaped. Returns whether it was sent.
    fn signal(&self, signal: Signal, why: &'static str) -> bool {
        let mut state = self.shared.lock();
        if state.exit.is_some() {
            return false;
        }
        state.ended_by_host.get_or_insert(why);
        kill(Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_file(&self) -> &Path {
        &self.paths.log_file
    }
}

fn reaper(mut command: Command, tx: mpsc::Sender<std::io::Result<u32>>, shared: Arc<Shared>) {
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let pid = child.id();
    let _ = tx.send(Ok(pid));
    // Wait without reaping, so that the pid stays ours while signals may still be sent.
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
        // Someone else reaped it (e.g. a waitpid(-1) in the host process).
        Err(e) => Err(format!("waiting for qemu (pid {pid}): {e}")),
    };
    state.exit = Some(status);
    shared.changed.notify_all();
}

impl Vm for QemuVm {
    fn take_agent_channel(&self) -> Result<OwnedFd, String> {
        self.agent.take()
    }

    fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    fn pause(&self) -> Result<(), String> {
        self.qmp_execute("stop")
    }

    fn resume(&self) -> Result<(), String> {
        self.qmp_execute("cont")
    }

    /// Ends the VM. The guest has no ACPI power button handling, so the graceful part is the
    /// core's: it asks the agent to shut down (the agent reboots, which ends qemu because of
    /// `-no-reboot`) and then calls `stop`. `stop`:
    ///
    /// 1. waits up to `timeout` for qemu to exit by itself;
    /// 2. then asks qemu to quit through QMP `quit` and waits up to 3 s;
    /// 3. then sends SIGKILL and waits for the reaper.
    ///
    /// Returns once qemu has been reaped. Safe to call from several threads and after exit.
    fn stop(&self, timeout: Duration) -> Result<(), String> {
        if self.shared.wait_exit(timeout) {
            return Ok(());
        }
        let quit_sent = {
            let mut state = self.shared.lock();
            if state.exit.is_some() {
                return Ok(());
            }
            state
                .ended_by_host
                .get_or_insert("stopped by the host (QMP quit)");
            drop(state);
            self.qmp_execute("quit")
        };
        if quit_sent.is_ok() && self.shared.wait_exit(QUIT_GRACE) {
            return Ok(());
        }
        self.signal(
            Signal::SIGKILL,
            "killed by the host: the guest did not stop in time",
        );
        if self.shared.wait_exit(KILL_GRACE) {
            Ok(())
        } else {
            Err(format!(
                "qemu (pid {}) did not exit after SIGKILL",
                self.pid
            ))
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
            if let Some(line) = last_qemu_line(&self.paths.log_file, self.log_offset) {
                exit.description = format!("{}: {line}", exit.description).into();
            }
        }
        Ok(exit)
    }

    fn pids(&self) -> Vec<u32> {
        if self.shared.lock().exit.is_some() {
            Vec::new()
        } else {
            vec![self.pid]
        }
    }

    fn stats(&self) -> Result<VmStats, String> {
        let path = format!("/proc/{}/smaps_rollup", self.pid);
        let text = {
            let state = self.shared.lock();
            if state.exit.is_some() {
                return Err("the VM has exited".into());
            }
            // Read under the lock: the pid cannot be reaped (and reused) meanwhile.
            fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?
        };
        let (rss, pss) = runv_api::parse_smaps_rollup(&text);
        Ok(VmStats {
            host_rss_bytes: rss,
            host_pss_bytes: pss,
            guest_memory_bytes: self.guest_memory_bytes,
        })
    }
}

impl Drop for QemuVm {
    /// A VM does not outlive its handle: qemu is killed and reaped.
    fn drop(&mut self) {
        if self.signal(
            Signal::SIGKILL,
            "killed by the host: the VM handle was dropped",
        ) {
            self.shared.wait_exit(KILL_GRACE);
        }
        let state = self.shared.lock();
        if let Some(status) = &state.exit {
            let exit = describe_status(status, state.ended_by_host);
            log_line(
                &self.paths.log_file,
                &format!("qemu (pid {}) ended: {}", self.pid, exit.description),
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
        assert_eq!((ok.code, ok.signal), (0, 0));
        assert_eq!(ok.description.as_str(), "the guest shut down");
        let killed = describe_status(&Ok(ExitStatus::from_raw(9)), Some("killed by the host"));
        assert_eq!((killed.code, killed.signal), (0, 9));
        assert!(killed.description.as_str().contains("SIGKILL"));
        let failed = describe_status(&Ok(ExitStatus::from_raw(1 << 8)), None);
        assert_eq!(failed.code, 1);
        assert_eq!(failed.description.as_str(), "qemu exited with code 1");
    }

    #[test]
    fn last_line_skips_driver_lines_and_old_output() {
        let dir = std::env::temp_dir().join(format!("runv-qemu-log-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("qemu.log");
        fs::write(&log, "old: error from an earlier run\n").unwrap();
        let offset = fs::metadata(&log).unwrap().len();
        assert_eq!(last_qemu_line(&log, offset), None);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(
            f,
            "qemu-system-x86_64: -kernel /x: No such file or directory\n"
        )
        .unwrap();
        drop(f);
        log_line(&log, "qemu ended");
        assert_eq!(
            last_qemu_line(&log, offset).as_deref(),
            Some("qemu-system-x86_64: -kernel /x: No such file or directory")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
