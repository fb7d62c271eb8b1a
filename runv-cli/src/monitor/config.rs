//! What `create` tells the monitor it starts (written to `<state dir>/monitor.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "monitor.json";

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct MonitorConfig {
    pub id: String,
    pub root: PathBuf,
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub driver_dirs: Vec<PathBuf>,
    pub driver: String,
    pub storage: Option<String>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_params: String,
    pub parameters: BTreeMap<String, String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub netns: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub log_format: Option<String>,
    pub debug: bool,
    /// How long the guest agent may take to answer after the VM started.
    pub agent_timeout_secs: u64,
    /// `--systemd-cgroup` was given: the host cgroup is managed through systemd.
    #[serde(default)]
    pub systemd_cgroup: bool,
    /// `--template`: restore the VM from a template, build one afterwards, or neither.
    #[serde(default)]
    pub template: crate::templates::Mode,
    /// The template store.
    #[serde(default)]
    pub template_dir: PathBuf,
    /// What the container is to a Kubernetes pod: its sandbox's monitor boots the pod's VM
    /// and shares a directory for the members; a member's monitor owns no VM.
    #[serde(default)]
    pub pod: PodConfig,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "role")]
pub enum PodConfig {
    #[default]
    Alone,
    Sandbox,
    Member {
        sandbox: String,
    },
}

impl MonitorConfig {
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        crate::state::write_private(&dir.join(FILE), &serde_json::to_vec_pretty(self)?)
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
    }
}
