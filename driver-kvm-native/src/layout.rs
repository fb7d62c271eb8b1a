//! Where things live in guest-physical memory and which interrupt lines devices use.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4, PDPT, PD (64-bit boot only)
//! 0x0000_6000  PVH start_info           0x0000_7000  zero page (bzImage boot only)
//! 0x0000_6800  PVH memory map           0x0002_0000  kernel command line
//! 0x000e_0000  ACPI tables (RSDP first), in the reserved 0xa0000..0x100000 hole
//! 0x0010_0000  RAM for the kernel (a vmlinux loads where its ELF headers say, e.g. 16 MiB)
//!   ...        the initrd, at the top of low RAM
//! 0xc000_0000  start of the MMIO hole: virtio-mmio devices at 0xd000_0000, one page each;
//!              IOAPIC 0xfec0_0000, local APIC 0xfee0_0000 (both emulated by KVM)
//! 0x1_0000_0000  RAM above 4 GiB, for guests larger than the low part
//! ```

use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const GDT_ADDR: u64 = 0x500;
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6800;
pub const PVH_MODLIST_ADDR: u64 = 0x6f00;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The command line may use up to this many bytes, NUL included.
pub const CMDLINE_MAX: usize = 4096;
/// The end of conventional memory (EBDA and BIOS area follow, reserved).
pub const EBDA_START: u64 = 0x9_fc00;
pub const ACPI_ADDR: u64 = 0xe_0000;
pub const ACPI_MAX: u64 = 0x2_0000;
pub const HIGH_RAM_START: u64 = 0x10_0000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Each virtio-mmio device gets one page (its registers use 0x200 of it).
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The 32-bit TSS KVM needs on Intel, placed in the MMIO hole just under the BIOS area.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// COM1's legacy interrupt line.
pub const SERIAL_GSI: u32 = 4;
/// virtio-mmio devices use GSIs from here on (IOAPIC pins, not shared with ISA devices).
pub const VIRTIO_GSI_BASE: u32 = 16;
/// The in-kernel IOAPIC has 24 pins.
pub const MAX_GSI: u32 = 23;

/// The largest guest this layout describes: the in-kernel page tables the 64-bit boot path
/// builds, and the e820 map, cover any size, but keep it sane.
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
pub const MIN_MEMORY_MIB: u64 = 64;

/// The RAM ranges of a guest with `memory_mib` MiB: one below the MMIO hole, and one above
/// 4 GiB for the rest.
pub fn ram_ranges(memory_mib: u64) -> Result<Vec<(GuestAddress, usize)>, String> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(format!(
            "guest memory {memory_mib} MiB is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB"
        ));
    }
    let bytes = memory_mib << 20;
    let low = bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if bytes > low {
        ranges.push((GuestAddress(FOUR_GIB), (bytes - low) as usize));
    }
    Ok(ranges)
}

/// Guest memory for `memory_mib` MiB: anonymous, private, not reserved up front (pages cost
/// host memory only once the guest touches them).
pub fn guest_memory(memory_mib: u64) -> Result<GuestMemoryMmap, String> {
    GuestMemoryMmap::from_ranges(&ram_ranges(memory_mib)?)
        .map_err(|e| format!("allocating {memory_mib} MiB of guest memory: {e}"))
}

/// An e820 / PVH memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

/// The memory map the guest is told about: conventional memory, the reserved BIOS hole
/// (where the ACPI tables live), and the RAM ranges above 1 MiB.
pub fn memory_map(ranges: &[(GuestAddress, usize)]) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: MemoryKind::Ram,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIGH_RAM_START - EBDA_START,
            kind: MemoryKind::Reserved,
        },
    ];
    for &(start, len) in ranges {
        let start = start.0.max(HIGH_RAM_START);
        let end = ranges_end(start, len, ranges);
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

fn ranges_end(start: u64, _len: usize, ranges: &[(GuestAddress, usize)]) -> u64 {
    ranges
        .iter()
        .find(|(s, l)| s.0 <= start && start < s.0 + *l as u64)
        .map_or(start, |(s, l)| s.0 + *l as u64)
}

/// The end of the RAM below the MMIO hole.
pub fn low_ram_end(ranges: &[(GuestAddress, usize)]) -> u64 {
    ranges
        .iter()
        .find(|(s, _)| s.0 == 0)
        .map_or(0, |(_, l)| *l as u64)
}

/// How many virtio-mmio devices fit (one IOAPIC pin each).
pub const fn max_virtio_devices() -> usize {
    (MAX_GSI - VIRTIO_GSI_BASE + 1) as usize
}

/// The guest-physical base of virtio-mmio device `index` and its GSI.
pub fn virtio_slot(index: usize) -> Result<(u64, u32), String> {
    let gsi = VIRTIO_GSI_BASE + index as u32;
    if gsi > MAX_GSI {
        return Err(format!(
            "too many virtio devices: at most {}",
            MAX_GSI - VIRTIO_GSI_BASE + 1
        ));
    }
    Ok((VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_STRIDE, gsi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_low_range() {
        assert_eq!(ram_ranges(512).unwrap(), vec![(GuestAddress(0), 512 << 20)]);
    }

    #[test]
    fn large_guest_splits_around_the_mmio_hole() {
        let r = ram_ranges(4096).unwrap();
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(FOUR_GIB),
                (4096usize << 20) - MMIO_HOLE_START as usize
            )
        );
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(ram_ranges(1).unwrap_err().contains("outside"));
        assert!(ram_ranges(1 << 30).is_err());
    }

    #[test]
    fn memory_map_reserves_the_bios_hole_and_covers_all_ram() {
        let ranges = ram_ranges(4096).unwrap();
        let map = memory_map(&ranges);
        assert_eq!(
            map[0],
            MemoryMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: MemoryKind::Ram
            }
        );
        assert_eq!(map[1].kind, MemoryKind::Reserved);
        assert!(map[1].addr <= ACPI_ADDR && ACPI_ADDR + ACPI_MAX <= map[1].addr + map[1].size);
        assert_eq!(map[2].addr, HIGH_RAM_START);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(map[3].addr, FOUR_GIB);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (4096 << 20) - (HIGH_RAM_START - EBDA_START));
    }

    #[test]
    fn fixed_addresses_do_not_overlap() {
        let mut spans = [
            (GDT_ADDR, 0x40),
            (PVH_START_INFO_ADDR, 0x800),
            (PVH_MEMMAP_ADDR, 0x700),
            (PVH_MODLIST_ADDR, 0x100),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX as u64),
            (ACPI_ADDR, ACPI_MAX),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        const { assert!(BOOT_STACK_ADDR < PML4_ADDR && BOOT_STACK_ADDR > ZERO_PAGE_ADDR + 0x1000) };
    }

    #[test]
    fn virtio_slots_are_pages_with_their_own_gsi() {
        assert_eq!(virtio_slot(0).unwrap(), (VIRTIO_MMIO_BASE, VIRTIO_GSI_BASE));
        assert_eq!(virtio_slot(1).unwrap().0, VIRTIO_MMIO_BASE + 0x1000);
        assert!(virtio_slot(8).unwrap_err().contains("too many"));
    }
}
