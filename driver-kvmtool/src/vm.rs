//! A running `lkvm run` process, its terminals and the agent relay.
//!
//! * lkvm is spawned and reaped by one thread per VM: `PR_SET_PDEATHSIG` fires when the
//!   *thread* that forked the child exits, so the spawning thread must live as long as lkvm.
//!   The reaper waits with `WNOWAIT` first and reaps under the state lock; signals are sent
//!   under that lock only while no status is recorded, so never to a recycled pid.
//! * lkvm's stdin/stdout is a pty made by the driver (lkvm starts its terminal thread only when
//!   stdin and stdout are terminals). Terminal 0 (ttyS0, the kernel console) goes there; a
//!   thread copies it into the console log.
//! * `--tty 1` gives terminal 1 (ttyS1, the agent's channel) a pty of its own, which lkvm names
//!   on stderr (`Info: Assigned terminal 1 to pty /dev/pts/N`). The driver opens it and relays
//!   it to one end of a socketpair; the other end is the agent channel handed to the core.
//!   The relay is needed because lkvm's terminal input treats byte 0x01 as an escape (Ctrl-A;
//!   `Ctrl-A x` reboots the guest): every 0x01 going to the guest is sent twice
//!   ([`escape_term_input`]). The guest-to-host direction is passed through unchanged.
//! * stderr goes to the log file, line by line.
//! * stop/pause/resume run `lkvm stop|pause|resume --name NAME` with `HOME` set to the VM's
//!   state dir, where lkvm keeps its control socket (`.lkvm/NAME.sock`); pause and resume are
//!   confirmed with `lkvm list`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::pty::{PtyMaster, grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::socket::{
    AddressFamily, MsgFlags, Shutdown, SockFlag, SockType, send, shutdown, socketpair,
};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use runv_api::vmm_process::{self, EarlyExit, KILL_GRACE, VmmProcess, VmmTool};
use runv_api::{Vm, VmExit, VmStats};

use crate::cmdline::{AGENT_TERM, VmPaths, assigned_pty, list_state};

/// Prefix of the lines the driver itself writes into the log file (the rest is lkvm's stderr).
pub const LOG_PREFIX: &str = "runv-driver-kvmtool:";
/// lkvm's terminal escape character (Ctrl-A).
pub const TERM_ESCAPE: u8 = 0x01;

/// How long one `lkvm stop|pause|resume|list` may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `stop` waits after `lkvm stop` before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long pause/resume wait for `lkvm list` to show the new state.
const STATE_CONFIRM: Duration = Duration::from_secs(5);

/// Doubles every escape byte, so that lkvm's terminal input hands the guest exactly `data`.
pub fn escape_term_input(data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    for &b in data {
        out.push(b);
        if b == TERM_ESCAPE {
            out.push(b);
        }
    }
}

static LKVM: VmmTool = VmmTool {
    name: "lkvm",
    log_prefix: LOG_PREFIX,
};

/// Appends one diagnostic line to the driver log file (best effort).
pub fn log_line(log_file: &Path, message: &str) {
    LKVM.log_line(log_file, message)
}

/// Puts a terminal into raw mode: no echo, no line editing, no character translation.
fn make_raw(fd: impl AsFd) -> Result<(), String> {
    let mut t = tcgetattr(fd.as_fd()).map_err(|e| format!("tcgetattr: {e}"))?;
    cfmakeraw(&mut t);
    tcsetattr(fd.as_fd(), SetArg::TCSANOW, &t).map_err(|e| format!("tcsetattr: {e}"))
}

/// A new pty: the master, and the slave opened (close-on-exec, not a controlling terminal),
/// in raw mode.
fn open_pty() -> Result<(PtyMaster, File), String> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("opening a pty: {e}"))?;
    grantpt(&master).map_err(|e| format!("grantpt: {e}"))?;
    unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
    let name = ptsname_r(&master).map_err(|e| format!("ptsname: {e}"))?;
    let slave = open_tty(Path::new(&name))?;
    Ok((master, slave))
}

/// Opens a terminal device read-write without making it the controlling terminal, raw.
fn open_tty(path: &Path) -> Result<File, String> {
    let tty = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    make_raw(&tty).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(tty)
}

/// Runs a short lkvm command (`stop`, `pause`, `list`, ...) with the VM's `HOME`; its stdout on
/// success, its last stderr line (or status) otherwise.
fn run_control(lkvm: &Path, home: &Path, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new(lkvm);
    command.args(args).env("HOME", home);
    vmm_process::run_control(
        command,
        &format!("lkvm {}", args.join(" ")),
        CONTROL_TIMEOUT,
    )
}

/// What [`KvmtoolVm::start`] needs besides the arguments.
pub struct StartSpec {
    pub lkvm: PathBuf,
    pub args: Vec<String>,
    pub paths: VmPaths,
    pub console_log: PathBuf,
    pub guest_memory_bytes: u64,
    pub start_timeout: Duration,
}

pub struct KvmtoolVm {
    process: VmmProcess,
    lkvm: PathBuf,
    paths: VmPaths,
    console_log: PathBuf,
    guest_memory_bytes: u64,
    agent: runv_api::AgentChannel,
    /// The driver's end of the agent socketpair, shut down on drop to end the relay.
    relay: Mutex<Option<OwnedFd>>,
    /// Serializes lkvm control commands.
    control: Mutex<()>,
}

impl KvmtoolVm {
    /// Starts lkvm and waits until it has named the agent's pty and made its control socket
    /// (`start_timeout` in all). On failure lkvm is killed and the error carries its last
    /// stderr line.
    pub fn start(spec: StartSpec) -> Result<Self, String> {
        let StartSpec {
            lkvm,
            args,
            paths,
            console_log,
            guest_memory_bytes,
            start_timeout,
        } = spec;
        let deadline = Instant::now() + start_timeout;
        let socket_dir = paths.home.join(".lkvm");
        fs::create_dir_all(&socket_dir)
            .map_err(|e| format!("creating {}: {e}", socket_dir.display()))?;
        match fs::remove_file(&paths.control_socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(format!(
                    "removing stale {}: {e}",
                    paths.control_socket.display()
                ));
            }
        }
        let log_offset = fs::metadata(&paths.log_file).map(|m| m.len()).unwrap_or(0);
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_log)
            .map_err(|e| format!("opening {}: {e}", console_log.display()))?;

        let (console_master, console_slave) = open_pty()?;
        let (stderr_read, stderr_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let stdin = console_slave
            .try_clone()
            .map_err(|e| format!("duplicating the console pty: {e}"))?;

        let mut command = Command::new(&lkvm);
        command
            .args(&args)
            .env("HOME", &paths.home)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(console_slave))
            .stderr(Stdio::from(stderr_write));
        let process = VmmProcess::spawn(&LKVM, command, paths.log_file.clone(), log_offset)?;

        // The console: lkvm's terminal 0 into the console log, until lkvm is gone.
        thread::Builder::new()
            .name("lkvm-console".into())
            .spawn(move || copy_console(console_master, console))
            .map_err(|e| format!("starting the console thread: {e}"))?;
        // stderr into the log; the agent pty's name to us.
        let (pty_tx, pty_rx) = mpsc::channel();
        let log_file = paths.log_file.clone();
        thread::Builder::new()
            .name("lkvm-stderr".into())
            .spawn(move || watch_stderr(File::from(stderr_read), &log_file, pty_tx))
            .map_err(|e| format!("starting the stderr thread: {e}"))?;

        let vm = Self {
            process,
            lkvm,
            paths,
            console_log,
            guest_memory_bytes,
            agent: runv_api::AgentChannel::default(),
            relay: Mutex::new(None),
            control: Mutex::new(()),
        };
        // From here on, an error drops `vm`, which kills and reaps lkvm.
        let remaining = deadline.saturating_duration_since(Instant::now());
        let agent_pty = match pty_rx.recv_timeout(remaining) {
            Ok(path) => path,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(vm.early_exit_error()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "lkvm did not report the pty of terminal {AGENT_TERM} within {start_timeout:?} \
                     (expected \"Assigned terminal {AGENT_TERM} to pty ...\" on its stderr)"
                ));
            }
        };
        let tty = open_tty(&agent_pty)?;
        vm.wait_control_socket(deadline)?;
        let channel = vm.start_relay(tty)?;
        vm.agent.set(channel);
        Ok(vm)
    }

    /// Waits for lkvm's control socket, which `lkvm stop/pause/resume` need.
    fn wait_control_socket(&self, deadline: Instant) -> Result<(), String> {
        loop {
            if self.process.has_exited() {
                return Err(self.early_exit_error());
            }
            if self.paths.control_socket.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "lkvm did not create its control socket {} in time",
                    self.paths.control_socket.display()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connects the agent pty to a new socketpair; returns the core's end.
    fn start_relay(&self, tty: File) -> Result<OwnedFd, String> {
        let (core, relay) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("socketpair: {e}"))?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("dup: {e}"));
        let (relay_in, relay_out) = (dup(&relay)?, dup(&relay)?);
        let tty_in = tty
            .try_clone()
            .map_err(|e| format!("duplicating the agent pty: {e}"))?;
        thread::Builder::new()
            .name("lkvm-agent-out".into())
            .spawn(move || guest_to_host(tty, relay_out))
            .map_err(|e| format!("starting the agent relay: {e}"))?;
        thread::Builder::new()
            .name("lkvm-agent-in".into())
            .spawn(move || host_to_guest(relay_in, tty_in))
            .map_err(|e| format!("starting the agent relay: {e}"))?;
        *self.relay.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay);
        Ok(core)
    }

    /// Why lkvm failed to start, from its stderr.
    fn early_exit_error(&self) -> String {
        match self.process.early_exit() {
            EarlyExit::LastLine(line) => format!("lkvm failed to start: {line}"),
            EarlyExit::Status(how) => format!("lkvm exited before the VM started ({how})"),
            EarlyExit::NotReaped => "lkvm closed its stderr before the VM started".to_string(),
        }
    }

    /// Runs `lkvm <verb> --name NAME`, unless lkvm has exited.
    fn control(&self, verb: &str) -> Result<String, String> {
        if self.process.has_exited() {
            return Err("the VM has already exited".into());
        }
        let _guard = self.control.lock().unwrap_or_else(|e| e.into_inner());
        run_control(
            &self.lkvm,
            &self.paths.home,
            &[verb, "--name", &self.paths.guest_name],
        )
    }

    /// The state `lkvm list` shows for this VM (`running`, `paused`).
    pub fn listed_state(&self) -> Result<String, String> {
        let _guard = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let out = run_control(&self.lkvm, &self.paths.home, &["list", "-i"])?;
        list_state(&out, &self.paths.guest_name)
            .map(str::to_string)
            .ok_or_else(|| format!("lkvm list does not show {}", self.paths.guest_name))
    }

    fn set_state(&self, verb: &str, wanted: &str) -> Result<(), String> {
        self.control(verb)?;
        let deadline = Instant::now() + STATE_CONFIRM;
        loop {
            let state = self.listed_state()?;
            if state == wanted {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "lkvm {verb} was sent but lkvm list still shows the VM {state}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log_file(&self) -> &Path {
        &self.paths.log_file
    }
}

/// Copies lkvm's terminal 0 into the console log until lkvm has gone (EIO on the master).
fn copy_console(mut master: PtyMaster, mut log: File) {
    let mut buf = [0u8; 8192];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if log.write_all(&buf[..n]).is_err() {
                    // Keep draining, or lkvm would block writing the console.
                    continue;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
}

/// Appends lkvm's stderr to the log file and reports the agent pty's name once.
fn watch_stderr(stderr: File, log_file: &Path, pty: mpsc::Sender<PathBuf>) {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .ok();
    let mut reported = false;
    for line in BufReader::new(stderr).split(b'\n') {
        let Ok(line) = line else { break };
        let text = String::from_utf8_lossy(&line);
        if let Some(f) = log.as_mut() {
            let _ = writeln!(f, "{}", text.trim_end_matches('\r'));
        }
        if !reported {
            if let Some(path) = assigned_pty(&text, AGENT_TERM) {
                reported = pty.send(path).is_ok();
            }
        }
    }
}

/// Guest output to the core, unchanged; EOF for the core when lkvm has gone.
fn guest_to_host(mut tty: File, relay: OwnedFd) {
    let mut buf = [0u8; 16384];
    'outer: loop {
        let n = match tty.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            match send(
                std::os::fd::AsRawFd::as_raw_fd(&relay),
                data,
                MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(sent) => data = &data[sent..],
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break 'outer,
            }
        }
    }
    let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&relay), Shutdown::Write);
}

/// Core output to the guest, with lkvm's escape byte doubled.
fn host_to_guest(relay: OwnedFd, mut tty: File) {
    let mut relay = File::from(relay);
    let mut buf = [0u8; 8192];
    let mut escaped = Vec::with_capacity(2 * buf.len());
    loop {
        let n = match relay.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        escape_term_input(&buf[..n], &mut escaped);
        if tty.write_all(&escaped).is_err() {
            break;
        }
    }
}

impl Vm for KvmtoolVm {
    fn take_agent_channel(&self) -> Result<OwnedFd, String> {
        self.agent.take()
    }

    fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    fn pause(&self) -> Result<(), String> {
        self.set_state("pause", "paused")
    }

    fn resume(&self) -> Result<(), String> {
        self.set_state("resume", "running")
    }

    /// Ends the VM. The graceful part is the core's (it asks the agent to shut down; the
    /// agent reboots, which ends lkvm). `stop`:
    ///
    /// 1. waits up to `timeout` for lkvm to exit by itself;
    /// 2. then runs `lkvm stop --name NAME` and waits up to 3 s;
    /// 3. then sends SIGKILL and waits for the reaper.
    fn stop(&self, timeout: Duration) -> Result<(), String> {
        self.process.stop(
            timeout,
            "stopped by the host (lkvm stop)",
            || match self.control("stop") {
                Ok(_) => true,
                Err(e) => {
                    log_line(&self.paths.log_file, &format!("warning: {e}"));
                    false
                }
            },
            STOP_GRACE,
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
}

impl Drop for KvmtoolVm {
    /// A VM does not outlive its handle: lkvm is killed and reaped, the relay ended.
    fn drop(&mut self) {
        if self
            .process
            .kill("killed by the host: the VM handle was dropped")
        {
            self.process.wait_exit(KILL_GRACE);
        }
        if let Some(relay) = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = shutdown(std::os::fd::AsRawFd::as_raw_fd(&relay), Shutdown::Both);
        }
        if let Some(exit) = self.process.ended() {
            log_line(
                &self.paths.log_file,
                &format!(
                    "lkvm (pid {}) ended: {}",
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
    fn escape_doubles_ctrl_a_only() {
        let mut out = Vec::new();
        escape_term_input(b"a\x01x\x01\x01b", &mut out);
        assert_eq!(out, b"a\x01\x01x\x01\x01\x01\x01b");
        escape_term_input(b"", &mut out);
        assert!(out.is_empty());
        let all: Vec<u8> = (0..=255).collect();
        escape_term_input(&all, &mut out);
        assert_eq!(out.len(), 257);
    }

    #[test]
    fn exit_descriptions() {
        let ok = LKVM.describe_status(&Ok(ExitStatus::from_raw(0)), None);
        assert_eq!((ok.code, ok.signal), (0, 0));
        assert_eq!(ok.description.as_str(), "the guest shut down");
        let stopped = LKVM.describe_status(
            &Ok(ExitStatus::from_raw(0)),
            Some("stopped by the host (lkvm stop)"),
        );
        assert_eq!(
            stopped.description.as_str(),
            "stopped by the host (lkvm stop)"
        );
        let killed = LKVM.describe_status(&Ok(ExitStatus::from_raw(9)), Some("killed by the host"));
        assert_eq!((killed.code, killed.signal), (0, 9));
        assert!(killed.description.as_str().contains("SIGKILL"));
        let failed = LKVM.describe_status(&Ok(ExitStatus::from_raw(128 << 8)), None);
        assert_eq!(failed.code, 128);
        assert_eq!(failed.description.as_str(), "lkvm exited with code 128");
        let unknown = LKVM.describe_status(&Err("ECHILD".into()), None);
        assert_eq!(unknown.code, -1);
    }

    #[test]
    fn last_line_skips_driver_lines() {
        let dir = std::env::temp_dir().join(format!("runv-kvmtool-log-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("kvmtool.log");
        fs::write(&log, "  Fatal: an old run\n").unwrap();
        let offset = fs::metadata(&log).unwrap().len();
        assert_eq!(LKVM.last_tool_line(&log, offset), None);
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "  Fatal: unable to load kernel /x\n").unwrap();
        drop(f);
        log_line(&log, "lkvm ended");
        assert_eq!(
            LKVM.last_tool_line(&log, offset).as_deref(),
            Some("Fatal: unable to load kernel /x")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
