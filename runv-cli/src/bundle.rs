//! An OCI bundle: its config.json, checked, and what runv derives from it (VM size, guest files).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cli::RunvOpts;

pub struct Bundle {
    pub dir: PathBuf,
    /// config.json as JSON (handed to the guest agent as is).
    pub spec: Value,
    pub rootfs: PathBuf,
    pub rootfs_readonly: bool,
    pub terminal: bool,
}

impl Bundle {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let dir = fs::canonicalize(dir)
            .with_context(|| format!("bundle {} does not exist", dir.display()))?;
        let path = dir.join("config.json");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "{} not found: is {} an OCI bundle?",
                    path.display(),
                    dir.display()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let spec: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        // The typed parse finds wrongly shaped fields with a precise message.
        serde_json::from_value::<oci_spec::runtime::Spec>(spec.clone())
            .with_context(|| format!("{} is not a valid OCI runtime spec", path.display()))?;
        check_version(&spec, &path)?;
        let root = spec
            .get("root")
            .with_context(|| format!("{}: no root", path.display()))?;
        let root_path = root["path"]
            .as_str()
            .with_context(|| format!("{}: root.path is missing", path.display()))?;
        let rootfs = if Path::new(root_path).is_absolute() {
            PathBuf::from(root_path)
        } else {
            dir.join(root_path)
        };
        if !rootfs.is_dir() {
            bail!("rootfs {} is not a directory", rootfs.display());
        }
        let process = spec
            .get("process")
            .with_context(|| format!("{}: no process", path.display()))?;
        if process["args"].as_array().is_none_or(|a| a.is_empty()) {
            bail!("{}: process.args must not be empty", path.display());
        }
        Ok(Bundle {
            rootfs_readonly: root["readonly"].as_bool().unwrap_or(false),
            terminal: process["terminal"].as_bool().unwrap_or(false),
            dir,
            spec,
            rootfs,
        })
    }

    pub fn annotations(&self) -> std::collections::HashMap<String, String> {
        self.spec["annotations"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn oci_version(&self) -> String {
        self.spec["ociVersion"]
            .as_str()
            .unwrap_or("1.0.0")
            .to_string()
    }

    /// The network namespace path the engine named, if any.
    pub fn netns_path(&self) -> Option<PathBuf> {
        self.spec["linux"]["namespaces"]
            .as_array()?
            .iter()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    pub fn hostname(&self) -> Option<String> {
        self.spec["hostname"].as_str().map(str::to_string)
    }

    /// The VM's vCPUs and MiB: annotations `runv.vm.vcpus` / `runv.vm.memory_mib`, else a
    /// pod sandbox's pod limits (CRI annotations, plus the guest's overhead), else derived
    /// from `linux.resources` (CPU quota/period, memory limit + guest overhead), else the
    /// host's defaults (`host_config`). vCPUs derived from limits are at most the host's CPUs.
    pub fn vm_size(&self, default_vcpus: u32, default_memory_mib: u64) -> (u32, u64) {
        let ann = self.annotations();
        let resources = &self.spec["linux"]["resources"];
        let (pod_vcpus, pod_memory) = match crate::pod::role(&ann) {
            crate::pod::Role::Sandbox => crate::pod::sandbox_size(&ann),
            _ => (None, None),
        };
        // A CPU limit above the host's CPUs cannot be used: more vCPUs than that only cost.
        let host_cpus = std::thread::available_parallelism().map_or(64, |n| n.get() as u32);
        let vcpus = ann
            .get("runv.vm.vcpus")
            .and_then(|v| v.parse().ok())
            .or_else(|| {
                let limit = || {
                    let quota = resources["cpu"]["quota"].as_i64()?;
                    let period = resources["cpu"]["period"].as_u64().unwrap_or(100_000);
                    (quota > 0 && period > 0).then(|| (quota as u64).div_ceil(period) as u32)
                };
                pod_vcpus.or_else(limit).map(|v| v.min(host_cpus))
            })
            .unwrap_or(default_vcpus)
            .clamp(1, 64);
        let memory = ann
            .get("runv.vm.memory_mib")
            .and_then(|v| v.parse().ok())
            .or(pod_memory.map(|m| m + GUEST_OVERHEAD_MIB))
            .or_else(|| {
                let limit = resources["memory"]["limit"].as_i64()?;
                (limit > 0).then(|| (limit as u64).div_ceil(1 << 20) + GUEST_OVERHEAD_MIB)
            })
            .unwrap_or(default_memory_mib)
            .max(MIN_MEMORY_MIB);
        (vcpus, memory)
    }

    /// The spec's `vm` section: kernel, initrd, kernel parameters, hypervisor parameters.
    pub fn vm_section(&self) -> VmSection {
        let vm = &self.spec["vm"];
        let params = vm["hypervisor"]["parameters"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter_map(|p| p.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        VmSection {
            kernel: vm["kernel"]["path"].as_str().map(PathBuf::from),
            initrd: vm["kernel"]["initrd"].as_str().map(PathBuf::from),
            kernel_params: vm["kernel"]["parameters"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
            hypervisor_path: vm["hypervisor"]["path"].as_str().map(PathBuf::from),
            hypervisor_params: params,
        }
    }
}

pub const MIN_MEMORY_MIB: u64 = 96;
pub const GUEST_OVERHEAD_MIB: u64 = 64;

#[derive(Default, Debug)]
pub struct VmSection {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_params: String,
    pub hypervisor_path: Option<PathBuf>,
    pub hypervisor_params: BTreeMap<String, String>,
}

fn check_version(spec: &Value, path: &Path) -> anyhow::Result<()> {
    let version = spec["ociVersion"]
        .as_str()
        .with_context(|| format!("{}: ociVersion is missing", path.display()))?;
    let major = version.split('.').next().unwrap_or("");
    if major != "1" {
        bail!(
            "{}: unsupported OCI spec version {version:?} (runv supports 1.0.0 to {})",
            path.display(),
            crate::commands::version::OCI_SPEC_VERSION
        );
    }
    Ok(())
}

/// The guest kernel and initrd, by the documented order: `--kernel`/`--initrd`, the spec's
/// `vm` section, `RUNV_KERNEL`/`RUNV_INITRD` and the host config file (`host`),
/// `PREFIX/share/runv` beside the installed binary, then the development `target/guest`.
pub fn guest_files(
    opts: &RunvOpts,
    vm: &VmSection,
    host: &crate::host_config::HostConfig,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let mut dirs = Vec::new();
    if let Some(dir) = &exe_dir {
        if let Some(prefix) = dir.parent() {
            dirs.push(prefix.join("share/runv"));
            // target/<profile>/runv → target/guest
            dirs.push(prefix.join("guest"));
        }
    }
    let find = |names: &[&str]| -> Option<PathBuf> {
        dirs.iter()
            .flat_map(|d| names.iter().map(move |n| d.join(n)))
            .find(|p| p.exists())
    };
    let kernel = opts
        .kernel
        .clone()
        .or_else(|| vm.kernel.clone())
        .or_else(|| host.kernel.value.clone())
        .or_else(|| find(&["vmlinux", "vmlinuz"]))
        .context("no guest kernel found: pass --kernel, or run `cargo xtask guest` (development) or install runv with its share/runv files")?;
    let initrd = opts
        .initrd
        .clone()
        .or_else(|| vm.initrd.clone())
        .or_else(|| host.initrd.value.clone())
        .or_else(|| find(&["initrd.img"]))
        .context("no guest initrd found: pass --initrd, or run `cargo xtask guest`")?;
    for (what, path) in [("kernel", &kernel), ("initrd", &initrd)] {
        if !path.is_file() {
            bail!("guest {what} {} does not exist", path.display());
        }
    }
    Ok((kernel, initrd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(spec: Value) -> Bundle {
        Bundle {
            dir: PathBuf::new(),
            spec,
            rootfs: PathBuf::new(),
            rootfs_readonly: false,
            terminal: false,
        }
    }

    #[test]
    fn vm_size_comes_from_annotations_pod_limits_resources_then_defaults() {
        let host = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(bundle(serde_json::json!({})).vm_size(1, 128), (1, 128));
        let explicit = bundle(serde_json::json!({"annotations": {
            "runv.vm.vcpus": "3", "runv.vm.memory_mib": "200"}}));
        assert_eq!(explicit.vm_size(1, 128), (3, 200));
        let pod = bundle(serde_json::json!({"annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-cpu-quota": "6400000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-memory": "268435456"}}));
        // 64 CPUs asked, the host's given; 256 MiB plus the guest's own.
        assert_eq!(pod.vm_size(1, 128), (host, 256 + GUEST_OVERHEAD_MIB));
        let limited = bundle(serde_json::json!({"linux": {"resources": {
            "cpu": {"quota": 50000, "period": 100000}, "memory": {"limit": 134217728}}}}));
        assert_eq!(limited.vm_size(2, 128), (1, 128 + GUEST_OVERHEAD_MIB));
    }
}
