//! `runv features`: runc's features document, plus a `runv` section with the drivers.

use serde_json::json;

use super::{drivers, version::OCI_SPEC_VERSION};
use crate::plugins::Registry;

pub fn run(registry: &Registry) -> anyhow::Result<()> {
    let doc = json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_SPEC_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"],
        "mountOptions": [
            "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async",
            "remount", "bind", "rbind", "private", "rprivate", "shared", "rshared", "slave",
            "rslave", "relatime", "norelatime", "strictatime", "nostrictatime", "noatime",
            "atime", "nodiratime", "diratime", "mand", "nomand", "dirsync", "tmpcopyup"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": runv_proto::LINUX_CAPABILITIES.as_slice(),
            "cgroup": {"v1": true, "v2": true, "systemd": true, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
        },
        "annotations": {
            "io.github.runv.version": env!("CARGO_PKG_VERSION"),
            "io.github.runv.commit": env!("RUNV_COMMIT"),
            "org.opencontainers.runc.checkpoint.enabled": "false",
        },
        "runv": {
            "version": env!("CARGO_PKG_VERSION"),
            "drivers": drivers::rows(registry),
        }
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
