//! The VM's run state shared by its threads: why it ended, whether it is paused, and the kick
//! that gets a vCPU out of `KVM_RUN` so that it notices.

use std::os::raw::{c_int, c_void};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler, unblock_signal};

use crate::exit::ExitReason;

/// How a kick reaches a vCPU thread: a real-time signal whose handler does nothing, so that
/// `KVM_RUN` returns `EINTR` (the handler is installed without `SA_RESTART`).
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: c_int, _: *mut libc_siginfo, _: *mut c_void) {}

#[allow(non_camel_case_types)]
type libc_siginfo = nix::libc::siginfo_t;

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), ignore_kick)
            .map_err(|e| format!("installing the vCPU kick signal handler: {e}"));
    });
    result
}

/// Called on each vCPU thread: the monitor may block signals in its threads.
pub fn unblock_kick() {
    let _ = unblock_signal(kick_signal());
}

#[derive(Debug, Default)]
struct State {
    /// Why the VM ends, once something decided it does (the first reason wins).
    exit: Option<ExitReason>,
    paused: bool,
    /// vCPUs that are inside their run loop.
    running: usize,
    /// Of those, how many are parked because of a pause.
    parked: usize,
}

#[derive(Default)]
pub struct Control {
    state: Mutex<State>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the VM to end for `reason`; the first caller's reason is kept.
    pub fn request_exit(&self, reason: ExitReason) {
        let mut s = self.lock();
        if s.exit.is_none() {
            s.exit = Some(reason);
        }
        self.changed.notify_all();
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }

    /// Blocks until an exit was requested.
    pub fn wait_exit_requested(&self) -> ExitReason {
        let mut s = self.lock();
        loop {
            if let Some(reason) = &s.exit {
                return reason.clone();
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn vcpu_started(&self) {
        self.lock().running += 1;
    }

    pub fn vcpu_stopped(&self) {
        let mut s = self.lock();
        s.running -= 1;
        self.changed.notify_all();
    }

    /// The vCPU's check between two `KVM_RUN`s: parks while paused; `false` when it must stop.
    /// `before_park` runs (without the lock) before the vCPU counts as parked, once per park.
    pub fn vcpu_may_run(&self, before_park: impl FnOnce()) -> bool {
        let mut before_park = Some(before_park);
        let mut s = self.lock();
        while s.paused && s.exit.is_none() {
            if let Some(f) = before_park.take() {
                drop(s);
                f();
                s = self.lock();
                continue;
            }
            s.parked += 1;
            self.changed.notify_all();
            while s.paused && s.exit.is_none() {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked -= 1;
        }
        s.exit.is_none()
    }

    pub fn set_paused(&self, paused: bool) {
        self.lock().paused = paused;
        self.changed.notify_all();
    }

    /// Kicks `threads` until `done` holds, or `timeout` passes. Kicks repeat because a signal
    /// that lands just before a vCPU enters `KVM_RUN` does not interrupt it.
    pub fn kick_until(
        &self,
        threads: &[JoinHandle<()>],
        timeout: Duration,
        done: impl Fn(usize, usize) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let s = self.lock();
                if done(s.running, s.parked) {
                    return true;
                }
            }
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let s = self.lock();
            let _ = self
                .changed
                .wait_timeout(s, Duration::from_millis(5).min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_first_exit_reason_wins() {
        let c = Control::default();
        c.request_exit(ExitReason::GuestRebooted);
        c.request_exit(ExitReason::StoppedByHost);
        assert_eq!(c.exit_reason(), Some(ExitReason::GuestRebooted));
        assert_eq!(c.wait_exit_requested(), ExitReason::GuestRebooted);
        assert!(!c.vcpu_may_run(|| {}));
    }

    #[test]
    fn pause_parks_a_vcpu_until_resume() {
        let c = Arc::new(Control::default());
        c.vcpu_started();
        c.set_paused(true);
        let c2 = c.clone();
        let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = drained.clone();
        let t = std::thread::spawn(move || {
            c2.vcpu_may_run(|| d2.store(true, std::sync::atomic::Ordering::SeqCst))
        });
        assert!(c.kick_until(&[], Duration::from_secs(5), |_, parked| parked == 1));
        // Pending I/O was finished before the vCPU counted as parked.
        assert!(drained.load(std::sync::atomic::Ordering::SeqCst));
        c.set_paused(false);
        assert!(t.join().unwrap());
    }

    #[test]
    fn kicks_interrupt_a_blocking_syscall() {
        install_kick_handler().unwrap();
        let c = Arc::new(Control::default());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        c.vcpu_started();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            unblock_kick();
            let mut buf = [0u8; 1];
            // A blocking read stands for KVM_RUN: the kick must make it return EINTR.
            let r = std::io::Read::read(&mut &a, &mut buf);
            assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::Interrupted);
            c2.vcpu_stopped();
        });
        assert!(c.kick_until(
            std::slice::from_ref(&t),
            Duration::from_secs(5),
            |running, _| running == 0
        ));
        t.join().unwrap();
    }
}
