//! The VM's host side lives in `linux.cgroupsPath`: the monitor and the VMM process are in
//! it, CPU limits apply as the spec says, memory is the guest's RAM plus the VMM's overhead,
//! and `delete` removes the cgroup.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::Env;
use serde_json::json;

/// The directory of `path` for `controller`: the unified hierarchy where the host is cgroup
/// v2 only, else the v1 controller's.
fn cgroup_dir(controller: &str, path: &str) -> PathBuf {
    let root = Path::new("/sys/fs/cgroup");
    let rel = path.trim_start_matches('/');
    if root.join("cgroup.controllers").exists() {
        root.join(rel)
    } else {
        root.join(controller).join(rel)
    }
}

fn procs(controller: &str, path: &str) -> Vec<u32> {
    fs::read_to_string(cgroup_dir(controller, path).join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn children_of(parent: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.to_string();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

#[test]
fn the_monitor_and_the_vmm_run_in_the_spec_cgroup_with_its_limits() {
    let env = Env::new("hostcg");
    let path = format!("/runv-test-{}", std::process::id());
    let bundle = env.bundle("b", &["sleep", "60"]);
    env.edit_spec(&bundle, |s| {
        s["linux"]["cgroupsPath"] = path.clone().into();
        s["linux"]["resources"] = json!({
            "cpu": {"quota": 50000, "period": 100000},
            "memory": {"limit": 268435456u64},
            "pids": {"limit": 64}
        });
    });
    // Files, not pipes, for stdio: the detached container keeps them open.
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("c1"),
        180,
    );
    assert!(status.success(), "run -d: {err}");
    let monitor = env.state("c1")["pid"].as_u64().unwrap() as u32;
    let vmm = children_of(monitor);
    assert_eq!(vmm.len(), 1, "the monitor runs one VMM process: {vmm:?}");
    for controller in ["cpu", "memory", "pids"] {
        let p = procs(controller, &path);
        assert!(
            p.contains(&monitor) && p.contains(&vmm[0]),
            "{controller} cgroup {path} holds the monitor {monitor} and qemu {}: {p:?}",
            vmm[0]
        );
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let read = |controller: &str, v1: &str, v2file: &str| {
        let f = if v2 { v2file } else { v1 };
        fs::read_to_string(cgroup_dir(controller, &path).join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    if v2 {
        assert_eq!(read("cpu", "", "cpu.max"), "50000 100000");
    } else {
        assert_eq!(read("cpu", "cpu.cfs_quota_us", ""), "50000");
    }
    // 256 MiB for the container + 64 MiB for the guest kernel = 320 MiB of guest RAM, plus
    // the VMM's own overhead on the host.
    let limit: u64 = read("memory", "memory.limit_in_bytes", "memory.max")
        .parse()
        .unwrap();
    assert_eq!(limit, (320 + 128) * 1024 * 1024);

    env.run_ok(env.runv().args(["delete", "--force", "c1"]), 60);
    for controller in ["cpu", "memory", "pids"] {
        assert!(
            !cgroup_dir(controller, &path).exists(),
            "delete removed the {controller} cgroup {path}"
        );
    }
    env.assert_clean();
}

#[test]
fn a_failed_create_leaves_no_cgroup() {
    let env = Env::new("hostcg-fail");
    let path = format!("/runv-test-fail-{}", std::process::id());
    let bundle = env.bundle("b", &["/no/such/binary"]);
    env.edit_spec(&bundle, |s| s["linux"]["cgroupsPath"] = path.clone().into());
    let out = env.run(
        env.runv()
            .args(["create", "--bundle"])
            .arg(&bundle)
            .arg("c2"),
        180,
    );
    assert!(!out.status.success(), "create of a missing binary fails");
    for controller in ["cpu", "memory", "pids"] {
        assert!(
            !cgroup_dir(controller, &path).exists(),
            "the failed create removed the {controller} cgroup {path}"
        );
    }
    env.assert_clean();
}
