//! Host paths that the spec bind-mounts into the container (an engine's volumes, a CRI
//! termination log): the guest cannot see the host, so each source is bind-mounted on the host
//! under `<state dir>/mounts/<n>`, that directory is shared with the VM as one more share, and
//! the spec the agent gets names the guest's path of it instead.
//!
//! The files an engine writes for the container (`/etc/hosts`, `/etc/resolv.conf`,
//! `/etc/hostname`) travel as content instead (see `network::dns_files`), and `/dev/shm` becomes
//! a memory filesystem of the same size in the guest: shared memory does not cross a VM boundary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use runv_api::SharedDir;
use serde_json::Value;

/// The share's tag, and where the agent mounts shares in the guest (runv-agent's SHARES).
pub const TAG: &str = "runv-mounts";
const GUEST_SHARES: &str = "/run/runv/shares";
const DIR: &str = "mounts";

const PROVIDED_IN_THE_GUEST: [&str; 3] = ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];

/// An engine's `/dev/shm` bind (a tmpfs it sized, `--shm-size`) becomes a tmpfs of that size
/// in the guest, with the mount's own flags.
fn shm_as_tmpfs(m: &mut Value, source: &Path) {
    let size = nix::sys::statvfs::statvfs(source)
        .map(|st| st.blocks() * st.fragment_size())
        .unwrap_or(64 << 20);
    let mut options: Vec<Value> = m["options"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter(|x| !matches!(x.as_str(), Some("bind" | "rbind")))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    options.push("mode=1777".into());
    options.push(format!("size={}k", size / 1024).into());
    *m = serde_json::json!({
        "destination": m["destination"],
        "type": "tmpfs",
        "source": "shm",
        "options": options,
    });
}

fn is_bind(m: &Value) -> bool {
    m["type"] == "bind"
        || m["options"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn has_option(m: &Value, name: &str) -> bool {
    m["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|x| x == name))
}

/// Binds each host source under `state_dir/mounts`, rewrites the spec's sources to the guest's
/// view, and returns the share to give the VM (None when there is nothing to share). A driver
/// that cannot share directories gets the spec unchanged: the agent skips those mounts with a
/// warning.
pub fn prepare(
    spec: &mut Value,
    state_dir: &Path,
    can_share: bool,
) -> anyhow::Result<Option<SharedDir>> {
    let dir = state_dir.join(DIR);
    let any = bind_sources(spec, &dir, &format!("{GUEST_SHARES}/{TAG}"), can_share)?;
    Ok(any.then(|| share(state_dir)))
}

/// The share of `state_dir`'s mounts directory (a pod sandbox exports it even when empty:
/// its members' rootfs and volumes are bound into it later).
pub fn share(state_dir: &Path) -> SharedDir {
    SharedDir {
        tag: TAG.into(),
        host_path: state_dir.join(DIR),
        readonly: false,
    }
}

/// Makes a pod sandbox's share a mount of its own that propagates: its members' rootfs and
/// volumes are bound into it after qemu started, and qemu, in its own mount namespace (its
/// jail), holds a slave copy of the share that sees them only so.
pub fn make_propagating(dir: &Path) -> anyhow::Result<()> {
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .with_context(|| format!("binding {} onto itself", dir.display()))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .with_context(|| format!("making {} a shared mount", dir.display()))
}

/// Unmounts what is bound under `state_dir`'s share, and the share itself where it is a mount
/// (a pod sandbox's, see [`make_propagating`]).
pub fn unmount_share(state_dir: &Path) {
    let dir = state_dir.join(DIR);
    unmount_all_under(&dir);
    let _ = umount2(&dir, MntFlags::MNT_DETACH);
}

/// Where a pod member's rootfs and volumes go in its sandbox's share: the host directory,
/// and its path relative to the share.
pub fn member_dir(sandbox_dir: &Path, id: &str) -> (PathBuf, String) {
    let rel = format!("c-{id}");
    (sandbox_dir.join(DIR).join(&rel), rel)
}

/// The guest's path of something at `rel` in the share.
pub fn guest_path(rel: &str) -> String {
    format!("{GUEST_SHARES}/{TAG}/{rel}")
}

/// Binds each bind mount's host source under `dir` (as `dir/<n>`), and rewrites the spec's
/// sources to `guest_dir/<n>`. Returns whether anything was bound.
pub fn bind_sources(
    spec: &mut Value,
    dir: &Path,
    guest_dir: &str,
    can_share: bool,
) -> anyhow::Result<bool> {
    let Some(mounts) = spec["mounts"].as_array_mut() else {
        return Ok(false);
    };
    let mut any = false;
    for (n, m) in mounts.iter_mut().enumerate() {
        let dest = m["destination"].as_str().unwrap_or_default().to_string();
        let dest = dest.trim_end_matches('/');
        if !is_bind(m) || PROVIDED_IN_THE_GUEST.contains(&dest) {
            continue;
        }
        if dest == "/dev/shm" {
            if let Some(source) = m["source"].as_str().map(PathBuf::from) {
                shm_as_tmpfs(m, &source);
            }
            continue;
        }
        let Some(source) = m["source"].as_str().map(PathBuf::from) else {
            continue;
        };
        let Ok(meta) = std::fs::metadata(&source) else {
            // As runc: a missing source fails the mount; the agent reports it by name.
            continue;
        };
        if !can_share {
            tracing::warn!(
                "the driver cannot share directories: bind mount of {} on {dest} is skipped",
                source.display()
            );
            continue;
        }
        if !any {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            any = true;
        }
        let target = dir.join(n.to_string());
        if meta.is_dir() {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        }
        .with_context(|| format!("creating {}", target.display()))?;
        let rec = if has_option(m, "rbind") {
            MsFlags::MS_REC
        } else {
            MsFlags::empty()
        };
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | rec,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting volume {} for the VM", source.display()))?;
        // Nothing mounted here may reach the host's other mount namespaces.
        let _ = mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_PRIVATE | rec,
            None::<&str>,
        );
        if has_option(m, "ro") {
            // Read-only on the host side too: the guest is not trusted to honour it.
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .with_context(|| format!("making volume {} read-only", source.display()))?;
        }
        m["source"] = format!("{guest_dir}/{n}").into();
    }
    Ok(any)
}

/// Unmounts everything mounted under `dir` (deepest first), so that removing `dir` can never
/// reach into a volume's data.
pub fn unmount_all_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|p| p.starts_with(&dir) && *p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        if let Err(e) = umount2(&p, MntFlags::MNT_DETACH) {
            tracing::warn!("unmounting {}: {e}", p.display());
        }
    }
}

/// Unmounts everything under `dir`, then removes `dir` and the empty mount points in it,
/// never anything with content: if an unmount failed, the data under it stays.
pub fn remove_bound_dir(dir: &Path) {
    unmount_all_under(dir);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let path = e.path();
            let r = match e.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir(&path),
                Ok(t) if t.is_file() && e.metadata().is_ok_and(|m| m.len() == 0) => {
                    std::fs::remove_file(&path)
                }
                _ => Ok(()),
            };
            if let Err(err) = r {
                tracing::warn!("removing mount point {}: {err}", path.display());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", dir.display());
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let os: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(out);
    PathBuf::from(os)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_unescape() {
        assert_eq!(unescape(r"/a\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn engine_files_and_shm_stay_out_of_the_share() {
        let tmp = std::env::temp_dir().join(format!("runv-volumes-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let mut spec = serde_json::json!({"mounts": [
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts"},
            {"destination": "/proc", "type": "proc", "source": "proc"}
        ]});
        let before = spec.clone();
        assert!(prepare(&mut spec, &tmp, true).unwrap().is_none());
        assert_eq!(spec, before);
        let mut spec = serde_json::json!({"mounts": [
            {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm",
             "options": ["rbind", "nosuid", "noexec"]}
        ]});
        assert!(prepare(&mut spec, &tmp, true).unwrap().is_none());
        assert_eq!(spec["mounts"][0]["type"], "tmpfs");
        let opts = spec["mounts"][0]["options"].as_array().unwrap();
        assert!(opts.iter().any(|o| o == "nosuid") && !opts.iter().any(|o| o == "rbind"));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
