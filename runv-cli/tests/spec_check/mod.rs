//! The checker that prints what a container gets, and the normalisation that takes out what
//! differs between a VM and a host by nature; shared by the runc-vs-runv differential test
//! and the engine tests that compare the same flags under runc and runv.
#![allow(dead_code)]

/// Prints one fact a line; `$CHECK_SYSCTLS` and `$CHECK_PATHS` name what else to look at.
pub const CHECKER: &str = r#"#!/bin/sh
grep -E '^(Cap|NoNewPrivs|Seccomp:|Groups|Uid|Gid)' /proc/self/status
echo "limits:"; sed 1d /proc/self/limits
echo "oom_score_adj: $(cat /proc/self/oom_score_adj)"
echo "umask: $(umask)"
echo "id: $(id)"
echo "hostname: $(hostname) domain: $(cat /proc/sys/kernel/domainname)"
echo "uid_map: $(cat /proc/self/uid_map | tr -s ' ')"
echo "gid_map: $(cat /proc/self/gid_map | tr -s ' ')"
for s in $CHECK_SYSCTLS; do echo "sysctl $s: $(cat /proc/sys/$(echo $s | tr . /))"; done
echo "mounts:"
awk '{ o=""; for(i=7;i<=NF;i++){ if($i=="-"){break}; o=o" "$i }; print $5, $6, o, "|", $(i+1), $(i+3) }' /proc/self/mountinfo | sort
echo "dev:"
for f in /dev/* /dev/pts/ptmx; do stat -c '%A %u %g %t %T %n' $f; done
for p in $CHECK_PATHS; do
  if [ -e $p ]; then
    echo "read $p: $(cat $p 2>&1 | head -c 40 | od -c | head -1)"
    echo "write $p: $( (echo x > $p) 2>&1 >/dev/null && echo ok)"
  else echo "$p: absent"; fi
done
echo "unshare: $(unshare -m true 2>&1 && echo ok)"
echo "write /: $(touch /written 2>&1 && echo ok)"
"#;

/// The checker's output with the documented differences between a VM and a host taken out.
pub fn normalize(out: &str) -> String {
    // The root's filesystem (9p or a block device in the VM, the host's disk under runc), and
    // so any bind mount of a path in it, differs by nature.
    let root_fs = out
        .lines()
        .find(|l| l.starts_with("/ "))
        .and_then(|l| l.split_once(" | "))
        .map(|(_, fs)| fs.to_string());
    let mut lines = Vec::new();
    for line in out.lines() {
        // RLIMIT_NPROC and RLIMIT_SIGPENDING not set by the spec are the kernel's defaults,
        // which scale with RAM: the guest has far less than the host.
        if line.starts_with("Max processes") || line.starts_with("Max pending signals") {
            continue;
        }
        // The guest runs cgroup v2 only, with a group per container; the host may be v1.
        if line.starts_with("/sys/fs/cgroup") {
            continue;
        }
        // Paths that exist only in one of the two kernels, so one masks and one cannot.
        if line.starts_with("/proc/kcore ") || line.starts_with("/proc/sysrq-trigger ") {
            continue;
        }
        // Peer group numbers are per kernel; the propagation kind is what counts.
        let mut l = line
            .replace(",inode64", "")
            .split(' ')
            .map(|t| match t.split_once(':') {
                Some((k @ ("shared" | "master" | "propagate_from"), _)) => format!("{k}:N"),
                _ => t.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        // runc 1.1 makes the IPC namespace before it takes the mapped gid, so the mqueue
        // root of a user-namespaced container belongs to an unmapped group; runv maps first.
        if l.ends_with(" /dev/mqueue") {
            l = l.replace(" 0 65534 ", " 0 0 ");
        }
        if let Some((mnt, fs)) = l.clone().split_once(" | ") {
            // An engine's rootfs is a mount on the host, a slave of the host's peer group
            // under runc; in the VM it is the agent's mount and has no host peers.
            let mnt = if mnt.starts_with("/ ") {
                mnt.replace(" master:N", "")
            } else {
                mnt.to_string()
            };
            let mnt = mnt.as_str();
            // sysfs's superblock is the VM's (its network namespace is the container's); a
            // devtmpfs is sized by the kernel to the machine's RAM.
            if Some(fs) == root_fs.as_deref() || mnt.starts_with("/sys ") {
                l = format!("{mnt} | (fs)");
            } else if fs.starts_with("devtmpfs ") {
                l = format!("{mnt} | devtmpfs");
            }
        }
        lines.push(l);
    }
    lines.join("\n")
}

/// [`normalize`] for a container an engine made: its hostname is its id, and the engine's
/// `/etc` files are the guest's copies of them.
pub fn normalize_engine(out: &str) -> String {
    normalize(out)
        .lines()
        .filter(|l| !l.starts_with("hostname: "))
        .map(|l| match l.split_once(" | ") {
            Some((m, _)) if m.starts_with("/etc/host") || m.starts_with("/etc/resolv") => {
                format!("{m} | (engine file)")
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
