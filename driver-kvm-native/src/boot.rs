//! Loading the kernel, initrd and command line, and writing the boot information the kernel
//! reads first: a PVH `hvm_start_info` for an ELF vmlinux with a PVH entry note, or a zero
//! page (`boot_params`) for a bzImage booted through the 64-bit boot protocol.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, MemoryMapEntry};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// "HdrS" in the setup header.
const BZIMAGE_HEADER_MAGIC: u32 = 0x5372_6448;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// An undefined boot loader id, as other VMMs use.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;
/// The 64-bit entry point of a bzImage is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// The initrd must stay below this (older kernels' `initrd_addr_max`).
const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE: u64 = 0x1000;

/// How the first vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 32-bit protected mode, paging off, `ebx` = the start_info address.
    Pvh { rip: u64 },
    /// 64-bit long mode on identity page tables, `rsi` = the zero page address.
    Linux64 { rip: u64 },
}

/// What to boot.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub rsdp_addr: u64,
}

/// Loads everything into `mem` and returns how to enter the kernel.
pub fn load(
    mem: &GuestMemoryMmap,
    ranges: &[(GuestAddress, usize)],
    spec: &BootSpec,
) -> Result<Entry, String> {
    let kernel_path = spec.kernel.display();
    let mut kernel =
        File::open(spec.kernel).map_err(|e| format!("opening the kernel {kernel_path}: {e}"))?;
    let high = Some(GuestAddress(layout::HIGH_RAM_START));
    let (loaded, pvh) = match Elf::load(mem, None, &mut kernel, high) {
        Ok(result) => match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => (result, Some(entry.0)),
            _ => {
                return Err(format!(
                    "the kernel {kernel_path} is an ELF vmlinux without a PVH entry point \
                     (XEN_ELFNOTE_PHYS32_ENTRY; CONFIG_PVH): boot its bzImage instead"
                ));
            }
        },
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            let result = BzImage::load(mem, None, &mut kernel, high).map_err(|e| {
                format!(
                    "loading the kernel {kernel_path}: {e} (neither an ELF vmlinux nor a bzImage)"
                )
            })?;
            (result, None)
        }
        Err(e) => return Err(format!("loading the kernel {kernel_path}: {e}")),
    };
    let kernel_end = loaded.kernel_load.0 + loaded.kernel_end;

    let low_end = layout::low_ram_end(ranges);
    let initrd = match spec.initrd {
        Some(path) => Some(load_initrd(mem, path, kernel_end, low_end)?),
        None => None,
    };

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX).map_err(|e| e.to_string())?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| format!("kernel command line {:?}: {e}", spec.cmdline))?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline)
        .map_err(|e| format!("writing the kernel command line: {e}"))?;
    let cmdline_size = spec.cmdline.len() as u32 + 1;

    let map = layout::memory_map(ranges);
    match pvh {
        Some(entry) => {
            write_pvh_start_info(mem, &map, initrd, spec.rsdp_addr)?;
            Ok(Entry::Pvh { rip: entry })
        }
        None => {
            let header = loaded
                .setup_header
                .ok_or_else(|| format!("the bzImage {kernel_path} has no setup header"))?;
            let mut params = boot_params {
                hdr: header,
                ..Default::default()
            };
            fill_zero_page(&mut params, &map, initrd, cmdline_size, spec.rsdp_addr)?;
            let boot =
                BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_ADDR));
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
                .map_err(|e| format!("writing the zero page: {e}"))?;
            Ok(Entry::Linux64 {
                rip: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            })
        }
    }
}

/// Places the initrd at the top of low RAM (page aligned, above the kernel) and returns its
/// address and size.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    low_end: u64,
) -> Result<(u64, u64), String> {
    let shown = path.display();
    let mut file = File::open(path).map_err(|e| format!("opening the initrd {shown}: {e}"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("reading the initrd {shown}: {e}"))?
        .len();
    let addr = initrd_address(size, kernel_end, low_end).ok_or_else(|| {
        format!(
            "the initrd {shown} ({} MiB) does not fit in guest memory above the kernel: give the VM more memory",
            size >> 20
        )
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| format!("loading the initrd {shown}: {e}"))?;
    Ok((addr, size))
}

/// The page-aligned address of an initrd of `size` bytes at the top of low RAM.
pub fn initrd_address(size: u64, kernel_end: u64, low_end: u64) -> Option<u64> {
    let top = low_end.min(INITRD_ADDR_MAX + 1);
    let addr = top.checked_sub(size)? & !(PAGE - 1);
    (addr >= kernel_end.next_multiple_of(PAGE)).then_some(addr)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
    rsdp_addr: u64,
) -> Result<(), String> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut boot =
        BootParams::new::<hvm_start_info>(&start_info, GuestAddress(layout::PVH_START_INFO_ADDR));
    if let Some((addr, size)) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST_ADDR;
        boot = BootParams::new::<hvm_start_info>(
            &start_info,
            GuestAddress(layout::PVH_START_INFO_ADDR),
        );
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        boot.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    boot.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(|e| format!("writing the PVH start info: {e}"))
}

/// The zero page of the 64-bit boot protocol (Documentation/arch/x86/boot.rst).
pub fn fill_zero_page(
    params: &mut boot_params,
    map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
    cmdline_size: u32,
    rsdp_addr: u64,
) -> Result<(), String> {
    if params.hdr.header != BZIMAGE_HEADER_MAGIC {
        return Err("the bzImage has no \"HdrS\" setup header".into());
    }
    if map.len() > params.e820_table.len() {
        return Err("too many memory map entries for the zero page".into());
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp_addr;
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(())
}

/// Reads back the PVH start info (for tests and diagnostics).
pub fn read_start_info(mem: &GuestMemoryMmap) -> Result<hvm_start_info, String> {
    mem.read_obj(GuestAddress(layout::PVH_START_INFO_ADDR))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let addr = initrd_address(0x1234, 0x200_0000, 0x2000_0000).unwrap();
        assert_eq!(addr, (0x2000_0000 - 0x1234) & !0xfff);
        assert!(addr + 0x1234 <= 0x2000_0000);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        assert_eq!(initrd_address(0x100_0000, 0x180_0000, 0x200_0000), None);
        assert_eq!(initrd_address(u64::MAX, 0, 0x200_0000), None);
    }

    #[test]
    fn initrd_stays_below_initrd_addr_max_in_big_guests() {
        let addr = initrd_address(0x10_0000, 0x200_0000, layout::MMIO_HOLE_START).unwrap();
        assert!(addr + 0x10_0000 <= INITRD_ADDR_MAX + 1);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_e820() {
        let mut params = boot_params::default();
        params.hdr.header = BZIMAGE_HEADER_MAGIC;
        let ranges = layout::ram_ranges(256).unwrap();
        let map = layout::memory_map(&ranges);
        fill_zero_page(&mut params, &map, Some((0x800_0000, 0x1000)), 42, 0xe0000).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ params.hdr.ramdisk_size }, 0x1000);
        assert_eq!({ params.hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(params.e820_entries as usize, map.len());
        let last = params.e820_table[map.len() - 1];
        assert_eq!({ last.addr } + { last.size }, 256 << 20);
    }

    #[test]
    fn zero_page_refuses_a_header_without_magic() {
        let mut params = boot_params::default();
        assert!(fill_zero_page(&mut params, &[], None, 1, 0).is_err());
    }

    #[test]
    fn pvh_start_info_lists_memory_and_the_initrd() {
        let ranges = layout::ram_ranges(128).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let map = layout::memory_map(&ranges);
        write_pvh_start_info(&mem, &map, Some((0x700_0000, 0x2000)), layout::ACPI_ADDR).unwrap();
        let info = read_start_info(&mem).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, layout::ACPI_ADDR);
        assert_eq!(info.memmap_entries as usize, map.len());
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x700_0000, 0x2000));
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, 1));
    }

    #[test]
    fn missing_and_garbage_kernels_are_clear_errors() {
        let ranges = layout::ram_ranges(64).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let spec = BootSpec {
            kernel: Path::new("/nonexistent/vmlinux"),
            initrd: None,
            cmdline: "console=ttyS0",
            rsdp_addr: 0,
        };
        assert!(
            load(&mem, &ranges, &spec)
                .unwrap_err()
                .contains("/nonexistent/vmlinux")
        );
        let garbage = std::env::temp_dir().join(format!("runv-kvm-garbage-{}", std::process::id()));
        std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
        let spec = BootSpec {
            kernel: &garbage,
            ..spec
        };
        let err = load(&mem, &ranges, &spec).unwrap_err();
        std::fs::remove_file(&garbage).unwrap();
        assert!(
            err.contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
    }
}
