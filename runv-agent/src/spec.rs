//! The parts of the OCI runtime spec the agent applies, and the setup message that the agent
//! hands to its helper process.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub domainname: Option<String>,
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
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub uid_mappings: Vec<IdMapping>,
    #[serde(default)]
    pub gid_mappings: Vec<IdMapping>,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
    #[serde(default)]
    pub seccomp: Option<Seccomp>,
    #[serde(default)]
    pub rootfs_propagation: Option<String>,
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdMapping {
    #[serde(rename = "containerID")]
    pub container_id: u32,
    #[serde(rename = "hostID")]
    pub host_id: u32,
    pub size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub major: i64,
    #[serde(default)]
    pub minor: i64,
    #[serde(default)]
    pub file_mode: Option<u32>,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

/// The OCI seccomp section (config-linux.md "Seccomp").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seccomp {
    pub default_action: String,
    #[serde(default)]
    pub default_errno_ret: Option<u32>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub syscalls: Vec<SeccompRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeccompRule {
    #[serde(default)]
    pub names: Vec<String>,
    pub action: String,
    #[serde(default)]
    pub errno_ret: Option<u32>,
    #[serde(default)]
    pub args: Vec<SeccompArg>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeccompArg {
    pub index: u32,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
    pub op: String,
}

/// `linux.resources`, applied to the container's cgroup inside the guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default)]
    pub memory: Option<MemoryResources>,
    #[serde(default)]
    pub cpu: Option<CpuResources>,
    #[serde(default)]
    pub pids: Option<PidsResources>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryResources {
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub swap: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuResources {
    #[serde(default)]
    pub shares: Option<u64>,
    #[serde(default)]
    pub quota: Option<i64>,
    #[serde(default)]
    pub period: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PidsResources {
    pub limit: i64,
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
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
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
    pub umask: Option<u32>,
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

/// The five capability sets; an absent set is empty, as in runc.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
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
    /// The container's seccomp filter: its init and every exec'd process get it, as in runc.
    pub seccomp: Option<Seccomp>,
    /// The guest cgroup directory the process is placed in before anything else.
    pub cgroup: Option<String>,
    /// Log the helper's and the process's setup phases (the agent logs at debug level).
    #[serde(default)]
    pub timing: bool,
}

/// Everything that makes a container's init: its namespaces, root and mounts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateConfig {
    /// The mounted rootfs in the agent's mount namespace.
    pub rootfs: String,
    pub readonly: bool,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub mounts: Vec<Mount>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    /// (file in the agent's fs, destination in the container), bind-mounted.
    pub files: Vec<(String, String)>,
    /// Namespace types to create ("mount", "pid", "uts", "ipc", "cgroup", "user").
    pub new_namespaces: Vec<String>,
    /// Namespaces to join before the clone: (type, pid whose namespace it is), a pod's.
    #[serde(default)]
    pub join_namespaces: Vec<(String, i32)>,
    pub uid_mappings: Vec<IdMapping>,
    pub gid_mappings: Vec<IdMapping>,
    pub devices: Vec<Device>,
    pub sysctl: BTreeMap<String, String>,
    pub rootfs_propagation: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Mode {
    /// A container init.
    Create(Box<CreateConfig>),
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

/// The namespaces a container gets in the guest: those listed without a path. The network
/// is the VM's own (the VM is the container's network namespace, wired to the one the engine
/// named), and a `path` names a host namespace, which a guest cannot join: the container
/// then shares the VM's namespace of that type. A mount namespace is always made: the
/// container needs a root of its own.
pub fn namespaces_to_create(linux: &Linux) -> Vec<String> {
    let mut out = vec!["mount".to_string()];
    for ns in &linux.namespaces {
        let k = ns.kind.as_str();
        let known = matches!(k, "pid" | "uts" | "ipc" | "cgroup" | "user");
        if known && ns.path.as_deref().unwrap_or("").is_empty() && !out.iter().any(|o| o == k) {
            out.push(k.to_string());
        }
    }
    out
}

/// A pod member's namespaces that its spec names by path (the engine points them at the
/// sandbox's, on the host): joined from the sandbox's init in the guest instead. Network is
/// the VM's for everyone, and a user or mount namespace is never shared between containers.
pub fn namespaces_to_join(linux: &Linux, sandbox_pid: i32) -> Vec<(String, i32)> {
    linux
        .namespaces
        .iter()
        .filter(|ns| !ns.path.as_deref().unwrap_or("").is_empty())
        .filter(|ns| matches!(ns.kind.as_str(), "pid" | "uts" | "ipc" | "cgroup"))
        .map(|ns| (ns.kind.clone(), sandbox_pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_members_join_the_sandbox_where_their_spec_names_a_path() {
        let linux: Linux = serde_json::from_value(serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/9/ns/net"},
                           {"type": "ipc", "path": "/proc/9/ns/ipc"},
                           {"type": "uts", "path": "/proc/9/ns/uts"}, {"type": "mount"},
                           {"type": "user", "path": "/proc/9/ns/user"}]
        }))
        .unwrap();
        assert_eq!(
            namespaces_to_join(&linux, 42),
            vec![("ipc".to_string(), 42), ("uts".to_string(), 42)]
        );
        assert_eq!(namespaces_to_create(&linux), vec!["mount", "pid"]);
    }

    #[test]
    fn runc_default_namespaces_map_to_guest_namespaces() {
        let linux: Linux = serde_json::from_value(serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"},
                           {"type": "user", "path": "/proc/1/ns/user"}]
        }))
        .unwrap();
        assert_eq!(
            namespaces_to_create(&linux),
            ["mount", "pid", "ipc", "uts", "cgroup"]
        );
    }

    #[test]
    fn full_capability_sets_and_seccomp_parse() {
        let p: Process = serde_json::from_value(serde_json::json!({
            "args": ["sh"], "oomScoreAdj": -5, "user": {"uid": 1, "gid": 2, "umask": 63},
            "capabilities": {"bounding": ["CAP_KILL"], "ambient": ["CAP_KILL"]}
        }))
        .unwrap();
        assert_eq!(p.oom_score_adj, Some(-5));
        assert_eq!(p.user.umask, Some(0o77));
        assert_eq!(p.capabilities.unwrap().ambient, ["CAP_KILL"]);
        let s: Seccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]}]
        }))
        .unwrap();
        assert_eq!(s.syscalls[0].args[0].value_two, 0);
    }
}
