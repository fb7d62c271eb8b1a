//! The parts of the OCI runtime spec the agent applies, and the setup message that the agent
//! hands to its helper process.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub linux: Option<Linux>,
    #[serde(default)]
    pub root: Option<Root>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Root {
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    #[serde(default)]
    pub masked_paths: Vec<String>,
    #[serde(default)]
    pub readonly_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default = "root_dir")]
    pub cwd: String,
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
}

fn root_dir() -> String {
    "/".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ConsoleSize {
    pub height: u16,
    pub width: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mount {
    pub destination: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

/// What the helper (a fresh exec of the agent binary) is asked to do. Sent as one JSON line
/// on fd 3.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperConfig {
    pub mode: Mode,
    pub process: Process,
    /// Block until the agent writes `start` (a container's init) or exec at once.
    pub wait_start: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Mode {
    /// A container init: new mount, pid, uts and ipc namespaces.
    Create {
        /// The mounted rootfs in the agent's mount namespace.
        rootfs: String,
        readonly: bool,
        hostname: Option<String>,
        mounts: Vec<Mount>,
        masked_paths: Vec<String>,
        readonly_paths: Vec<String>,
        /// (file in the agent's fs, destination in the container), bind-mounted.
        files: Vec<(String, String)>,
    },
    /// Join the namespaces and root of the container whose init has this (agent) pid.
    Exec { init_pid: i32 },
}

/// Lines the helper and the container process write back on fd 3.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Report {
    Pid(i32),
    Ready,
    Error { message: String, code: i32 },
}
