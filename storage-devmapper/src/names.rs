//! Device-mapper names of pools, bases and snapshots, and the key of a bundle's rootfs.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A device-mapper name: 1..=100 of `[A-Za-z0-9_.+-]` (the kernel allows 127 bytes).
pub fn valid_name(name: &str) -> Result<&str, String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "devmapper storage: {name:?} is not a usable device-mapper name"
        ))
    }
}

/// FNV-1a, 64 bits: stable across Rust versions (unlike `DefaultHasher`), enough for keys.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The base key of a bundle rootfs: see the crate docs.
pub fn base_key(rootfs: &Path) -> Result<String, String> {
    let canon = fs::canonicalize(rootfs)
        .map_err(|e| format!("devmapper storage: rootfs {}: {e}", rootfs.display()))?;
    let md = fs::metadata(&canon)
        .map_err(|e| format!("devmapper storage: rootfs {}: {e}", canon.display()))?;
    if !md.is_dir() {
        return Err(format!(
            "devmapper storage: rootfs {} is not a directory",
            canon.display()
        ));
    }
    let ident = format!(
        "{}\0{}:{}:{}.{}:{}.{}",
        canon.display(),
        md.dev(),
        md.ino(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    );
    Ok(format!("{:016x}", fnv1a(ident.as_bytes())))
}

/// The device-mapper name of a container's snapshot: `runv-c-<id>` for ids made of name
/// characters, else `runv-c-h<hash of the id>`.
pub fn snapshot_name(container_id: &str) -> String {
    match valid_name(container_id) {
        Ok(id) if id.len() <= 90 => format!("runv-c-{id}"),
        _ => format!("runv-c-h{:016x}", fnv1a(container_id.as_bytes())),
    }
}

pub fn base_name(key: &str) -> String {
    format!("runv-base-{key}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    #[test]
    fn snapshot_names_are_dm_names() {
        assert_eq!(snapshot_name("web-1"), "runv-c-web-1");
        let long = "a".repeat(91);
        for id in [long.as_str(), "with space", "slash/y", ""] {
            let n = snapshot_name(id);
            assert!(n.starts_with("runv-c-h") && valid_name(&n).is_ok(), "{n}");
        }
        assert_ne!(snapshot_name("a b"), snapshot_name("a c"));
        assert!(snapshot_name(&"f".repeat(90)).len() < 127);
    }

    #[test]
    fn base_keys_follow_the_rootfs_directory() {
        let scratch = TestDir::new("key");
        let dir = scratch.path();
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let ka = base_key(&a).unwrap();
        assert_eq!(ka, base_key(&a).unwrap(), "stable");
        assert_eq!(ka.len(), 16);
        assert_ne!(ka, base_key(&b).unwrap(), "another directory");
        fs::write(a.join("new"), "x").unwrap();
        assert_ne!(ka, base_key(&a).unwrap(), "a changed directory");
        assert!(base_key(&dir.join("missing")).is_err());
        fs::write(dir.join("file"), "").unwrap();
        assert!(
            base_key(&dir.join("file"))
                .unwrap_err()
                .contains("not a directory")
        );
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
