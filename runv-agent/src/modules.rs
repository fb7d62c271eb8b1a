//! Loading kernel modules from the initrd, only those the devices need.
//!
//! `/lib/modules/order` is written at image build time, one module per line in dependency
//! order: `name relative/path.ko dep1 dep2 ...`. runv's own kernel (`cargo xtask kernel`) has
//! every driver built in and its initrd has no `/lib/modules`: the table is then empty and
//! nothing is loaded (no scan of the virtio devices either).

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::sync::Mutex;
use std::time::Instant;

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};

const ORDER: &str = "/lib/modules/order";

struct Entry {
    path: String,
    deps: Vec<String>,
}

pub struct Modules {
    table: HashMap<String, Entry>,
    loaded: Mutex<HashSet<String>>,
}

impl Modules {
    pub fn load_table() -> Self {
        match std::fs::read_to_string(ORDER) {
            Ok(text) => Self::parse(&text),
            Err(e) => {
                crate::debug!("no module list {ORDER} ({e}): drivers are built into the kernel");
                Self::parse("")
            }
        }
    }

    /// The table from the text of `/lib/modules/order`.
    fn parse(text: &str) -> Self {
        let mut table = HashMap::new();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(name), Some(path)) = (it.next(), it.next()) else {
                continue;
            };
            table.insert(
                name.replace('-', "_"),
                Entry {
                    path: format!("/lib/modules/{path}"),
                    deps: it.map(|d| d.replace('-', "_")).collect(),
                },
            );
        }
        Self {
            table,
            loaded: Mutex::new(HashSet::new()),
        }
    }

    /// Whether the initrd ships any module at all (none with runv's own kernel).
    pub fn any(&self) -> bool {
        !self.table.is_empty()
    }

    pub fn has(&self, name: &str) -> bool {
        self.table.contains_key(&name.replace('-', "_"))
    }

    /// Loads `name` and its dependencies. A module that is built in (absent from the list) or
    /// already loaded is fine.
    pub fn ensure(&self, name: &str) -> Result<(), String> {
        let name = name.replace('-', "_");
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        self.ensure_locked(&name, &mut loaded, 0)
    }

    fn ensure_locked(
        &self,
        name: &str,
        loaded: &mut HashSet<String>,
        depth: usize,
    ) -> Result<(), String> {
        if loaded.contains(name) || depth > 32 {
            return Ok(());
        }
        let Some(entry) = self.table.get(name) else {
            // Not shipped: assume built into the kernel.
            return Ok(());
        };
        for dep in &entry.deps {
            self.ensure_locked(dep, loaded, depth + 1)?;
        }
        let t0 = Instant::now();
        let file = File::open(&entry.path).map_err(|e| format!("open {}: {e}", entry.path))?;
        let params = CString::default();
        match finit_module(&file, &params, ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(format!("load module {name}: {e}")),
        }
        crate::debug!(
            "module {name} loaded in {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        loaded.insert(name.to_string());
        Ok(())
    }

    /// Loads every module the container path loads on demand (9p shares, virtio-net,
    /// virtio-blk with ext4), for a template VM whose clones should not each load them.
    pub fn load_for_containers(&self) {
        if !self.any() {
            return;
        }
        for m in [
            "9pnet_virtio",
            "9p",
            "virtio_net",
            "virtio_blk",
            "crc32c_generic",
            "ext4",
        ] {
            if self.has(m) {
                if let Err(e) = self.ensure(m) {
                    crate::warn!("{e}");
                }
            }
        }
    }

    /// Loads the virtio transports, then a driver for every virtio device present; on Xen,
    /// the Xen front-ends.
    pub fn load_for_devices(&self) {
        if !self.any() {
            return;
        }
        for m in ["virtio_mmio", "virtio_pci"] {
            if let Err(e) = self.ensure(m) {
                crate::warn!("{e}");
            }
        }
        if on_xen() {
            for m in XEN_FRONTENDS {
                if let Err(e) = self.ensure(m) {
                    crate::warn!("{e}");
                }
            }
        }
        for id in virtio_device_ids() {
            let wanted: &[&str] = match id {
                1 => &["virtio_net"],
                2 => &["virtio_blk"],
                3 => &["virtio_console"],
                // Free page reporting (the qemu driver's cold VMs): memory goes back to the host.
                5 => &["virtio_balloon"],
                9 => &["9pnet_virtio", "9p"],
                19 => &["vmw_vsock_virtio_transport"],
                VIRTIO_ID_FS => &["virtiofs"],
                _ => &[],
            };
            for m in wanted {
                if let Err(e) = self.ensure(m) {
                    crate::warn!("{e}");
                }
            }
        }
    }
}

/// The virtio device id of virtio-fs.
const VIRTIO_ID_FS: u32 = 26;

/// The virtio device ids on the bus (`/sys/bus/virtio/devices/*/device`), sorted, once each.
fn virtio_device_ids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = dir
        .flatten()
        .filter_map(|d| std::fs::read_to_string(d.path().join("device")).ok())
        .filter_map(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Whether the VM has a virtio-fs device: its shares are virtio-fs then, not 9p.
pub fn has_virtio_fs() -> bool {
    virtio_device_ids().contains(&VIRTIO_ID_FS)
}

/// The Xen front-end drivers a Xen guest may need.
const XEN_FRONTENDS: [&str; 3] = ["xen_blkfront", "xen_netfront", "9pnet_xen"];

/// Whether this guest runs on Xen: xenbus has devices (the bus itself is registered by any
/// kernel built with Xen support, also on KVM).
pub fn on_xen() -> bool {
    std::fs::read_dir("/sys/bus/xen/devices").is_ok_and(|mut d| d.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_file_lines_become_entries_with_dependencies() {
        let m = Modules::parse(
            "virtio_ring kernel/drivers/virtio/virtio_ring.ko\n\
             9pnet-virtio kernel/net/9p/9pnet_virtio.ko 9pnet virtio_ring\n\
             garbage\n",
        );
        assert!(m.any());
        assert!(m.has("9pnet_virtio") && m.has("9pnet-virtio") && m.has("virtio_ring"));
        assert!(!m.has("garbage"));
        let e = &m.table["9pnet_virtio"];
        assert_eq!(e.path, "/lib/modules/kernel/net/9p/9pnet_virtio.ko");
        assert_eq!(e.deps, ["9pnet", "virtio_ring"]);
    }

    #[test]
    fn without_modules_every_driver_counts_as_built_in() {
        let m = Modules::parse("");
        assert!(!m.any());
        // Nothing to open: any name is taken as built in and none is recorded as loaded.
        assert_eq!(m.ensure("9p"), Ok(()));
        assert_eq!(m.ensure("virtio_net"), Ok(()));
        assert!(m.loaded.lock().unwrap().is_empty());
        m.load_for_devices();
        m.load_for_containers();
        assert!(m.loaded.lock().unwrap().is_empty());
    }
}
