//! Guest RAM and where it lives: anonymous memory for an ordinary VM; a file mapped shared for
//! a template VM (what the guest writes goes to the file, so the saved RAM is the file); that
//! file mapped private for a clone (copy-on-write, as Firecracker restores: pages a clone
//! never writes stay in the page cache, one copy for every clone, and the file never changes).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;

pub enum Backing<'a> {
    Anonymous,
    /// A template's RAM file, created here.
    Template(&'a Path),
    /// A template's RAM file to clone.
    Clone(&'a Path),
}

pub fn guest_memory(memory_mib: u64, backing: Backing<'_>) -> Result<GuestMemoryMmap, String> {
    let ranges = layout::ram_ranges(memory_mib)?;
    let bytes = memory_mib << 20;
    let (file, shared, path) = match backing {
        Backing::Anonymous => return layout::guest_memory(memory_mib),
        Backing::Template(path) => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    format!("creating the template memory file {}: {e}", path.display())
                })?;
            file.set_len(bytes)
                .map_err(|e| format!("sizing the template memory file {}: {e}", path.display()))?;
            (file, true, path)
        }
        Backing::Clone(path) => {
            // Read-only: a private mapping needs no more, and the template cannot change.
            let file = File::open(path)
                .map_err(|e| format!("opening the template memory file {}: {e}", path.display()))?;
            let len = file
                .metadata()
                .map_err(|e| format!("reading {}: {e}", path.display()))?
                .len();
            if len != bytes {
                return Err(format!(
                    "the template memory file {} has {len} bytes, a VM of {memory_mib} MiB needs {bytes}",
                    path.display()
                ));
            }
            (file, false, path)
        }
    };
    let file = Arc::new(file);
    let flags = nix::libc::MAP_NORESERVE
        | if shared {
            nix::libc::MAP_SHARED
        } else {
            nix::libc::MAP_PRIVATE
        };
    // The ranges follow each other in the file: the low RAM, then the RAM above 4 GiB.
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(nix::libc::PROT_READ | nix::libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .build()
            .map_err(|e| format!("mapping {}: {e}", path.display()))?;
        regions.push(
            GuestRegionMmap::new(region, start)
                .ok_or_else(|| format!("guest memory at {:#x} overflows", start.0))?,
        );
        offset += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| format!("guest memory: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_template_writes_its_file_and_a_clone_does_not() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let template = guest_memory(64, Backing::Template(&path)).unwrap();
        template
            .write_obj(0xfeed_u32, GuestAddress(0x10_0000))
            .unwrap();
        drop(template);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 20);
        // A second template in the same place is refused rather than overwritten.
        assert!(guest_memory(64, Backing::Template(&path)).is_err());

        let clone = guest_memory(64, Backing::Clone(&path)).unwrap();
        assert_eq!(
            clone.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0xfeed
        );
        clone.write_obj(0xbad_u32, GuestAddress(0x10_0000)).unwrap();
        let other = guest_memory(64, Backing::Clone(&path)).unwrap();
        assert_eq!(
            other.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            0xfeed,
            "a clone's write reached the template"
        );
        let e = guest_memory(128, Backing::Clone(&path)).unwrap_err();
        assert!(e.contains("has 67108864 bytes, a VM of 128 MiB"), "{e}");
    }
}
