//! The differential test of what a container gets: the same bundle under runc (the
//! reference, no VM) and under runv, the same checker inside printing capabilities, limits,
//! oom score, sysctls, mounts with options and propagation, masked and read-only paths, /dev
//! nodes, id maps, seccomp mode, hostname, groups and umask. The outputs must be equal once
//! the documented VM differences (see `normalize`, and README "OCI spec fields") are taken out.

mod common;
mod spec_check;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{Env, output_with_timeout};
use serde_json::{Value, json};
use spec_check::{CHECKER, normalize};

fn have_runc() -> bool {
    Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

struct Variant {
    name: &'static str,
    edit: fn(&mut Value),
    env: &'static [&'static str],
    prepare: fn(&Path),
}

fn no_prepare(_: &Path) {}

fn variants() -> Vec<Variant> {
    vec![
        Variant {
            name: "default",
            edit: |_| {},
            env: &[],
            prepare: no_prepare,
        },
        Variant {
            name: "nonroot-caps",
            edit: |s| {
                let caps = json!(["CAP_NET_BIND_SERVICE", "CAP_KILL", "CAP_CHOWN"]);
                s["process"]["user"] =
                    json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 23});
                s["process"]["noNewPrivileges"] = false.into();
                s["process"]["capabilities"] = json!({
                    "bounding": caps, "effective": caps, "permitted": caps,
                    "inheritable": caps, "ambient": ["CAP_NET_BIND_SERVICE"]
                });
            },
            env: &[],
            prepare: no_prepare,
        },
        Variant {
            name: "rlimits-oom-sysctl",
            edit: |s| {
                s["process"]["rlimits"] = json!([
                    {"type": "RLIMIT_NOFILE", "soft": 2048, "hard": 4096},
                    {"type": "RLIMIT_CORE", "soft": 1024, "hard": 2048},
                    {"type": "RLIMIT_STACK", "soft": 4194304, "hard": 8388608}
                ]);
                s["process"]["oomScoreAdj"] = 500.into();
                s["linux"]["sysctl"] = json!({
                    "kernel.shmmax": "68719476736",
                    "kernel.msgmnb": "32768",
                    "net.ipv4.ip_unprivileged_port_start": "80"
                });
            },
            env: &["CHECK_SYSCTLS=kernel.shmmax kernel.msgmnb net.ipv4.ip_unprivileged_port_start"],
            prepare: no_prepare,
        },
        Variant {
            name: "masked-readonly",
            edit: |s| {
                s["linux"]["maskedPaths"]
                    .as_array_mut()
                    .unwrap()
                    .extend([json!("/secret.txt"), json!("/secretdir")]);
                s["linux"]["readonlyPaths"]
                    .as_array_mut()
                    .unwrap()
                    .extend([json!("/etc"), json!("/ro.txt")]);
            },
            env: &["CHECK_PATHS=/secret.txt /secretdir/a /ro.txt /etc/x"],
            prepare: |rootfs| {
                fs::write(rootfs.join("secret.txt"), "top secret").unwrap();
                fs::create_dir_all(rootfs.join("secretdir")).unwrap();
                fs::write(rootfs.join("secretdir/a"), "hidden").unwrap();
                fs::write(rootfs.join("ro.txt"), "read only").unwrap();
            },
        },
        Variant {
            name: "devices",
            edit: |s| {
                s["linux"]["devices"] = json!([
                    {"type": "c", "path": "/dev/mynull", "major": 1, "minor": 3,
                     "fileMode": 416, "uid": 1000, "gid": 1000},
                    {"type": "b", "path": "/dev/myloop", "major": 7, "minor": 0, "fileMode": 432},
                    {"type": "c", "path": "/dev/net/tun", "major": 10, "minor": 200}
                ]);
            },
            env: &[],
            prepare: no_prepare,
        },
        Variant {
            name: "docker-seccomp",
            edit: |s| s["linux"]["seccomp"] = docker_default_seccomp(),
            env: &[],
            prepare: no_prepare,
        },
        Variant {
            name: "readonly-root",
            edit: |s| s["root"]["readonly"] = true.into(),
            env: &[],
            prepare: no_prepare,
        },
        Variant {
            name: "userns",
            edit: |s| {
                let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
                s["linux"]["uidMappings"] = map.clone();
                s["linux"]["gidMappings"] = map;
                s["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "user"}));
                // As for runc: no sysfs of one's own without a network namespace.
                let mounts = s["mounts"].as_array_mut().unwrap();
                mounts.retain(|m| m["type"] != "cgroup");
            },
            env: &[],
            prepare: |rootfs| {
                let st = Command::new("chown")
                    .args(["-R", "100000:100000"])
                    .arg(rootfs)
                    .status()
                    .unwrap();
                assert!(st.success());
            },
        },
        Variant {
            name: "propagation-hostname",
            edit: |s| {
                s["linux"]["rootfsPropagation"] = "shared".into();
                s["hostname"] = "checker-host".into();
                let mounts = s["mounts"].as_array_mut().unwrap();
                mounts.push(json!({"destination": "/mnt/shared", "type": "tmpfs",
                    "source": "tmpfs", "options": ["rshared", "size=1m"]}));
                mounts.push(json!({"destination": "/mnt/slave", "type": "tmpfs",
                    "source": "tmpfs", "options": ["rslave", "nosuid", "mode=700"]}));
            },
            env: &[],
            prepare: |rootfs| {
                fs::create_dir_all(rootfs.join("mnt")).unwrap();
            },
        },
        Variant {
            name: "bind-mounts",
            edit: |s| {
                // Host directories in the bundle (volumes), bound shared, slave and read-only;
                // `prepare` makes them, `prepare_bundle` puts in the bundle's path.
                let vol = |n: &str| format!("@BUNDLE@/vol-{n}");
                let mounts = s["mounts"].as_array_mut().unwrap();
                mounts.push(json!({"destination": "/mnt/shared", "type": "bind",
                    "source": vol("shared"), "options": ["rbind", "rshared"]}));
                mounts.push(json!({"destination": "/mnt/slave", "type": "bind",
                    "source": vol("slave"), "options": ["rbind", "rslave", "nosuid"]}));
                mounts.push(json!({"destination": "/mnt/ro", "type": "bind",
                    "source": vol("ro"), "options": ["bind", "ro", "nodev"]}));
            },
            env: &["CHECK_PATHS=/mnt/shared/f /mnt/slave/f /mnt/ro/f"],
            prepare: |rootfs| {
                for n in ["shared", "slave", "ro"] {
                    let d = rootfs.parent().unwrap().join(format!("vol-{n}"));
                    fs::create_dir_all(&d).unwrap();
                    fs::write(d.join("f"), format!("volume {n}")).unwrap();
                }
            },
        },
    ]
}

/// docker's (and podman's) default profile, from containers-common's seccomp.json, turned
/// into the OCI form the way the engines do for a container with the default capabilities.
fn docker_default_seccomp() -> Value {
    let profile: Value = serde_json::from_slice(
        &fs::read("/usr/share/containers/seccomp.json")
            .expect("podman's /usr/share/containers/seccomp.json (containers-common)"),
    )
    .unwrap();
    let default_caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let has = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .all(|c| default_caps.contains(&c.as_str().unwrap_or("")))
            })
            .unwrap_or(true)
    };
    let none = |v: &Value| {
        v.as_array()
            .map(|a| {
                !a.iter()
                    .any(|c| default_caps.contains(&c.as_str().unwrap_or("")))
            })
            .unwrap_or(true)
    };
    let arch_ok = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().any(|x| x == "amd64"))
            .unwrap_or(true)
    };
    let syscalls: Vec<Value> = profile["syscalls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            has(&s["includes"]["caps"])
                && arch_ok(&s["includes"]["arches"])
                && none(&s["excludes"]["caps"])
        })
        .map(|s| {
            let mut o = json!({"names": s["names"], "action": s["action"]});
            if let Some(args) = s["args"].as_array().filter(|a| !a.is_empty()) {
                o["args"] = json!(args);
            }
            if let Some(e) = s["errnoRet"].as_u64() {
                o["errnoRet"] = e.into();
            }
            o
        })
        .collect();
    json!({
        "defaultAction": profile["defaultAction"],
        "defaultErrnoRet": profile["defaultErrnoRet"],
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
}

fn prepare_bundle(env: &Env, v: &Variant) -> std::path::PathBuf {
    let bundle = env.bundle(v.name, &["/bin/check"]);
    let rootfs = bundle.join("rootfs");
    let check = rootfs.join("bin/check");
    fs::write(&check, CHECKER).unwrap();
    fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    env.edit_spec(&bundle, |s| {
        (v.edit)(s);
        let e = s["process"]["env"].as_array_mut().unwrap();
        e.extend(v.env.iter().map(|x| json!(x)));
    });
    (v.prepare)(&rootfs);
    rebase(&bundle, "@BUNDLE@");
    bundle
}

/// Puts the bundle's path where the spec names `old` (a placeholder, or where it was).
fn rebase(bundle: &Path, old: &str) {
    let config = bundle.join("config.json");
    let text = fs::read_to_string(&config).unwrap();
    fs::write(&config, text.replace(old, bundle.to_str().unwrap())).unwrap();
}

fn run_runc(env: &Env, bundle: &Path, id: &str) -> String {
    let root = env.dir.join("runc-state");
    let out = output_with_timeout(
        Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(id),
        std::time::Duration::from_secs(60),
    );
    let _ = Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["delete", "--force", id])
        .output();
    assert!(
        out.status.success(),
        "runc run {id}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_runv(env: &Env, bundle: &Path, id: &str) -> String {
    let out = env.run_ok(
        env.runv().args(["run", "--bundle"]).arg(bundle).arg(id),
        180,
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn runc_and_runv_give_a_container_the_same_spec() {
    if !have_runc() {
        panic!("runc is needed as the reference (scripts/setup.sh installs it)");
    }
    let env = Env::new("specdiff");
    let mut failures = Vec::new();
    for v in variants() {
        // Separate bundles: runc may write into the rootfs (e.g. /written).
        let runc_bundle = prepare_bundle(&env, &v);
        let reference = normalize(&run_runc(&env, &runc_bundle, &format!("rc-{}", v.name)));
        let runv_env_bundle = {
            let b = env.dir.join(format!("{}-runv", v.name));
            fs::rename(&runc_bundle, &b).unwrap();
            rebase(&b, runc_bundle.to_str().unwrap());
            // Again, for files the runc run changed (the checker writes to what it may).
            (v.prepare)(&b.join("rootfs"));
            b
        };
        let _ = fs::remove_file(runv_env_bundle.join("rootfs/written"));
        let got = normalize(&run_runv(&env, &runv_env_bundle, &format!("rv-{}", v.name)));
        if got != reference {
            let only = |a: &str, b: &str, sign: char| {
                a.lines()
                    .filter(|l| !b.lines().any(|m| m == *l))
                    .map(|l| format!("{sign} {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            failures.push(format!(
                "variant {} (- runc only, + runv only):\n{}\n{}",
                v.name,
                only(&reference, &got, '-'),
                only(&got, &reference, '+')
            ));
        }
    }
    env.assert_clean();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
