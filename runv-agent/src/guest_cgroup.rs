//! A cgroup v2 group per container inside the guest (`/sys/fs/cgroup/runv/<id>`), holding
//! its processes with the spec's `linux.resources`: in a pod VM each container keeps its own
//! limits, and a runaway container cannot exhaust what the agent needs (issue: fork bombs).

use std::path::{Path, PathBuf};

use crate::spec::Resources;

const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "/sys/fs/cgroup/runv";

/// A pids limit for containers whose spec sets none: enough for any ordinary workload, and
/// a fork bomb stops there instead of at the guest's process table.
pub const DEFAULT_PIDS_MAX: i64 = 4096;

/// Mounts the hierarchy and delegates the controllers to `runv/` (at boot).
pub fn init() -> Result<(), String> {
    std::fs::create_dir_all(ROOT).map_err(|e| format!("mkdir {ROOT}: {e}"))?;
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(ROOT)))
        .unwrap_or(false);
    if !mounted {
        let flags = nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC;
        // Every exec moves a process into its container's group. By default each move
        // waits for an RCU grace period (cgroup_threadgroup_rwsem), several ms on a
        // one-vCPU guest at 250 Hz; `favordynmods` (Linux 6.0) makes moves cheap and forks
        // a little dearer. Older kernels refuse the option: mount without it there.
        let mount = |data: Option<&str>| {
            nix::mount::mount(Some("cgroup2"), ROOT, Some("cgroup2"), flags, data)
        };
        mount(Some("favordynmods"))
            .or_else(|_| mount(None))
            .map_err(|e| format!("mount cgroup2 on {ROOT}: {e}"))?;
    }
    std::fs::create_dir_all(PARENT).map_err(|e| format!("mkdir {PARENT}: {e}"))?;
    let available =
        std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers")).unwrap_or_default();
    let enable: String = available
        .split_whitespace()
        .filter(|c| matches!(*c, "cpu" | "memory" | "pids" | "io" | "cpuset"))
        .map(|c| format!("+{c} "))
        .collect();
    for dir in [ROOT, PARENT] {
        let f = Path::new(dir).join("cgroup.subtree_control");
        std::fs::write(&f, enable.trim()).map_err(|e| format!("write {}: {e}", f.display()))?;
    }
    reserve_for_agent()
}

/// Memory kept out of the containers' reach for the agent, its threads and the kernel: an
/// OOM inside `runv/` kills container processes, never PID 1 (whose death panics the guest).
pub const AGENT_MEMORY_RESERVE: u64 = 24 << 20;

/// Tasks kept out of the containers' reach: kernel threads and the agent's own threads count
/// against the guest's `threads-max` too (~950 in a 128 MiB guest), and the agent needs a
/// thread per request.
pub const AGENT_TASK_RESERVE: u64 = 128;

/// Caps everything under `runv/` below what the guest has, so containers together cannot
/// take the memory or the task slots the agent needs.
fn reserve_for_agent() -> Result<(), String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let threads_max = std::fs::read_to_string("/proc/sys/kernel/threads-max").unwrap_or_default();
    let (memory, tasks) = parent_limits(&meminfo, &threads_max);
    let write = |file: &str, value: Option<u64>| match value {
        Some(v) => {
            let p = Path::new(PARENT).join(file);
            std::fs::write(&p, v.to_string())
                .map_err(|e| format!("write {v} to {}: {e}", p.display()))
        }
        None => Ok(()),
    };
    write("memory.max", memory)?;
    write("pids.max", tasks)
}

/// The `runv/` group's memory.max and pids.max from /proc/meminfo and threads-max (None
/// where unknown): the reserves above, or half of a guest too small for them.
fn parent_limits(meminfo: &str, threads_max: &str) -> (Option<u64>, Option<u64>) {
    let total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024);
    let memory = total.map(|t| {
        if t > 2 * AGENT_MEMORY_RESERVE {
            t - AGENT_MEMORY_RESERVE
        } else {
            t / 2
        }
    });
    let tasks = threads_max.trim().parse::<u64>().ok().map(|t| {
        if t > 2 * AGENT_TASK_RESERVE {
            t - AGENT_TASK_RESERVE
        } else {
            t / 2
        }
    });
    (memory, tasks)
}

/// Makes the container's group and writes its limits; returns its directory, or None where the
/// guest has no cgroup hierarchy for containers (`init` failed and said why at boot).
pub fn create(id: &str, resources: Option<&Resources>) -> Result<Option<PathBuf>, String> {
    if !Path::new(PARENT).is_dir() {
        return Ok(None);
    }
    let dir = Path::new(PARENT).join(id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", dir.display())),
    }
    let write = |file: &str, value: String| {
        let p = dir.join(file);
        std::fs::write(&p, &value).map_err(|e| format!("write {value} to {}: {e}", p.display()))
    };
    let r = resources.cloned().unwrap_or_default();
    let pids = r.pids.as_ref().map_or(DEFAULT_PIDS_MAX, |p| p.limit);
    write(
        "pids.max",
        if pids <= 0 {
            "max".into()
        } else {
            pids.to_string()
        },
    )?;
    if let Some(limit) = r.memory.as_ref().and_then(|m| m.limit).filter(|l| *l > 0) {
        write("memory.max", limit.to_string())?;
    }
    if let Some(cpu) = &r.cpu {
        if let Some(quota) = cpu.quota.filter(|q| *q > 0) {
            write(
                "cpu.max",
                format!("{quota} {}", cpu.period.unwrap_or(100_000)),
            )?;
        }
        if let Some(shares) = cpu.shares.filter(|s| *s > 0) {
            write("cpu.weight", shares_to_weight(shares).to_string())?;
        }
    }
    Ok(Some(dir))
}

/// cgroup v1 shares (2..262144) to v2 weight (1..10000), the conversion runc and crun use.
fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Moves the calling process into `dir` (the helper, before it clones the container).
pub fn enter(dir: &Path) -> Result<(), String> {
    let p = dir.join("cgroup.procs");
    std::fs::write(&p, "0").map_err(|e| format!("join cgroup {}: {e}", dir.display()))
}

/// Freezes or thaws every process in the group and waits until the kernel says it is done
/// (`frozen 1` in cgroup.events), as runc's `pause` does.
pub fn freeze(dir: &Path, frozen: bool) -> Result<(), String> {
    let p = dir.join("cgroup.freeze");
    std::fs::write(&p, if frozen { "1" } else { "0" })
        .map_err(|e| format!("write {}: {e}", p.display()))?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    for _ in 0..500 {
        let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|l| l == want) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(format!("{} did not reach \"{want}\" in 5 s", dir.display()))
}

/// Opens `dir`'s cgroup.procs, for a process to move itself in later (see the helper).
pub fn open_procs(dir: &Path) -> Result<std::fs::File, String> {
    let p = dir.join("cgroup.procs");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .map_err(|e| format!("open {}: {e}", p.display()))
}

/// Removes the group once its processes are gone (kills what is left first).
pub fn remove(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    crate::warn!("cgroup {} not removed", dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_keeps_a_reserve_for_the_agent() {
        let meminfo = "MemTotal:         118000 kB\nMemFree:  1000 kB\n";
        assert_eq!(
            parent_limits(meminfo, "946\n"),
            (Some(118000 * 1024 - AGENT_MEMORY_RESERVE), Some(946 - 128))
        );
        assert_eq!(
            parent_limits("MemTotal: 40000 kB\n", "200"),
            (Some(20000 * 1024), Some(100))
        );
        assert_eq!(parent_limits("garbage", ""), (None, None));
    }

    #[test]
    fn shares_convert_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }
}
