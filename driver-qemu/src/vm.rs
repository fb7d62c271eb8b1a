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

use std::fs::{self, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use runv_api::vmm_process::{EarlyExit, KILL_GRACE, VmmProcess, VmmTool};
use runv_api::{Vm, VmExit, VmStats};

use crate::cmdline::VmPaths;
use crate::jail::Jail;
use crate::qmp::Qmp;

/// Prefix of the lines the driver itself writes into the log file (the rest is qemu's stderr).
pub const LOG_PREFIX: &str = "runv-driver-qemu:";

/// How long one QMP operation may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits after QMP `quit` before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// How long the agent may take to boot and connect over vsock (a guest whose agent gives
/// up powers off, which ends the wait sooner).
const VSOCK_AGENT_TIMEOUT: Duration = Duration::from_secs(120);

static QEMU: VmmTool = VmmTool {
    name: "qemu",
    log_prefix: LOG_PREFIX,
};

/// Appends one diagnostic line to the driver log file (best effort).
pub fn log_line(log_file: &Path, message: &str) {
    QEMU.log_line(log_file, message)
}

/// The last line qemu wrote to the log after `offset` (the driver's own lines skipped).
pub fn last_qemu_line(log_file: &Path, offset: u64) -> Option<String> {
    QEMU.last_tool_line(log_file, offset)
}

pub struct QemuVm {
    process: VmmProcess,
    paths: VmPaths,
    console_log: PathBuf,
    guest_memory_bytes: u64,
    agent: runv_api::AgentChannel,
    /// The vsock the agent connects to, until [`Vm::take_agent_channel`] accepts it.
    agent_vsock: Mutex<Option<crate::vsock::Vsock>>,
    /// Serializes QMP operations: the QMP socket takes one client at a time.
    qmp: Mutex<()>,
}

impl QemuVm {
    /// Starts `program args` with stdout/stderr appended to the log file, and waits until qemu
    /// serves the agent socket and QMP (`start_timeout` in all). On failure qemu is killed and
    /// the error carries qemu's last stderr line. qemu enters `jail` before exec and inherits
    /// `fds` (open taps named by fd on its command line).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        program: &Path,
        args: &[String],
        jail: Option<Jail>,
        fds: Vec<OwnedFd>,
        agent_vsock: Option<crate::vsock::Vsock>,
        paths: VmPaths,
        console_log: PathBuf,
        guest_memory_bytes: u64,
        start_timeout: Duration,
        restoring: bool,
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
            .stderr(log_err);
        let raw_fds: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: the closure runs in the forked child before exec and makes system calls
        // only (fcntl, and the jail's, on strings prepared before the fork): no allocation.
        unsafe {
            command.pre_exec(move || {
                for fd in &raw_fds {
                    crate::tap::inherit(*fd)?;
                }
                match &jail {
                    Some(jail) => jail.enter(),
                    None => Ok(()),
                }
            });
        }
        let process = VmmProcess::spawn(&QEMU, command, paths.log_file.clone(), log_offset)?;
        // qemu has its copies now.
        drop(fds);

        let over_vsock = agent_vsock.is_some();
        let vm = Self {
            process,
            paths,
            console_log,
            guest_memory_bytes,
            agent: runv_api::AgentChannel::default(),
            agent_vsock: Mutex::new(agent_vsock),
            qmp: Mutex::new(()),
        };
        // On error `vm` is dropped, which kills and reaps qemu.
        // A VM being restored waits for its state (`-incoming defer`): that is its status.
        let expected = if restoring { "inmigrate" } else { "running" };
        if let Some(agent) =
            vm.connect_agent(Instant::now() + start_timeout, expected, !over_vsock)?
        {
            vm.agent.set(agent.into());
        }
        Ok(vm)
    }

    /// Why qemu failed to start, from its stderr.
    fn early_exit_error(&self) -> String {
        match self.process.early_exit() {
            EarlyExit::LastLine(line) => line,
            EarlyExit::Status(how) => format!("qemu exited before the VM started ({how})"),
            EarlyExit::NotReaped => "qemu stopped answering before the VM started".to_string(),
        }
    }

    /// Waits for the agent socket to accept a connection, then for QMP to answer, which
    /// happens only once qemu has loaded the kernel and entered its main loop (a bad `-kernel`
    /// fails after the sockets exist). Polls every 10 ms, bounded by `deadline`, and notices
    /// qemu exiting at once.
    fn connect_agent(
        &self,
        deadline: Instant,
        expected: &str,
        agent_socket: bool,
    ) -> Result<Option<UnixStream>, String> {
        let agent = agent_socket.then(|| {
            loop {
                if self.process.has_exited() {
                    return Err(self.early_exit_error());
                }
                match UnixStream::connect(&self.paths.agent_socket) {
                    Ok(stream) => break Ok(stream),
                    Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                    Err(e) => {
                        break Err(format!(
                            "qemu did not open the agent socket {} in time: {e}",
                            self.paths.agent_socket.display()
                        ));
                    }
                }
            }
        });
        let agent = agent.transpose()?;
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
                        && !self.process.has_exited() =>
                {
                    thread::sleep(Duration::from_millis(10))
                }
                other => break other,
            }
        };
        match status {
            Ok(status) if status == expected => Ok(agent),
            Ok(status) => Err(format!("qemu started but the VM is {status}")),
            Err(qmp_error) => {
                if self.process.has_exited() || self.process.wait_exit(Duration::from_millis(500)) {
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
        if self.process.has_exited() {
            return Err("the VM has already exited".into());
        }
        let _guard = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        Qmp::connect(&self.paths.qmp_socket, QMP_TIMEOUT)?
            .execute(command, None)
            .map(drop)
    }

    /// Runs one QMP command with arguments and returns its `return` value, unless qemu has
    /// exited.
    pub(crate) fn qmp_call(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        if self.process.has_exited() {
            return Err("the VM has already exited".into());
        }
        let _guard = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        Qmp::connect(&self.paths.qmp_socket, QMP_TIMEOUT)?.execute(command, arguments)
    }

    /// Hands `file` to qemu as `name` and runs one command (which names it as `fd:NAME`) on
    /// the same QMP connection, unless qemu has exited.
    pub(crate) fn qmp_call_with_file(
        &self,
        name: &str,
        file: &std::fs::File,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        if self.process.has_exited() {
            return Err("the VM has already exited".into());
        }
        let _guard = self.qmp.lock().unwrap_or_else(|e| e.into_inner());
        let mut qmp = Qmp::connect(&self.paths.qmp_socket, QMP_TIMEOUT)?;
        qmp.send_fd(name, std::os::fd::AsFd::as_fd(file))?;
        qmp.execute(command, arguments)
    }

    /// Whether qemu has exited, and why, from its stderr.
    pub(crate) fn exit_error(&self) -> Option<String> {
        self.process.has_exited().then(|| self.early_exit_error())
    }

    /// `query-status` of the running VM, e.g. `running` or `paused`.
    pub fn qmp_status(&self) -> Result<String, String> {
        self.qmp_status_with(QMP_TIMEOUT)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_file(&self) -> &Path {
        &self.paths.log_file
    }
}

impl Vm for QemuVm {
    /// Over vsock this waits for the agent to connect (until it does, the VM ends, or
    /// [`VSOCK_AGENT_TIMEOUT`] passes).
    fn take_agent_channel(&self) -> Result<OwnedFd, String> {
        let vsock = self
            .agent_vsock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match vsock {
            Some(v) => v.accept(Instant::now() + VSOCK_AGENT_TIMEOUT, || {
                self.process.has_exited()
            }),
            None => self.agent.take(),
        }
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
        self.process.stop(
            timeout,
            "stopped by the host (QMP quit)",
            || self.qmp_execute("quit").is_ok(),
            QUIT_GRACE,
            "killed by the host: the guest did not stop in time",
        )
    }

    fn wait(&self) -> Result<VmExit, String> {
        Ok(self.process.wait())
    }

    fn pids(&self) -> Vec<u32> {
        self.process.pids()
    }

    fn stats(&self) -> Result<VmStats, String> {
        self.process.stats(self.guest_memory_bytes)
    }

    fn save(&self, dir: &Path) -> Result<(), String> {
        crate::template::save(self, dir)
    }
}

impl Drop for QemuVm {
    /// A VM does not outlive its handle: qemu is killed and reaped.
    fn drop(&mut self) {
        if self
            .process
            .kill("killed by the host: the VM handle was dropped")
        {
            self.process.wait_exit(KILL_GRACE);
        }
        if let Some(exit) = self.process.ended() {
            log_line(
                &self.paths.log_file,
                &format!(
                    "qemu (pid {}) ended: {}",
                    self.process.pid(),
                    exit.description
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn exit_descriptions() {
        let ok = QEMU.describe_status(&Ok(ExitStatus::from_raw(0)), None);
        assert_eq!((ok.code, ok.signal), (0, 0));
        assert_eq!(ok.description.as_str(), "the guest shut down");
        let killed = QEMU.describe_status(&Ok(ExitStatus::from_raw(9)), Some("killed by the host"));
        assert_eq!((killed.code, killed.signal), (0, 9));
        assert!(killed.description.as_str().contains("SIGKILL"));
        let failed = QEMU.describe_status(&Ok(ExitStatus::from_raw(1 << 8)), None);
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
