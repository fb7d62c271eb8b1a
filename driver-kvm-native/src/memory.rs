//! Guest RAM and where it lives: anonymous memory for an ordinary VM; a file mapped shared for
//! a template VM (what the guest writes goes to the file, so the saved RAM is the file); that
//! file mapped private for a clone (copy-on-write, as Firecracker restores: pages a clone
//! never writes stay in the page cache, one copy for every clone, and the file never changes).
//! A VM with virtio-fs has its RAM in a memfd mapped shared: the virtio-fs daemon maps the
//! same memory to read requests from and write replies into.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;

pub enum Backing<'a> {
    Anonymous,
    /// A memfd, for a VM whose RAM another process (virtiofsd) maps too.
    Shared,
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
        Backing::Shared => {
            let fd = nix::sys::memfd::memfd_create(
                c"runv-guest-ram",
                nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
            )
            .map_err(|e| format!("memfd_create for the guest RAM: {e}"))?;
            let file = File::from(fd);
            file.set_len(bytes)
                .map_err(|e| format!("sizing the guest RAM memfd: {e}"))?;
            (file, true, Path::new("the guest RAM memfd"))
        }
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
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

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

    #[test]
    fn shared_ram_is_a_file_another_process_can_map() {
        let mem = guest_memory(64, Backing::Shared).unwrap();
        mem.write_obj(0xfeed_u32, GuestAddress(0x10_0000)).unwrap();
        let region = mem.iter().next().unwrap();
        let offset = region.file_offset().expect("backed by the memfd");
        // What the daemon maps through the fd it is sent sees what the guest wrote.
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(offset.file(), &mut word, 0x10_0000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 0xfeed);
    }
}
