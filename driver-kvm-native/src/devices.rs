//! The legacy devices on the port I/O bus (COM1 for the kernel console, the i8042 reset line)
//! and the dispatch of port I/O and MMIO exits to devices.

use std::fs::File;
use std::io::LineWriter;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::control::Control;
use crate::virtio::MmioTransport;

pub const COM1_BASE: u16 = 0x3f8;
const COM_PORTS: u16 = 8;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;

/// Raises an interrupt line through an irqfd.
pub struct IrqTrigger(pub Arc<EventFd>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The guest's reset request (0xfe to the i8042 command port, what `reboot=k` does) ends
/// the VM: the agent reboots to exit.
pub struct ResetTrigger(pub Arc<Control>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(crate::exit::ExitReason::GuestRebooted);
        Ok(())
    }
}

type Com = Serial<IrqTrigger, NoEvents, LineWriter<File>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct MmioSlot {
    pub base: u64,
    pub size: u64,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Everything a vCPU exit may touch.
pub struct Bus {
    com1: Mutex<Com>,
    i8042: Mutex<I8042Device<ResetTrigger>>,
    mmio: Vec<MmioSlot>,
}

impl Bus {
    /// `console` receives what the guest writes to COM1, a line at a time.
    pub fn new(
        console: File,
        com1_irq: Arc<EventFd>,
        control: Arc<Control>,
        mmio: Vec<MmioSlot>,
    ) -> Self {
        Self {
            com1: Mutex::new(Serial::new(IrqTrigger(com1_irq), LineWriter::new(console))),
            i8042: Mutex::new(I8042Device::new(ResetTrigger(control))),
            mmio,
        }
    }

    /// The bus of a restored VM: COM1 in its saved state (a byte the guest had not read yet
    /// is still there), the rest as [`new`](Self::new).
    pub fn restore(
        console: File,
        com1_irq: Arc<EventFd>,
        control: Arc<Control>,
        mmio: Vec<MmioSlot>,
        serial: &SerialState,
    ) -> Result<Self, String> {
        let com1 = Serial::from_state(
            serial,
            IrqTrigger(com1_irq),
            NoEvents,
            LineWriter::new(console),
        )
        .map_err(|e| format!("restoring COM1: {e:?}"))?;
        Ok(Self {
            com1: Mutex::new(com1),
            i8042: Mutex::new(I8042Device::new(ResetTrigger(control))),
            mmio,
        })
    }

    /// COM1's registers, for a snapshot.
    pub fn serial_state(&self) -> SerialState {
        lock(&self.com1).state()
    }

    /// A port read; ports without a device read as all ones, like a floating ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + COM_PORTS).contains(&p) => {
                *first = lock(&self.com1).read((p - COM1_BASE) as u8);
            }
            I8042_DATA | I8042_COMMAND => {
                *first = lock(&self.i8042).read((port - I8042_DATA) as u8);
            }
            _ => {}
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match port {
            p if (COM1_BASE..COM1_BASE + COM_PORTS).contains(&p) => {
                // A console write can only fail on the host file: the guest goes on.
                let _ = lock(&self.com1).write((p - COM1_BASE) as u8, value);
            }
            I8042_DATA | I8042_COMMAND => {
                let _ = lock(&self.i8042).write((port - I8042_DATA) as u8, value);
            }
            _ => {}
        }
    }

    fn slot(&self, addr: u64) -> Option<(&MmioSlot, u64)> {
        self.mmio
            .iter()
            .find(|s| addr >= s.base && addr - s.base < s.size)
            .map(|s| (s, addr - s.base))
    }

    /// An MMIO read; addresses without a device read as zero.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some((slot, offset)) = self.slot(addr) {
            lock(&slot.transport).read(offset, data);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.slot(addr) {
            lock(&slot.transport).write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn bus() -> (Bus, Arc<Control>, Arc<EventFd>, TempFile) {
        let log = TempFile::new().unwrap();
        let control = Arc::new(Control::default());
        let irq = Arc::new(EventFd::new(0).unwrap());
        let file = File::options().append(true).open(log.as_path()).unwrap();
        (
            Bus::new(file, irq.clone(), control.clone(), Vec::new()),
            control,
            irq,
            log,
        )
    }

    #[test]
    fn com1_output_reaches_the_console_log_by_lines() {
        let (bus, _, _, log) = bus();
        for b in b"hello\n" {
            bus.pio_write(COM1_BASE, &[*b]);
        }
        assert_eq!(std::fs::read(log.as_path()).unwrap(), b"hello\n");
        // The line status register says the transmitter is empty.
        let mut lsr = [0u8];
        bus.pio_read(COM1_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn i8042_reset_ends_the_vm_and_status_reads_ready() {
        let (bus, control, _, _log) = bus();
        let mut status = [0xffu8];
        bus.pio_read(I8042_COMMAND, &mut status);
        assert_eq!(
            status[0] & 0x2,
            0,
            "input buffer must read empty, or the kernel waits"
        );
        bus.pio_write(I8042_COMMAND, &[0xaa]);
        assert_eq!(control.exit_reason(), None);
        bus.pio_write(I8042_COMMAND, &[0xfe]);
        assert_eq!(
            control.exit_reason(),
            Some(crate::exit::ExitReason::GuestRebooted)
        );
    }

    #[test]
    fn unknown_ports_float_and_unknown_mmio_reads_zero() {
        let (bus, _, _, _log) = bus();
        let mut two = [0u8; 2];
        bus.pio_read(0x2f8, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut four = [0xffu8; 4];
        bus.mmio_read(0xd000_0000, &mut four);
        assert_eq!(four, [0; 4]);
        bus.pio_write(0x80, &[]);
        bus.mmio_write(0xd000_0000, &[1, 2, 3, 4]);
    }
}
