//! Control messages (the JSON payload of [`crate::FrameType::Control`] frames).

use serde::{Deserialize, Serialize};

/// A control message. Both sides send `Hello` first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Message {
    Hello {
        version: u32,
        agent_version: String,
        /// The credit each stream the sender receives starts with, in bytes: what it can
        /// take in before it grants more. Absent (older peers, before issue 16): the
        /// protocol's [`crate::INITIAL_WINDOW`]. The other side sends at most that much
        /// ahead on every stream.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u64>,
    },
    Request {
        id: u64,
        body: Request,
    },
    Response {
        id: u64,
        result: Result<ResponseBody, AgentError>,
    },
    Event {
        event: Event,
    },
}

/// Requests from the host to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    /// Creates a container whose init is blocked until `StartContainer`.
    CreateContainer {
        id: String,
        /// The OCI runtime spec (config.json) as JSON.
        spec: serde_json::Value,
        rootfs: Rootfs,
        stdio: Stdio,
        #[serde(default)]
        hostname: Option<String>,
        /// Contents for the container's /etc/hosts.
        #[serde(default)]
        hosts: Option<String>,
        /// Contents for the container's /etc/resolv.conf.
        #[serde(default)]
        resolv_conf: Option<String>,
        /// A pod member: the id of the pod's sandbox container, whose namespaces this one
        /// joins where its spec names a namespace by path (network is always the VM's).
        #[serde(default)]
        pod_sandbox: Option<String>,
    },
    StartContainer {
        id: String,
    },
    Exec {
        container_id: String,
        exec_id: String,
        /// An OCI `Process` as JSON.
        process: serde_json::Value,
        stdio: Stdio,
    },
    Signal {
        container_id: String,
        #[serde(default)]
        exec_id: Option<String>,
        signal: i32,
        /// Signal every process of the container, not only its init.
        #[serde(default)]
        all: bool,
    },
    WindowSize {
        container_id: String,
        #[serde(default)]
        exec_id: Option<String>,
        rows: u16,
        cols: u16,
    },
    Ps {
        container_id: String,
    },
    RemoveContainer {
        id: String,
    },
    /// Freezes (or thaws) every process of a container through its cgroup: `pause` of one
    /// container of a pod, whose VM keeps running for the others.
    Freeze {
        container_id: String,
        frozen: bool,
    },
    ConfigureNetwork {
        interfaces: Vec<Interface>,
        routes: Vec<Route>,
    },
    /// Power the VM off after a sync. Also: power off once the last container's init exits.
    SetPowerOffWhenIdle {
        enabled: bool,
    },
    Shutdown,
    /// The VM was just restored from a template, which its siblings share: before anything
    /// else runs, credit `entropy` to the kernel's pool and reseed its CRNG, set the wall
    /// clock, and give each NIC the clone's MAC instead of the template's.
    Restored {
        /// Fresh random bytes from the host (at most [`MAX_RESTORE_ENTROPY`]).
        entropy: Secret,
        /// The host's wall clock, nanoseconds since the Unix epoch.
        unix_time_ns: u64,
        #[serde(default)]
        macs: Vec<MacChange>,
    },
}

/// Bytes that must not reach a log: requests are logged with `{:?}` (the agent's debug lines
/// go to the guest's kernel log, which the console log and `dmesg` show), and a clone's seed
/// is not to be read there. Serialized as the plain byte array.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} secret bytes>", self.0.len())
    }
}

/// Most entropy bytes a `Restored` request may carry (the agent refuses more).
pub const MAX_RESTORE_ENTROPY: usize = 512;

/// A NIC of a restored VM: the MAC the template gave it and the one it gets now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacChange {
    pub template: String,
    pub clone: String,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rootfs {
    pub source: RootfsSource,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootfsSource {
    /// A 9p share, by its `mount_tag`.
    Share { tag: String },
    /// A directory inside a 9p share (a pod's containers, bound there after the VM booted):
    /// `path` is relative, without `..`.
    SharePath { tag: String, path: String },
    /// A virtio-blk disk, found by `/sys/block/vd*/serial`.
    Block { serial: String, fs_type: String },
}

/// Stream ids (chosen by the host) for a process's standard streams.
///
/// With `terminal`, `stdout` carries the pty output and `stderr` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stdio {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub stdin: Option<u32>,
    pub stdout: u32,
    #[serde(default)]
    pub stderr: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub mac: String,
    pub name: String,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// CIDR strings, e.g. `10.0.0.2/24`.
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// CIDR or `default`.
    pub dest: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResponseBody {
    Ok,
    Pong {
        agent_version: String,
    },
    /// Answer to `CreateContainer` / `Exec`: the guest pid of the process.
    Process {
        pid: i32,
    },
    Ps {
        processes: Vec<ProcessInfo>,
    },
    /// Answer to `Shutdown`: the guest's file systems are synced, so the host may end the VM
    /// without waiting for the guest's own power-off. Older agents answer `Ok`.
    Synced,
}

/// A failed request. `code` follows runc: 127 command not found, 126 not executable,
/// 1 for other errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub message: String,
    pub code: i32,
}

impl AgentError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Pid as seen in the container's pid namespace.
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    pub state: String,
    pub args: Vec<String>,
}

/// Unsolicited news from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A container init (`exec_id` None) or an exec'd process ended. Sent after its output
    /// streams reached EOF (or a short grace period passed, if a leftover child holds them).
    ProcessExited {
        container_id: String,
        #[serde(default)]
        exec_id: Option<String>,
        status: ExitStatus,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The code a shell would report: the exit code, or 128 + the signal number.
    pub fn code(self) -> i32 {
        match self {
            Self::Exited(c) => c,
            Self::Signaled(s) => 128 + s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_entropy_is_a_plain_array_on_the_wire_and_hidden_in_logs() {
        let req = Request::Restored {
            entropy: Secret(vec![7, 8, 9]),
            unix_time_ns: 1,
            macs: vec![],
        };
        let json = serde_json::to_string(&req).unwrap();
        assert!(json.contains(r#""entropy":[7,8,9]"#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        let debug = format!("{req:?}");
        assert!(debug.contains("<3 secret bytes>"), "{debug}");
        assert!(!debug.contains("7, 8, 9"), "{debug}");
    }
}
