//! The architectural state a vCPU starts in: GDT, identity page tables for the 64-bit boot
//! protocol, segment and control registers for each entry mode, FPU, MSRs, CPUID and the
//! local APIC's LINT pins.

use kvm_bindings::{
    CpuId, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::Entry;
use crate::layout;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x83;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// CPUID leaf 1 ECX: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// GDT selectors (index * 8).
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// A GDT descriptor from its flags/access word, base and limit (the layout of the Intel SDM,
/// vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The GDT for an entry mode: null, code (64- or 32-bit), data, TSS.
pub fn gdt(entry: Entry) -> [u64; 4] {
    let code = match entry {
        Entry::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
        Entry::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The KVM segment a GDT descriptor describes.
pub fn segment(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // Granular limits are in 4 KiB pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// Writes the GDT and, for the 64-bit entry, page tables identity-mapping the first GiB.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: Entry) -> Result<(), String> {
    let table = gdt(entry);
    for (i, e) in table.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + 8 * i as u64))
            .map_err(|e| format!("writing the GDT: {e}"))?;
    }
    if let Entry::Linux64 { .. } = entry {
        let write = |addr: u64, value: u64| {
            mem.write_obj(value, GuestAddress(addr))
                .map_err(|e| format!("writing the boot page tables: {e}"))
        };
        write(layout::PML4_ADDR, layout::PDPT_ADDR | PTE_PRESENT_RW)?;
        write(layout::PDPT_ADDR, layout::PD_ADDR | PTE_PRESENT_RW)?;
        for i in 0..512u64 {
            write(layout::PD_ADDR + i * 8, (i << 21) | PDE_2M_PAGE)?;
        }
    }
    Ok(())
}

/// Segment and control registers for `entry`, on top of what KVM reported.
pub fn sregs(mut sregs: kvm_sregs, entry: Entry) -> kvm_sregs {
    let table = gdt(entry);
    let code = segment(table[1], CODE_SELECTOR);
    let data = segment(table[2], DATA_SELECTOR);
    let tss = segment(table[3], TSS_SELECTOR);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match entry {
        Entry::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        Entry::Linux64 { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    sregs
}

/// General-purpose registers for the boot vCPU.
pub fn regs(entry: Entry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { rip } => {
            regs.rip = rip;
            regs.rbx = layout::PVH_START_INFO_ADDR;
        }
        Entry::Linux64 { rip } => {
            regs.rip = rip;
            regs.rsp = layout::BOOT_STACK_ADDR;
            regs.rbp = layout::BOOT_STACK_ADDR;
            regs.rsi = layout::ZERO_PAGE_ADDR;
        }
    }
    regs
}

/// The FPU as after FNINIT, with SSE exceptions masked.
pub fn fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSRs cleared or set the way a firmware would leave them.
pub fn boot_msrs() -> Result<Msrs, String> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ])
    .map_err(|e| format!("building the boot MSR list: {e:?}"))
}

/// What KVM supports, per vCPU: its APIC id in leaf 1 (and 0xb), the hypervisor bit.
pub fn cpuid(mut supported: CpuId, cpu_index: u8, vcpus: u8) -> CpuId {
    for e in supported.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx =
                    (e.ebx & 0x0000_ffff) | (u32::from(cpu_index) << 24) | (u32::from(vcpus) << 16);
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
            }
            0xb => e.edx = u32::from(cpu_index),
            _ => {}
        }
    }
    supported
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// LINT0 delivers external (PIC) interrupts, LINT1 NMIs, as a BIOS sets them up.
pub fn lapic_lints(mut lapic: kvm_lapic_state) -> kvm_lapic_state {
    let mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lint0 = lapic_reg(&lapic, APIC_LVT_LINT0);
    set_lapic_reg(&mut lapic, APIC_LVT_LINT0, mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(&lapic, APIC_LVT_LINT1);
    set_lapic_reg(&mut lapic, APIC_LVT_LINT1, mode(lint1, APIC_MODE_NMI));
    lapic
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_entries_match_the_well_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode_their_descriptor() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(
            (code64.l, code64.db, code64.g, code64.present),
            (1, 0, 1, 1)
        );
        assert_eq!((code64.type_, code64.s, code64.dpl), (0xb, 1, 0));
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment(gdt_entry(0xc093, 0x1234_5678, 0xfffff), DATA_SELECTOR);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!(data.type_, 3);
        assert_eq!(segment(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib_with_2m_pages() {
        let mem = GuestMemoryMmap::from_ranges(&layout::ram_ranges(64).unwrap()).unwrap();
        write_boot_tables(&mem, Entry::Linux64 { rip: 0x100200 }).unwrap();
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(read(layout::PML4_ADDR), layout::PDPT_ADDR | 3);
        assert_eq!(read(layout::PDPT_ADDR), layout::PD_ADDR | 3);
        assert_eq!(read(layout::PD_ADDR), 0x83);
        assert_eq!(read(layout::PD_ADDR + 8), 0x20_0083);
        assert_eq!(read(layout::PD_ADDR + 511 * 8), (511 << 21) | 0x83);
        assert_eq!(
            read(layout::GDT_ADDR + 8),
            gdt(Entry::Linux64 { rip: 0 })[1]
        );
    }

    #[test]
    fn pvh_starts_in_flat_32_bit_protected_mode_without_paging() {
        let entry = Entry::Pvh { rip: 0x100_0000 };
        let s = sregs(kvm_sregs::default(), entry);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert_eq!((s.cs.db, s.cs.l, s.cs.base), (1, 0, 0));
        let r = regs(entry);
        assert_eq!(
            (r.rip, r.rbx, r.rflags),
            (0x100_0000, layout::PVH_START_INFO_ADDR, 2)
        );
    }

    #[test]
    fn linux64_starts_in_long_mode_on_the_boot_page_tables() {
        let entry = Entry::Linux64 { rip: 0x10_0200 };
        let s = sregs(kvm_sregs::default(), entry);
        assert_eq!(s.cr3, layout::PML4_ADDR);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(regs(entry).rsi, layout::ZERO_PAGE_ADDR);
    }

    #[test]
    fn cpuid_gets_apic_ids_and_the_hypervisor_bit() {
        let leaves = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xdead_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                ..Default::default()
            },
        ];
        let out = cpuid(CpuId::from_entries(&leaves).unwrap(), 3, 4);
        let l1 = out.as_slice()[0];
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & CPUID_1_ECX_HYPERVISOR, 0);
        assert_eq!(out.as_slice()[1].edx, 3);
    }

    #[test]
    fn lints_become_extint_and_nmi() {
        let lapic = lapic_lints(kvm_lapic_state::default());
        assert_eq!(
            (lapic_reg(&lapic, APIC_LVT_LINT0) >> 8) & 7,
            APIC_MODE_EXTINT
        );
        assert_eq!((lapic_reg(&lapic, APIC_LVT_LINT1) >> 8) & 7, APIC_MODE_NMI);
    }

    #[test]
    fn boot_msrs_enable_fast_strings() {
        let msrs = boot_msrs().unwrap();
        assert!(
            msrs.as_slice()
                .iter()
                .any(|m| m.index == MSR_IA32_MISC_ENABLE && m.data == 1)
        );
    }
}
