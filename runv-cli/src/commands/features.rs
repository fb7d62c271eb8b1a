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
            "capabilities": CAPABILITIES.as_slice(),
            "cgroup": {"v1": true, "v2": true, "systemd": false, "systemdUser": false},
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

const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];
