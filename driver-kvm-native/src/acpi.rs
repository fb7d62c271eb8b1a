//! ACPI tables: how the stock kernel finds the virtio-mmio devices and the interrupt
//! controllers.
//!
//! Debian's kernel has `VIRTIO_MMIO_CMDLINE_DEVICES` off, so `virtio_mmio.device=` does not
//! exist there; it does match virtio-mmio devices described in the DSDT (`LNRO0005`), as
//! QEMU's microvm machine and cloud-hypervisor describe them. That is much less device model
//! than virtio-pci (no config space, BARs or MSI-X), and the FADT says "hardware-reduced": no
//! PM timer, no SCI, no legacy PIC, no CMOS clock, no i8042 to probe.

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, Device, EISAName, IO, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

const OEM_ID: [u8; 6] = *b"RUNV  ";
const OEM_TABLE_ID: [u8; 8] = *b"RUNVKVM ";
const OEM_REVISION: u32 = 1;
/// FADT IA-PC boot architecture flag: no CMOS RTC (bit 5); the 8042 bit (1) stays clear.
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// FADT IA-PC boot architecture flag: VGA not present (bit 2).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

/// The tables, laid out from `base`: RSDP first (its address is what the kernel is given),
/// then DSDT, FADT, MADT, XSDT.
pub struct Tables {
    pub rsdp_addr: u64,
    pub blobs: Vec<(u64, Vec<u8>)>,
}

pub fn build(base: u64, vcpus: u8, devices: &[MmioDevice]) -> Result<Tables, String> {
    let rsdp_addr = base;
    let mut next = align8(base + Rsdp::len() as u64);
    let mut blobs = Vec::new();

    let dsdt = dsdt(devices);
    let dsdt_addr = next;
    next = align8(next + dsdt.len() as u64);
    blobs.push((dsdt_addr, dsdt));

    let fadt = fadt(dsdt_addr);
    let fadt_addr = next;
    next = align8(next + fadt.len() as u64);
    blobs.push((fadt_addr, fadt));

    let madt = madt(vcpus);
    let madt_addr = next;
    next = align8(next + madt.len() as u64);
    blobs.push((madt_addr, madt));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = next;
    next += xsdt.len() as u64;
    blobs.push((xsdt_addr, xsdt));

    blobs.insert(0, (rsdp_addr, to_bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    if next > base + layout::ACPI_MAX {
        return Err(format!(
            "the ACPI tables ({} bytes) do not fit in their {} bytes",
            next - base,
            layout::ACPI_MAX
        ));
    }
    Ok(Tables { rsdp_addr, blobs })
}

pub fn write(mem: &GuestMemoryMmap, tables: &Tables) -> Result<(), String> {
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| format!("writing ACPI tables at {addr:#x}: {e}"))?;
    }
    Ok(())
}

fn align8(x: u64) -> u64 {
    x.next_multiple_of(8)
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt(devices: &[MmioDevice]) -> Vec<u8> {
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // COM1, so that the kernel's PNP layer knows the port and its interrupt.
    let com1_hid = EISAName::new("PNP0501");
    let com1_io = IO::new(0x3f8, 0x3f8, 0, 8);
    let com1_irq = Interrupt::new(true, true, false, false, layout::SERIAL_GSI);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_names = [
        Name::new("_HID".into(), &com1_hid),
        Name::new("_UID".into(), &aml::ZERO),
        Name::new("_CRS".into(), &com1_crs),
    ];
    let com1 = Device::new(
        "COM1".into(),
        com1_names.iter().map(|n| n as &dyn Aml).collect(),
    );

    let names: Vec<String> = (0..devices.len()).map(|i| format!("V{i:03X}")).collect();
    let uids: Vec<usize> = (0..devices.len()).collect();
    let mems: Vec<Memory32Fixed> = devices
        .iter()
        .map(|d| Memory32Fixed::new(true, d.base as u32, d.size as u32))
        .collect();
    let irqs: Vec<Interrupt> = devices
        .iter()
        .map(|d| Interrupt::new(true, true, false, false, d.gsi))
        .collect();
    let crss: Vec<ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| ResourceTemplate::new(vec![m as &dyn Aml, i]))
        .collect();
    let hid: &'static str = "LNRO0005";
    let children: Vec<Vec<Name>> = (0..devices.len())
        .map(|i| {
            vec![
                Name::new("_HID".into(), &hid),
                Name::new("_UID".into(), &uids[i]),
                Name::new("_CRS".into(), &crss[i]),
            ]
        })
        .collect();
    let virtio: Vec<Device> = names
        .iter()
        .zip(&children)
        .map(|(n, c)| Device::new(Path::new(n), c.iter().map(|x| x as &dyn Aml).collect()))
        .collect();
    let mut sb: Vec<&dyn Aml> = vec![&com1];
    sb.extend(virtio.iter().map(|d| d as &dyn Aml));
    Scope::new("_SB_".into(), sb).to_aml_bytes(&mut table);
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::Headless)
        .flag(Flags::TmrValExt);
    builder.iapc_boot_arch = (IAPC_BOOT_ARCH_NO_CMOS_RTC | IAPC_BOOT_ARCH_NO_VGA).into();
    to_bytes(&builder.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_ADDR, 0));
    to_bytes(&madt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn devices() -> Vec<MmioDevice> {
        (0..2)
            .map(|i| {
                let (base, gsi) = layout::virtio_slot(i).unwrap();
                MmioDevice {
                    base,
                    size: layout::VIRTIO_MMIO_SIZE,
                    gsi,
                }
            })
            .collect()
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_length() {
        let t = build(layout::ACPI_ADDR, 2, &devices()).unwrap();
        let (_, rsdp) = &t.blobs[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        for (_, table) in &t.blobs[1..] {
            assert_eq!(u32_at(table, 4) as usize, table.len(), "{:?}", &table[..4]);
            assert!(checksum_ok(table), "{:?}", &table[..4]);
        }
    }

    #[test]
    fn rsdp_xsdt_fadt_dsdt_point_at_each_other() {
        let t = build(layout::ACPI_ADDR, 1, &devices()).unwrap();
        let find = |addr: u64| {
            t.blobs
                .iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, b)| b)
                .unwrap()
        };
        assert_eq!(t.rsdp_addr, layout::ACPI_ADDR);
        let xsdt = find(u64_at(&t.blobs[0].1, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let sigs: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|o| &find(u64_at(xsdt, o))[..4])
            .collect();
        assert_eq!(sigs, [b"FACP".as_slice(), b"APIC"]);
        let fadt = find(u64_at(xsdt, 36));
        // X_DSDT at offset 140; flags at 112 carry HW_REDUCED_ACPI.
        assert_eq!(&find(u64_at(fadt, 140))[..4], b"DSDT");
        assert_ne!(u32_at(fadt, 112) & Flags::HwReducedAcpi as u32, 0);
    }

    #[test]
    fn dsdt_names_each_virtio_device_with_its_window_and_gsi() {
        let devs = devices();
        let dsdt = dsdt(&devs);
        let hay = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(hay(b"LNRO0005\0"), devs.len());
        for d in &devs {
            // Memory32Fixed: tag 0x86, length 9, rw, base, size.
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend_from_slice(&(d.base as u32).to_le_bytes());
            mem.extend_from_slice(&(d.size as u32).to_le_bytes());
            assert_eq!(hay(&mem), 1);
            // Extended interrupt: tag 0x89, length 6, consumer|edge, one GSI.
            let mut irq = vec![0x89, 6, 0, 0b11, 1];
            irq.extend_from_slice(&d.gsi.to_le_bytes());
            assert_eq!(hay(&irq), 1);
        }
    }

    #[test]
    fn madt_has_one_local_apic_per_vcpu_and_the_ioapic() {
        let madt = madt(3);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(&madt, 36), layout::LAPIC_ADDR);
        let mut off = 44;
        let mut kinds = Vec::new();
        while off < madt.len() {
            kinds.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(kinds, [0, 0, 0, 1]);
    }
}
