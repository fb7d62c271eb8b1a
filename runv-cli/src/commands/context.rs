//! What every lifecycle command needs: the state store and the global flags.

use std::path::PathBuf;

use crate::cli::RunvOpts;
use crate::plugins::{self, Registry};
use crate::state::Store;

pub struct Ctx {
    pub store: Store,
    pub opts: RunvOpts,
    pub log: Option<PathBuf>,
    pub log_format: Option<String>,
    pub debug: bool,
    /// `--systemd-cgroup`: linux.cgroupsPath is `slice:prefix:name`, managed through systemd.
    pub systemd_cgroup: bool,
    /// The host configuration; `opts` already holds its driver, storage and accel.
    pub host: crate::host_config::HostConfig,
}

impl Ctx {
    pub fn registry(&self) -> Registry {
        Registry::load(plugins::search_dirs(&self.opts.driver_dirs))
    }
}
