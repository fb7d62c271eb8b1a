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

use std::fs::{self, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use runv_api::vmm_process::{self, EarlyExit, VmmProcess, VmmTool};
use runv_api::{Vm, VmExit, VmStats};

use crate::domcfg::DomainPaths;

/// Prefix of the lines the driver itself writes into the log file (the rest is xl's output).
pub const LOG_PREFIX: &str = "runv-driver-xen:";

const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after `xl destroy` before SIGKILL of xl.
const DESTROY_GRACE: Duration = Duration::from_secs(10);

static XL: VmmTool = VmmTool {
    name: "xl",
    log_prefix: LOG_PREFIX,
};

/// Appends one diagnostic line to the driver log file (best effort).
pub fn log_line(log_file: &Path, message: &str) {
    XL.log_line(log_file, message)
}

/// Runs a short xl command; its stdout on success, its last output line otherwise.
pub fn run_xl(xl: &Path, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new(xl);
    command.args(args);
    vmm_process::run_control(command, &format!("xl {}", args.join(" ")), CONTROL_TIMEOUT)
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
    process: VmmProcess,
    xl: PathBuf,
    paths: DomainPaths,
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
            .stderr(log_err);
        let process = VmmProcess::spawn(&XL, command, paths.log_file.clone(), log_offset)?;

        let vm = Self {
            process,
            xl,
            paths,
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
            if self.process.has_exited() {
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
        match self.process.early_exit() {
            EarlyExit::LastLine(line) => format!("xl create failed: {line}"),
            EarlyExit::Status(how) => {
                format!("xl create exited before the domain started ({how})")
            }
            EarlyExit::NotReaped => "xl create stopped before the domain started".to_string(),
        }
    }

    fn xl_on_domain(&self, verb: &str) -> Result<(), String> {
        if self.process.has_exited() {
            return Err("the VM has already exited".into());
        }
        run_xl(&self.xl, &[verb, &self.paths.domain_name]).map(drop)
    }

    /// `stop` with the host's reason as a parameter: a dropped handle says so in the exit.
    fn destroy(&self, timeout: Duration, how: &'static str) -> Result<(), String> {
        self.process.stop(
            timeout,
            how,
            || {
                if let Err(e) = run_xl(&self.xl, &["destroy", &self.paths.domain_name]) {
                    log_line(&self.paths.log_file, &format!("warning: {e}"));
                }
                // xl may still see the domain go even if destroy reported an error.
                true
            },
            DESTROY_GRACE,
            "killed by the host: xl did not exit",
        )
    }

    pub fn domain_name(&self) -> &str {
        &self.paths.domain_name
    }
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
        self.destroy(timeout, "destroyed by the host (xl destroy)")
    }

    fn wait(&self) -> Result<VmExit, String> {
        Ok(self.process.wait())
    }

    /// The `xl create -F` process (the domain itself is not a host process).
    fn pids(&self) -> Vec<u32> {
        self.process.pids()
    }

    /// Guest memory belongs to Xen, not to a host process: host RSS/PSS are reported as 0.
    fn stats(&self) -> Result<VmStats, String> {
        if self.process.has_exited() {
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
        let _ = self.destroy(
            Duration::ZERO,
            "destroyed by the host: the VM handle was dropped",
        );
        if let Some(mut console) = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = console.kill();
            let _ = console.wait();
        }
        if let Some(exit) = self.process.ended() {
            log_line(
                &self.paths.log_file,
                &format!(
                    "domain {} (xl pid {}) ended: {}",
                    self.paths.domain_name,
                    self.process.pid(),
                    exit.description
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;

    #[test]
    fn exit_descriptions() {
        let ok = XL.describe_status(&Ok(ExitStatus::from_raw(0)), None);
        assert_eq!(ok.description.as_str(), "the guest shut down");
        let destroyed = XL.describe_status(
            &Ok(ExitStatus::from_raw(0)),
            Some("destroyed by the host (xl destroy)"),
        );
        assert_eq!(
            destroyed.description.as_str(),
            "destroyed by the host (xl destroy)"
        );
        let failed = XL.describe_status(&Ok(ExitStatus::from_raw(3 << 8)), None);
        assert_eq!(
            (failed.code, failed.description.as_str()),
            (3, "xl exited with code 3")
        );
        let killed = XL.describe_status(&Ok(ExitStatus::from_raw(9)), None);
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
