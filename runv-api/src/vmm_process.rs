//! Supervision of the host process that runs a VM (qemu, lkvm, `xl create -F`), shared by the
//! drivers that have one.
//!
//! One thread per VM (the "reaper") spawns the process and waits for it. Spawning from that
//! thread matters: `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so a
//! child spawned from a short-lived caller thread would be killed with it. The reaper lives
//! exactly as long as the process, so the process dies when the monitor dies, and only then.
//!
//! The reaper first waits without reaping (the process stays a zombie, its pid cannot be
//! reused), then takes the state lock and reaps. Signals are sent under the same lock and only
//! while no exit status is recorded, so a signal never reaches a recycled pid.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::{VmExit, VmStats};

/// How long `stop` and [`VmmProcess::kill`] callers wait for the reaper after SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// `ESRCH` (the same number on every Linux architecture).
const ESRCH: i32 = 3;

/// Blocks until `pid` has exited without reaping it (`waitid` with `WNOWAIT`).
fn wait_exited(pid: u32) -> Result<(), String> {
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    loop {
        match waitid(
            Id::Pid(nix::unistd::Pid::from_raw(pid as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map(drop).map_err(|e| e.to_string()),
        }
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(signal)
        .ok()
        .map(nix::sys::signal::Signal::as_str)
}

/// What differs between the drivers' VMM programs.
pub struct VmmTool {
    /// The program as messages name it: `qemu`, `lkvm`, `xl`.
    pub name: &'static str,
    /// Starts the lines the driver itself writes into the log file, which also holds the
    /// program's own output; [`VmmTool::last_tool_line`] skips them.
    pub log_prefix: &'static str,
}

impl VmmTool {
    /// Appends one diagnostic line to the driver log file (best effort).
    pub fn log_line(&self, log_file: &Path, message: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log_file) {
            let _ = writeln!(f, "{} {message}", self.log_prefix);
        }
    }

    /// The last line the program wrote to the log after `offset` (the driver's own lines
    /// skipped).
    pub fn last_tool_line(&self, log_file: &Path, offset: u64) -> Option<String> {
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
            .rfind(|l| !l.is_empty() && !l.starts_with(self.log_prefix))
            .map(str::to_string)
    }

    /// How the VM ended, in words, from the program's exit status and what the host did.
    pub fn describe_status(
        &self,
        status: &Result<ExitStatus, String>,
        ended_by_host: Option<&str>,
    ) -> VmExit {
        let tool = self.name;
        match status {
            Err(e) => VmExit {
                code: -1,
                signal: 0,
                description: format!("{tool} ended, status unknown: {e}").into(),
            },
            Ok(status) => {
                let code = status.code().unwrap_or(-1);
                let signal = status.signal().unwrap_or(0);
                let what = if signal != 0 {
                    let name = signal_name(signal)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("signal {signal}"));
                    match ended_by_host {
                        Some(how) => format!("{how}: {tool} killed by {name}"),
                        None => format!("{tool} killed by {name}"),
                    }
                } else if let Some(how) = ended_by_host {
                    how.to_string()
                } else if code == 0 {
                    "the guest shut down".to_string()
                } else {
                    format!("{tool} exited with code {code}")
                };
                VmExit {
                    code: if signal != 0 { 0 } else { code },
                    signal,
                    description: what.into(),
                }
            }
        }
    }
}

#[derive(Default)]
struct ProcState {
    /// Kept for `kill` until reaped: std sends SIGKILL through it.
    child: Option<Child>,
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
}

/// Why the program ended during start-up, for the driver's start error.
pub enum EarlyExit {
    /// The last line it wrote to the log.
    LastLine(String),
    /// It wrote nothing: how it ended.
    Status(String),
    /// It wrote nothing and has not been reaped (yet).
    NotReaped,
}

/// The VM's host process, spawned and reaped by its own thread.
pub struct VmmProcess {
    tool: &'static VmmTool,
    pid: u32,
    shared: Arc<Shared>,
    log_file: PathBuf,
    log_offset: u64,
}

impl VmmProcess {
    /// Spawns `command` from a new reaper thread, in its own process group (a Ctrl-C aimed at
    /// the monitor's group does not reach it; the monitor decides how the VM ends) and with
    /// `PR_SET_PDEATHSIG`. `log_file` from `log_offset` on holds this run's output.
    pub fn spawn(
        tool: &'static VmmTool,
        mut command: Command,
        log_file: PathBuf,
        log_offset: u64,
    ) -> Result<Self, String> {
        let name = tool.name;
        let program = PathBuf::from(command.get_program());
        command.process_group(0);
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, getppid) and builds errors from raw errno
        // values, without allocating.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                // The parent may have died between fork and prctl: then nobody would kill us.
                if std::os::unix::process::parent_id() != parent {
                    return Err(std::io::Error::from_raw_os_error(ESRCH));
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
            .name(format!("{name}-reaper"))
            .spawn(move || reaper(tool, command, tx, reaper_shared))
            .map_err(|e| format!("starting the {name} reaper thread: {e}"))?;
        let pid = rx
            .recv()
            .map_err(|_| format!("the {name} reaper thread ended early"))?
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        Ok(Self {
            tool,
            pid,
            shared,
            log_file,
            log_offset,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn has_exited(&self) -> bool {
        self.shared.lock().exit.is_some()
    }

    /// Waits until the process has been reaped or `timeout` passed; true when reaped.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.exit.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Sends SIGKILL unless the process has been reaped, recording `why` (unless the host
    /// already ended it another way). Returns whether it was sent.
    pub fn kill(&self, why: &'static str) -> bool {
        let mut state = self.shared.lock();
        if state.exit.is_some() {
            return false;
        }
        state.ended_by_host.get_or_insert(why);
        state.child.as_mut().is_some_and(|c| c.kill().is_ok())
    }

    /// Ends the process:
    ///
    /// 1. waits up to `timeout` for it to exit by itself;
    /// 2. then records `how` and runs `graceful` (QMP quit, `lkvm stop`, `xl destroy`), which
    ///    returns whether waiting is worthwhile, and waits up to `grace`;
    /// 3. then sends SIGKILL (recording `kill_why`) and waits for the reaper.
    ///
    /// Returns once the process has been reaped. Safe to call from several threads and after
    /// exit.
    pub fn stop(
        &self,
        timeout: Duration,
        how: &'static str,
        graceful: impl FnOnce() -> bool,
        grace: Duration,
        kill_why: &'static str,
    ) -> Result<(), String> {
        if self.wait_exit(timeout) {
            return Ok(());
        }
        {
            let mut state = self.shared.lock();
            if state.exit.is_some() {
                return Ok(());
            }
            state.ended_by_host.get_or_insert(how);
        }
        if graceful() && self.wait_exit(grace) {
            return Ok(());
        }
        self.kill(kill_why);
        if self.wait_exit(KILL_GRACE) {
            Ok(())
        } else {
            Err(format!(
                "{} (pid {}) did not exit after SIGKILL",
                self.tool.name, self.pid
            ))
        }
    }

    /// Blocks until the process has been reaped; a failure carries its last log line.
    pub fn wait(&self) -> VmExit {
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
        let mut exit = self.tool.describe_status(&status, state.ended_by_host);
        drop(state);
        if exit.code != 0 {
            if let Some(line) = self.tool.last_tool_line(&self.log_file, self.log_offset) {
                exit.description = format!("{}: {line}", exit.description).into();
            }
        }
        exit
    }

    /// How the process ended, once reaped.
    pub fn ended(&self) -> Option<VmExit> {
        let state = self.shared.lock();
        let status = state.exit.as_ref()?;
        Some(self.tool.describe_status(status, state.ended_by_host))
    }

    /// Why the process failed during start-up, once it has been reaped (waiting up to 2 s for
    /// the reaper, so that the status goes with the message).
    pub fn early_exit(&self) -> EarlyExit {
        self.wait_exit(Duration::from_secs(2));
        let status = self.shared.lock().exit.clone();
        match self.tool.last_tool_line(&self.log_file, self.log_offset) {
            Some(line) => EarlyExit::LastLine(line),
            None => match status {
                Some(status) => EarlyExit::Status(
                    self.tool
                        .describe_status(&status, None)
                        .description
                        .into_string(),
                ),
                None => EarlyExit::NotReaped,
            },
        }
    }

    /// The process while it runs.
    pub fn pids(&self) -> Vec<u32> {
        if self.has_exited() {
            Vec::new()
        } else {
            vec![self.pid]
        }
    }

    /// Host memory of the process (the guest's memory lives in it).
    pub fn stats(&self, guest_memory_bytes: u64) -> Result<VmStats, String> {
        let path = format!("/proc/{}/smaps_rollup", self.pid);
        let text = {
            let state = self.shared.lock();
            if state.exit.is_some() {
                return Err("the VM has exited".into());
            }
            // Read under the lock: the pid cannot be reaped (and reused) meanwhile.
            std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?
        };
        let (rss, pss) = crate::parse_smaps_rollup(&text);
        Ok(VmStats {
            host_rss_bytes: rss,
            host_pss_bytes: pss,
            guest_memory_bytes,
        })
    }
}

fn reaper(
    tool: &'static VmmTool,
    mut command: Command,
    tx: mpsc::Sender<std::io::Result<u32>>,
    shared: Arc<Shared>,
) {
    let spawned = command.spawn();
    // The command may hold the parent's copies of pipes and ptys given to the child: close
    // them, so that whoever reads the other ends sees the end when the process exits.
    drop(command);
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let pid = child.id();
    shared.lock().child = Some(child);
    let _ = tx.send(Ok(pid));
    // Wait without reaping, so that the pid stays ours while signals may still be sent.
    let waited = wait_exited(pid);
    let mut state = shared.lock();
    let status = match waited {
        Ok(()) => match state.child.as_mut() {
            Some(child) => child.wait().map_err(|e| e.to_string()),
            None => Err("no child".to_string()),
        },
        // Someone else reaped it (e.g. a waitpid(-1) in the host process).
        Err(e) => Err(format!("waiting for {} (pid {pid}): {e}", tool.name)),
    };
    state.child = None;
    state.exit = Some(status);
    shared.changed.notify_all();
}

/// Runs a short control command of the VMM's toolstack (`lkvm stop`, `xl pause`, ...) to its
/// end or `timeout`: its stdout on success, else `"WHAT failed: "` and its last output line
/// (or its status). `what` names the command in errors.
pub fn run_control(mut command: Command, what: &str, timeout: Duration) -> Result<String, String> {
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {what}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish in {timeout:?}"));
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

#[cfg(test)]
mod tests {
    use super::*;

    static TOOL: VmmTool = VmmTool {
        name: "vmm",
        log_prefix: "runv-test:",
    };

    #[test]
    fn control_commands_give_stdout_or_their_last_line() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo out"]);
        assert_eq!(
            run_control(ok, "sh ok", Duration::from_secs(10)).unwrap(),
            "out\n"
        );
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo first >&2; echo last >&2; exit 3"]);
        let err = run_control(bad, "sh bad", Duration::from_secs(10)).unwrap_err();
        assert_eq!(err, "sh bad failed: last");
        let mut slow = Command::new("sleep");
        slow.arg("5");
        let err = run_control(slow, "sleep", Duration::from_millis(50)).unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
    }

    #[test]
    fn exit_descriptions() {
        let ok = TOOL.describe_status(&Ok(ExitStatus::from_raw(0)), None);
        assert_eq!((ok.code, ok.signal), (0, 0));
        assert_eq!(ok.description.as_str(), "the guest shut down");
        let stopped = TOOL.describe_status(&Ok(ExitStatus::from_raw(0)), Some("stopped"));
        assert_eq!(stopped.description.as_str(), "stopped");
        let killed = TOOL.describe_status(&Ok(ExitStatus::from_raw(9)), Some("killed"));
        assert_eq!((killed.code, killed.signal), (0, 9));
        assert_eq!(killed.description.as_str(), "killed: vmm killed by SIGKILL");
        let failed = TOOL.describe_status(&Ok(ExitStatus::from_raw(128 << 8)), None);
        assert_eq!(failed.code, 128);
        assert_eq!(failed.description.as_str(), "vmm exited with code 128");
        let unknown = TOOL.describe_status(&Err("ECHILD".into()), None);
        assert_eq!(unknown.code, -1);
        assert_eq!(
            unknown.description.as_str(),
            "vmm ended, status unknown: ECHILD"
        );
    }

    #[test]
    fn last_line_skips_driver_lines_and_old_output() {
        let dir = std::env::temp_dir().join(format!("runv-vmm-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("vmm.log");
        std::fs::write(&log, "old: error from an earlier run\n").unwrap();
        let offset = std::fs::metadata(&log).unwrap().len();
        assert_eq!(TOOL.last_tool_line(&log, offset), None);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "  Fatal: unable to load kernel /x\n").unwrap();
        drop(f);
        TOOL.log_line(&log, "vmm ended");
        assert_eq!(
            TOOL.last_tool_line(&log, offset).as_deref(),
            Some("Fatal: unable to load kernel /x")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
