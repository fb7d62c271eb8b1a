//! The container's cgroup on the host (`linux.cgroupsPath`): the monitor joins it before it
//! starts the VMM, so the VMM process (or kvm-native's vCPU threads) and everything of the
//! VM on the host is accounted and limited where the engine looks (`docker stats`, kubelet).
//!
//! youki's libcgroups does the work for cgroup v1, v2 and the systemd driver. What the spec
//! limits is translated for a VM: CPU quota, period, shares and cpuset apply as they are (the
//! vCPUs are host threads); the memory limit becomes the guest's RAM plus what the VMM itself
//! needs on the host; pids count guest processes and stay inside the guest (a VMM has a
//! handful of host threads whatever the container runs).

use std::path::{Path, PathBuf};

use anyhow::Context;
use libcgroups::common::{
    AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt, create_cgroup_manager,
};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use serde_json::Value;

/// Host memory of a VMM beyond the guest's RAM (QEMU under TCG: ~64 MiB PSS measured in
/// BENCHMARKS.md, with its code cache and page tables; rounded up for bursts at boot).
pub const VMM_HOST_OVERHEAD_MIB: u64 = 128;

/// Where the spec puts the container: `linux.cgroupsPath`, if any.
pub fn cgroups_path(spec: &Value) -> Option<PathBuf> {
    spec["linux"]["cgroupsPath"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The spec's resources as the VM's host side should be limited.
pub fn host_resources(spec: &Value, guest_memory_mib: u64) -> anyhow::Result<LinuxResources> {
    let r = &spec["linux"]["resources"];
    let mut host = serde_json::json!({});
    if r["cpu"].is_object() {
        host["cpu"] = r["cpu"].clone();
    }
    if r["memory"]["limit"].as_i64().is_some_and(|l| l > 0) {
        let bytes = (guest_memory_mib + VMM_HOST_OVERHEAD_MIB) * 1024 * 1024;
        host["memory"] = serde_json::json!({"limit": bytes});
    }
    serde_json::from_value(host).context("linux.resources")
}

fn manager(path: &Path, id: &str, systemd: bool) -> anyhow::Result<AnyCgroupManager> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: path.to_path_buf(),
        systemd_cgroup: systemd,
        container_name: id.to_string(),
    })
    .with_context(|| format!("cgroup {}", path.display()))
}

/// Moves the calling process (the monitor) into the container's cgroup with the translated
/// limits. Children (the VMM) inherit it.
pub fn join(
    spec: &Value,
    id: &str,
    systemd: bool,
    guest_memory_mib: u64,
) -> anyhow::Result<Option<PathBuf>> {
    let Some(path) = cgroups_path(spec) else {
        return Ok(None);
    };
    let m = manager(&path, id, systemd)?;
    m.add_task(Pid::this())
        .with_context(|| format!("joining cgroup {}", path.display()))?;
    let resources = host_resources(spec, guest_memory_mib)?;
    m.apply(&ControllerOpt {
        resources: &resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    })
    .with_context(|| format!("limits on cgroup {}", path.display()))?;
    Ok(Some(path))
}

/// Removes the cgroup once the monitor and the VMM are gone (at delete).
pub fn remove(spec: &Value, id: &str, systemd: bool) {
    let Some(path) = cgroups_path(spec) else {
        return;
    };
    match manager(&path, id, systemd) {
        Ok(m) => {
            if let Err(e) = m.remove() {
                tracing::warn!("removing cgroup {}: {e}", path.display());
            }
        }
        Err(e) => tracing::warn!("{e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_becomes_guest_ram_plus_vmm_overhead_and_pids_stay_in_the_guest() {
        let spec = serde_json::json!({"linux": {"resources": {
            "memory": {"limit": 268435456}, "pids": {"limit": 10},
            "cpu": {"quota": 50000, "period": 100000, "cpus": "0"}
        }}});
        let r = host_resources(&spec, 320).unwrap();
        let mem = r.memory().as_ref().unwrap().limit().unwrap();
        assert_eq!(mem, ((320 + VMM_HOST_OVERHEAD_MIB) * 1024 * 1024) as i64);
        assert!(r.pids().is_none());
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!(cpu.quota(), Some(50000));
        assert_eq!(cpu.cpus().as_deref(), Some("0"));
    }

    #[test]
    fn no_cgroups_path_means_no_cgroup() {
        assert_eq!(cgroups_path(&serde_json::json!({"linux": {}})), None);
    }
}
