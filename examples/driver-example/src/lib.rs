//! An example hypervisor plugin, written the way a third party would: it depends on `runv-api`
//! alone, implements [`runv_api::Hypervisor`] and [`runv_api::Vm`], and exports itself with
//! [`runv_api::export_hypervisor!`]. Build it as a `cdylib` named `librunv_driver_<name>.so` and
//! drop the file into a driver directory.
//!
//! It boots no VM: its "VM" is a thread that echoes every byte sent on the agent channel, which
//! is enough to show (and test) every call of the interface.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::Duration;

use runv_api::{
    Capabilities, Hypervisor, PluginInfo, PluginKind, Vm, VmConfig, VmExit, VmStats,
    export_hypervisor,
};

pub struct ExampleDriver;

impl Hypervisor for ExampleDriver {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Hypervisor,
            name: "example".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "example plugin: echoes the agent channel, boots no VM".into(),
            capabilities: Capabilities::SHARED_DIR_ROOTFS | Capabilities::PAUSE,
        }
    }

    fn probe(&self) -> Result<(), String> {
        Ok(())
    }

    fn start_vm(&self, config: VmConfig) -> Result<Box<dyn Vm>, String> {
        if config.name == "panic" {
            // Lets the tests check that a panic inside a plugin comes back as an error.
            panic!("asked to panic");
        }
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let echo = ours.try_clone().map_err(|e| format!("socketpair: {e}"))?;
        let vm = ExampleVm {
            channel: Mutex::new(Some(theirs.into())),
            console_log: config.console_log.clone(),
            state: Mutex::new(State::Running),
            changed: Condvar::new(),
            guest_memory_bytes: config.memory_mib * 1024 * 1024,
            stopper: Mutex::new(Some(ours)),
        };
        thread::spawn(move || echo_loop(echo));
        Ok(Box::new(vm))
    }
}

fn echo_loop(mut stream: UnixStream) {
    let mut buf = [0u8; 4096];
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || out.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Stopped,
}

struct ExampleVm {
    channel: Mutex<Option<OwnedFd>>,
    console_log: PathBuf,
    state: Mutex<State>,
    changed: Condvar,
    guest_memory_bytes: u64,
    stopper: Mutex<Option<UnixStream>>,
}

impl ExampleVm {
    fn set(&self, from: &[State], to: State) -> Result<(), String> {
        let mut state = self.state.lock().map_err(|_| "state lock poisoned")?;
        if !from.contains(&state) {
            return Err("the VM is not in a state that allows this".into());
        }
        *state = to;
        self.changed.notify_all();
        Ok(())
    }
}

impl Vm for ExampleVm {
    fn take_agent_channel(&self) -> Result<OwnedFd, String> {
        self.channel
            .lock()
            .map_err(|_| "channel lock poisoned")?
            .take()
            .ok_or_else(|| "the agent channel was already taken".to_string())
    }

    fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    fn pause(&self) -> Result<(), String> {
        self.set(&[State::Running], State::Paused)
    }

    fn resume(&self) -> Result<(), String> {
        self.set(&[State::Paused], State::Running)
    }

    fn stop(&self, _timeout: Duration) -> Result<(), String> {
        self.set(
            &[State::Running, State::Paused, State::Stopped],
            State::Stopped,
        )?;
        if let Some(stream) = self.stopper.lock().map_err(|_| "lock poisoned")?.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    fn wait(&self) -> Result<VmExit, String> {
        let mut state = self.state.lock().map_err(|_| "state lock poisoned")?;
        while *state != State::Stopped {
            state = self
                .changed
                .wait(state)
                .map_err(|_| "state lock poisoned")?;
        }
        Ok(VmExit {
            code: 0,
            signal: 0,
            description: "stopped by the host".into(),
        })
    }

    fn pids(&self) -> Vec<u32> {
        vec![std::process::id()]
    }

    fn stats(&self) -> Result<VmStats, String> {
        Ok(VmStats {
            guest_memory_bytes: self.guest_memory_bytes,
            ..VmStats::default()
        })
    }
}

export_hypervisor!(|| Ok(ExampleDriver));
