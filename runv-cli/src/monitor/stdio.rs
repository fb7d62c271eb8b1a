//! Relaying a process's standard streams between host file descriptors and agent streams.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::Duration;

use runv_proto::client::AgentClient;
use runv_proto::{OutputHandle, Request, Stdio};

use crate::console;

/// Stream ids are handed out by the host: three per process.
static NEXT_STREAM: AtomicU32 = AtomicU32::new(1);

pub fn allocate(terminal: bool, stdin: bool) -> Stdio {
    let base = NEXT_STREAM.fetch_add(3, Ordering::SeqCst);
    Stdio {
        terminal,
        stdin: stdin.then_some(base),
        stdout: base + 1,
        stderr: (!terminal).then_some(base + 2),
    }
}

/// Host ends of a process's stdio.
pub enum HostStdio {
    /// Separate stdin, stdout, stderr (pipes, files, /dev/null…).
    Plain {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// One terminal (the pty slave whose master the engine holds).
    Tty(OwnedFd),
}

impl HostStdio {
    /// The stdio fds a client sent over the control socket: one terminal, or stdin, stdout
    /// and stderr. `who` names the process for the error (`exec`, `a pod member`).
    pub fn from_fds(tty: bool, mut fds: Vec<OwnedFd>, who: &str) -> anyhow::Result<Self> {
        Ok(match (tty, fds.len()) {
            (true, 1) => HostStdio::Tty(fds.remove(0)),
            (false, 3) => {
                let stderr = fds.remove(2);
                let stdout = fds.remove(1);
                HostStdio::Plain {
                    stdin: Some(fds.remove(0)),
                    stdout,
                    stderr,
                }
            }
            (_, n) => anyhow::bail!("{who} needs 3 stdio fds (or 1 with a tty), got {n}"),
        })
    }
}

/// The running relay; `wait_output` waits for the guest's output to be written out.
pub struct Relay {
    outputs: Vec<OutputHandle>,
    done: Arc<AtomicBool>,
    /// Sends the tty's current size to the guest now (a tty relay only).
    sync_size: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Relay {
    /// Makes the guest's terminal the host terminal's size before the process runs: the
    /// watcher looks only every 200 ms, and a shell's first `stty size` must not see 0x0.
    pub fn sync_tty_size(&self) {
        if let Some(sync) = &self.sync_size {
            sync();
        }
    }

    pub fn wait_output(&self, timeout: Duration) {
        for o in &self.outputs {
            o.wait(timeout);
        }
    }

    /// What each output's sink spent its time on (for debug logs), stdout first.
    pub fn output_stats(&self) -> Vec<(&'static str, runv_proto::StreamStats)> {
        ["stdout", "stderr"]
            .into_iter()
            .zip(self.outputs.iter().map(OutputHandle::stats))
            .collect()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Starts relaying. Outputs are attached before the process is created in the guest, so
/// nothing it writes early is lost. `resize` is the request to send when a tty's size changes.
pub fn start(
    client: &AgentClient,
    ids: Stdio,
    host: HostStdio,
    resize: impl Fn(u16, u16) -> Request + Send + Sync + 'static,
) -> std::io::Result<Relay> {
    let done = Arc::new(AtomicBool::new(false));
    let mut outputs = Vec::new();
    let mut sync_size: Option<Box<dyn Fn() + Send + Sync>> = None;
    match host {
        HostStdio::Plain {
            stdin,
            stdout,
            stderr,
        } => {
            outputs.push(client.attach_output(ids.stdout, Box::new(File::from(stdout))));
            if let Some(id) = ids.stderr {
                outputs.push(client.attach_output(id, Box::new(File::from(stderr))));
            }
            if let (Some(id), Some(fd)) = (ids.stdin, stdin) {
                pump(client.clone(), id, File::from(fd));
            }
        }
        HostStdio::Tty(tty) => {
            let out = File::from(tty.try_clone()?);
            outputs.push(client.attach_output(ids.stdout, Box::new(out)));
            if let Some(id) = ids.stdin {
                pump(client.clone(), id, File::from(tty.try_clone()?));
            }
            let resize = Arc::new(resize);
            let (sync_client, sync_tty, sync_resize) =
                (client.clone(), tty.try_clone()?, resize.clone());
            sync_size = Some(Box::new(move || {
                if let Some((rows, cols)) =
                    console::window_size(&sync_tty).filter(|(r, c)| *r > 0 && *c > 0)
                {
                    if let Err(e) =
                        sync_client.request(sync_resize(rows, cols), Duration::from_secs(5))
                    {
                        tracing::debug!("window size before start: {e}");
                    }
                }
            }));
            watch_size(client.clone(), tty, done.clone(), move |r, c| resize(r, c));
        }
    }
    Ok(Relay {
        outputs,
        done,
        sync_size,
    })
}

fn pump(client: AgentClient, stream: u32, source: File) {
    thread::spawn(move || {
        if let Err(e) = client.pump_input(stream, source) {
            tracing::debug!("stdin relay for stream {stream} ended: {e}");
        }
    });
}

/// Sends the terminal's size now and whenever it changes. A pty has no change notification
/// for a process that is not in its session, so this looks every 200 ms (a few syscalls).
fn watch_size(
    client: AgentClient,
    tty: OwnedFd,
    done: Arc<AtomicBool>,
    resize: impl Fn(u16, u16) -> Request + Send + 'static,
) {
    thread::spawn(move || {
        let mut last = None;
        while !done.load(Ordering::SeqCst) && client.disconnected().is_none() {
            let size = console::window_size(&tty);
            if size != last {
                match size.filter(|(r, c)| *r > 0 && *c > 0) {
                    // Until the process exists in the guest the request fails; try again then.
                    Some((rows, cols)) => {
                        match client.request(resize(rows, cols), Duration::from_secs(5)) {
                            Ok(_) => last = size,
                            Err(e) => tracing::debug!("window size on fd {}: {e}", tty.as_raw_fd()),
                        }
                    }
                    None => last = size,
                }
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
}
