//! Kubernetes pods: one VM per pod. A CRI runtime (containerd, CRI-O) creates a pod as a
//! sandbox container (the "pause" process) and then each container of the pod, every one a
//! separate `runv create`; their annotations say which is which. The sandbox's monitor boots
//! the pod VM; a member's monitor owns no VM and asks the sandbox's monitor to run the
//! container in it (see `monitor::pod_host` and `monitor::pod_member`).

use std::collections::HashMap;

/// containerd's CRI plugin.
const CRI_TYPE: &str = "io.kubernetes.cri.container-type";
const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// CRI-O.
const CRIO_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
const CRIO_SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";

/// What a container is to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not part of a pod: a VM of its own.
    Alone,
    /// A pod's sandbox: its VM is the pod's.
    Sandbox,
    /// A container of the pod whose sandbox has this id.
    Member { sandbox: String },
}

pub fn role(annotations: &HashMap<String, String>) -> Role {
    let kind = annotations
        .get(CRI_TYPE)
        .or_else(|| annotations.get(CRIO_TYPE));
    match kind.map(String::as_str) {
        Some("sandbox") => Role::Sandbox,
        Some("container") => match annotations
            .get(CRI_SANDBOX_ID)
            .or_else(|| annotations.get(CRIO_SANDBOX_ID))
        {
            Some(sandbox) if !sandbox.is_empty() => Role::Member {
                sandbox: sandbox.clone(),
            },
            _ => Role::Alone,
        },
        _ => Role::Alone,
    }
}

/// The pod's size as the CRI runtime passes it on the sandbox (the pod's summed limits,
/// where the kubelet set them): (vCPUs, guest MiB before the guest's own overhead). A zero
/// or missing value is "not set".
pub fn sandbox_size(annotations: &HashMap<String, String>) -> (Option<u32>, Option<u64>) {
    let num = |k: &str| annotations.get(k).and_then(|v| v.parse::<i64>().ok());
    let vcpus = match (num(CRI_SANDBOX_CPU_QUOTA), num(CRI_SANDBOX_CPU_PERIOD)) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p as u64) as u32),
        _ => None,
    };
    let memory = num(CRI_SANDBOX_MEMORY)
        .filter(|m| *m > 0)
        .map(|m| (m as u64).div_ceil(1 << 20));
    (vcpus, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn containerd_and_crio_annotations_say_the_role() {
        assert_eq!(role(&ann(&[])), Role::Alone);
        assert_eq!(role(&ann(&[(CRI_TYPE, "sandbox")])), Role::Sandbox);
        assert_eq!(
            role(&ann(&[(CRI_TYPE, "container"), (CRI_SANDBOX_ID, "abc")])),
            Role::Member {
                sandbox: "abc".into()
            }
        );
        assert_eq!(role(&ann(&[(CRIO_TYPE, "sandbox")])), Role::Sandbox);
        assert_eq!(
            role(&ann(&[(CRIO_TYPE, "container"), (CRIO_SANDBOX_ID, "x")])),
            Role::Member {
                sandbox: "x".into()
            }
        );
        // A container without its sandbox's id cannot join a pod: it gets a VM of its own.
        assert_eq!(role(&ann(&[(CRI_TYPE, "container")])), Role::Alone);
    }

    #[test]
    fn sandbox_size_comes_from_the_pod_limits() {
        let a = ann(&[
            (CRI_SANDBOX_CPU_QUOTA, "150000"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_MEMORY, "268435456"),
        ]);
        assert_eq!(sandbox_size(&a), (Some(2), Some(256)));
        let unset = ann(&[
            (CRI_SANDBOX_CPU_QUOTA, "0"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_MEMORY, "0"),
        ]);
        assert_eq!(sandbox_size(&unset), (None, None));
    }
}
