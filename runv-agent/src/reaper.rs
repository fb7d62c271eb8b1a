//! PID 1 duty: reap every child, and hand exit statuses to whoever waits for a pid.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use runv_proto::ExitStatus;

#[derive(Default)]
struct Table {
    watchers: HashMap<i32, Sender<ExitStatus>>,
    /// Statuses of children that exited before anyone asked (bounded by our own children).
    unclaimed: HashMap<i32, ExitStatus>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl Reaper {
    pub fn start() -> Self {
        let r = Self::default();
        let r2 = r.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r2.run())
            .expect("spawn reaper");
        r
    }

    fn run(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.deliver(pid.as_raw(), ExitStatus::Exited(code))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.deliver(pid.as_raw(), ExitStatus::Signaled(sig as i32))
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    crate::error!("waitpid: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn deliver(&self, pid: i32, st: ExitStatus) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.watchers.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(st);
            }
            None => {
                crate::debug!("reaped pid {pid}: {st:?}");
                t.unclaimed.insert(pid, st);
            }
        }
    }

    /// A receiver of `pid`'s exit status (also if it already exited).
    pub fn watch(&self, pid: i32) -> Receiver<ExitStatus> {
        let (tx, rx) = mpsc::channel();
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match t.unclaimed.remove(&pid) {
            Some(st) => {
                let _ = tx.send(st);
            }
            None => {
                t.watchers.insert(pid, tx);
            }
        }
        rx
    }

    /// We do not care how `pid` ends (a helper): drop its status whenever it comes.
    pub fn forget(&self, pid: i32) {
        drop(self.watch(pid));
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        t.unclaimed.remove(&pid);
        // A dead watcher entry is removed when the status is delivered.
    }
}
