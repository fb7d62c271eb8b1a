//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register window a guest
//! driver programs to negotiate features, set up the queues and start one [`VirtioDevice`].
//!
//! Queue notifications: [`MmioTransport::queue_events`] holds one eventfd per queue for the
//! VMM to register as KVM ioeventfds; the event loop drains an eventfd that fired and then
//! calls [`MmioTransport::notify`], which never reads the eventfd itself.
//!
//! Saving and restoring a transport (templates) is in `mmio_snapshot.rs`.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{Interrupt, VirtioDevice};

/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) register layout.
const VERSION: u32 = 2;
/// "QEMU": guests only print it, and it is what they are used to seeing.
const VENDOR_ID: u32 = 0x554d_4551;

// Register offsets (virtio 1.2, 4.2.2, table "MMIO Device Register Layout").
const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

#[path = "mmio_snapshot.rs"]
mod snapshot;

/// One virtio device as the guest sees it on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    /// The driver's view of the queues. After activation the device works on copies, so these
    /// only answer register reads until the next reset.
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    last_error: Option<String>,
    /// The VM is being saved: queue and host events wait until [`thaw`](Self::thaw).
    frozen: bool,
    /// Interrupts a restored device owes the guest, raised once the vCPUs exist.
    owed_interrupts: u32,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: Arc<EventFd>,
    ) -> Result<Self, String> {
        let queues = new_queues(device.as_ref())?;
        let queue_evts = (0..queues.len())
            .map(|i| {
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| format!("creating the eventfd for virtio queue {i}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt: Interrupt::new(irqfd),
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            last_error: None,
            frozen: false,
            owed_interrupts: 0,
        })
    }

    /// One eventfd per queue, in queue order: register each as a KVM ioeventfd on
    /// `base + 0x50` with datamatch = its index. The caller drains a fired eventfd before
    /// calling [`notify`](Self::notify).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The guest notified `queue` (through its ioeventfd). Ignored before activation.
    pub fn notify(&mut self, queue: u16) {
        if self.activated && !self.frozen && usize::from(queue) < self.queues.len() {
            self.device.queue_notify(queue);
        }
    }

    pub fn host_fds(&self) -> Vec<RawFd> {
        self.device.host_fds()
    }

    pub fn host_fd_ready(&mut self, fd: RawFd, readable: bool, writable: bool) {
        if !self.frozen {
            self.device.host_fd_ready(fd, readable, writable);
        }
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device's helper process, if it has one.
    pub fn device_process(&self) -> Option<u32> {
        self.device.process()
    }

    /// Whether the driver started the device (DRIVER_OK) and it has not been reset since.
    pub fn activated(&self) -> bool {
        self.activated
    }

    /// Why the last DRIVER_OK did not start the device: the guest only sees
    /// DEVICE_NEEDS_RESET, this is for the VMM's log.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// A guest read of `data.len()` bytes at `offset` within the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(word) = <&mut [u8; 4]>::try_from(&mut *data) else {
            data.fill(0);
            return;
        };
        let value = match offset {
            REG_MAGIC_VALUE => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => feature_page(self.device.features(), self.device_features_sel),
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: the spec has a length of -1 mean "no such region".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            // The configuration space never changes under the driver.
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        *word = value.to_le_bytes();
    }

    /// A guest write of `data` at `offset` within the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(word);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let (Some(q), Ok(size)) = (self.configurable_queue(), u16::try_from(value)) {
                    q.set_size(size);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.configurable_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Without VIRTIO_F_NOTIFICATION_DATA the value is just the queue index.
                if let Ok(queue) = u16::try_from(value) {
                    self.notify(queue);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_DESC_LOW => {
                self.set_queue_address(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.set_queue_address(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_DRIVER_LOW => {
                self.set_queue_address(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.set_queue_address(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => {
                self.set_queue_address(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_DEVICE_HIGH => {
                self.set_queue_address(|q| q.set_used_ring_address(None, Some(value)))
            }
            _ => {}
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    /// The selected queue, unless the device already owns the queues.
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
    }

    fn set_queue_address(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.configurable_queue() {
            set(q);
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // The features are fixed once the device accepted them.
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.acked_features =
            (self.acked_features & !(u64::from(u32::MAX) << shift)) | (u64::from(value) << shift);
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set and stays until the reset.
        let mut status = (value & !STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET);
        let newly_set = status & !self.status;
        if newly_set & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads Status back to learn that the negotiation failed.
            status &= !STATUS_FEATURES_OK;
        }
        if newly_set & STATUS_DRIVER_OK != 0 && !self.activated {
            if let Err(e) = self.activate(status) {
                self.last_error = Some(e);
                status |= STATUS_NEEDS_RESET;
            }
        }
        self.status = status;
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.acked_features & !offered == 0 && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self, status: u32) -> Result<(), String> {
        if status & STATUS_FEATURES_OK == 0 {
            return Err("the driver set DRIVER_OK without FEATURES_OK".to_string());
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(format!(
                    "virtio queue {i} is not valid (size {}, desc {:#x}, avail {:#x}, used {:#x})",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ));
            }
            q.set_event_idx(event_idx);
            queues.push(
                Queue::try_from(q.state())
                    .map_err(|e| format!("copying virtio queue {i} for the device: {e}"))?,
            );
        }
        self.device.activate(
            self.mem.clone(),
            self.interrupt.clone(),
            queues,
            self.acked_features,
        )?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.ack(u32::MAX);
    }
}

fn new_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, String> {
    device
        .queue_max_sizes()
        .into_iter()
        .enumerate()
        .map(|(i, max)| {
            Queue::new(max).map_err(|e| format!("virtio queue {i} with maximum size {max}: {e}"))
        })
        .collect()
}

fn feature_page(features: u64, sel: u32) -> u32 {
    match sel {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// Driver-side helpers shared by the device tests.
#[cfg(test)]
pub(crate) mod test_utils {
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;

    pub fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// Makes a chain of `(address, length, device-writable)` buffers available, its
    /// descriptors at table index `first` on. The mock does not wrap the available ring, so
    /// a test may add at most the queue size of chains.
    pub fn add_chain(
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        first: u16,
        bufs: &[(u64, u32, bool)],
    ) {
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = 0;
                if writable {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = first + u16::try_from(i).unwrap() + 1;
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        vq.add_desc_chains(&descs, first).unwrap();
    }

    pub fn used_idx(vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        vq.used().idx().load()
    }

    /// The `(head, length)` of used ring entry `i`.
    pub fn used_elem(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let elem = vq.used().ring().ref_at(i).unwrap().load();
        (elem.id(), elem.len())
    }

    pub fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0xff; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    pub const S_ACK_DRIVER: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

    pub fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        w(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(t, REG_STATUS, S_ACK_DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, features as u32);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        w(t, REG_STATUS, S_ACK_DRIVER | STATUS_FEATURES_OK);
        r(t, REG_STATUS) & STATUS_FEATURES_OK != 0
    }

    pub fn setup_queue(
        t: &mut MmioTransport,
        index: u32,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        size: u32,
    ) {
        w(t, REG_QUEUE_SEL, index);
        w(t, REG_QUEUE_NUM, size);
        let desc = vq.desc_table_addr().0;
        let avail = vq.avail_addr().0;
        let used = vq.used_addr().0;
        w(t, REG_QUEUE_DESC_LOW, desc as u32);
        w(t, REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(t, REG_QUEUE_DRIVER_LOW, avail as u32);
        w(t, REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        w(t, REG_QUEUE_DEVICE_LOW, used as u32);
        w(t, REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        w(t, REG_QUEUE_READY, 1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::test_utils::*;
    use super::*;
    use crate::virtio::INT_USED_RING;
    use crate::virtio::state::QueueSnapshot;

    #[derive(Default)]
    struct Log {
        activations: usize,
        resets: usize,
        notified: Vec<u16>,
        acked: u64,
        queue_sizes: Vec<(bool, u16)>,
        config_writes: Vec<(u64, Vec<u8>)>,
        interrupt: Option<Interrupt>,
        queues: Vec<QueueSnapshot>,
    }

    const FEATURE_X: u64 = 1 << 40;

    struct MockDevice {
        log: Arc<Mutex<Log>>,
        fail_activate: bool,
    }

    impl VirtioDevice for MockDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 8]
        }
        fn features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | FEATURE_X | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8).wrapping_add(0x10);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.log
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Interrupt,
            queues: Vec<Queue>,
            acked_features: u64,
        ) -> Result<(), String> {
            if self.fail_activate {
                return Err("no".to_string());
            }
            let mut log = self.log.lock().unwrap();
            log.activations += 1;
            log.acked = acked_features;
            log.queue_sizes = queues.iter().map(|q| (q.ready(), q.size())).collect();
            log.queues = queues.iter().map(QueueSnapshot::from).collect();
            log.interrupt = Some(interrupt);
            Ok(())
        }
        fn queue_notify(&mut self, index: u16) {
            self.log.lock().unwrap().notified.push(index);
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().resets += 1;
        }
        fn active_queues(&self) -> Vec<QueueSnapshot> {
            self.log.lock().unwrap().queues.clone()
        }
    }

    fn transport(fail_activate: bool) -> (MmioTransport, Arc<Mutex<Log>>, Arc<EventFd>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let device = MockDevice {
            log: log.clone(),
            fail_activate,
        };
        let t = MmioTransport::new(Box::new(device), guest_memory(), irqfd.clone()).unwrap();
        (t, log, irqfd)
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport(false);
        assert_eq!(r(&mut t, REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(r(&mut t, REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(t.device_type(), 42);
        assert_eq!(t.queue_events().len(), 2);
    }

    #[test]
    fn unknown_and_odd_sized_reads_are_zero() {
        let (mut t, _, _) = transport(false);
        for offset in [0x018, 0x028, 0x03c, 0x048, 0x0c0, 0x0f8, 0x001, 0x0fd] {
            assert_eq!(r(&mut t, offset), 0, "offset {offset:#x}");
        }
        let mut two = [0xff; 2];
        t.read(REG_MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut eight = [0xff; 8];
        t.read(REG_MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        // No shared memory regions.
        w(&mut t, 0x0ac, 0);
        assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, REG_SHM_LEN_HIGH), u32::MAX);
        // Odd-sized writes are ignored.
        t.write(REG_STATUS, &[1, 0]);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn feature_pages() {
        let (mut t, _, _) = transport(false);
        let features = (1 << VIRTIO_F_VERSION_1) | FEATURE_X | 0b101;
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), features as u32);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (features >> 32) as u32);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_ok_needs_version_1() {
        let (mut t, _, _) = transport(false);
        assert!(!negotiate(&mut t, 0b101));
        assert_eq!(r(&mut t, REG_STATUS), S_ACK_DRIVER);
    }

    #[test]
    fn features_ok_rejects_features_not_offered() {
        let (mut t, _, _) = transport(false);
        assert!(!negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | 0b10));
        w(&mut t, REG_STATUS, 0);
        assert!(negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | FEATURE_X));
    }

    #[test]
    fn queue_setup_and_driver_ok_activate_once() {
        let (mut t, log, _) = transport(false);
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);

        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);

        assert!(negotiate(&mut t, (1 << VIRTIO_F_VERSION_1) | FEATURE_X));
        setup_queue(&mut t, 0, &vq, 16);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);

        // Notifications before DRIVER_OK go nowhere.
        t.notify(0);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert!(log.lock().unwrap().notified.is_empty());

        let running = S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, REG_STATUS, running);
        assert_eq!(r(&mut t, REG_STATUS), running);
        assert!(t.activated());
        w(&mut t, REG_STATUS, running);
        {
            let log = log.lock().unwrap();
            assert_eq!(log.activations, 1);
            assert_eq!(log.acked, (1 << VIRTIO_F_VERSION_1) | FEATURE_X);
            assert_eq!(log.queue_sizes, vec![(true, 16), (false, 8)]);
        }

        t.notify(1);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        w(&mut t, REG_QUEUE_NOTIFY, 7);
        t.notify(9);
        assert_eq!(log.lock().unwrap().notified, vec![1, 0]);

        // The device owns the queues now.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let (mut t, log, _) = transport(false);
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_DESC_LOW, 0);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x100);
        w(&mut t, REG_QUEUE_READY, 1);
        w(
            &mut t,
            REG_STATUS,
            S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(!t.activated());
        assert!(t.last_error().unwrap().contains("queue 0"));
        assert_eq!(log.lock().unwrap().activations, 0);
    }

    #[test]
    fn driver_ok_without_features_ok_does_not_activate() {
        let (mut t, log, _) = transport(false);
        w(&mut t, REG_STATUS, S_ACK_DRIVER | STATUS_DRIVER_OK);
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_eq!(log.lock().unwrap().activations, 0);
    }

    #[test]
    fn failed_activation_sets_needs_reset() {
        let (mut t, _, _) = transport(true);
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        w(
            &mut t,
            REG_STATUS,
            S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert_eq!(t.last_error(), Some("no"));
    }

    #[test]
    fn interrupt_status_and_ack() {
        let (mut t, log, irqfd) = transport(false);
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        w(
            &mut t,
            REG_STATUS,
            S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        let interrupt = log.lock().unwrap().interrupt.clone().unwrap();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        interrupt.signal_used_queue();
        interrupt.signal_config_change();
        assert_eq!(irqfd.read().unwrap(), 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING | 2);
        w(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 2);
        w(&mut t, REG_INTERRUPT_ACK, 2);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn status_zero_resets() {
        let (mut t, log, _) = transport(false);
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, &vq, 8);
        w(
            &mut t,
            REG_STATUS,
            S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        log.lock()
            .unwrap()
            .interrupt
            .clone()
            .unwrap()
            .signal_used_queue();
        assert_eq!(log.lock().unwrap().queue_sizes[0], (true, 8));

        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        assert!(!t.activated());
        assert_eq!(log.lock().unwrap().resets, 1);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        t.notify(0);
        assert!(log.lock().unwrap().notified.is_empty());

        // A second life, with the default queue size this time.
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        w(&mut t, REG_QUEUE_SEL, 0);
        let desc = vq.desc_table_addr().0 as u32;
        w(&mut t, REG_QUEUE_DESC_LOW, desc);
        w(&mut t, REG_QUEUE_DRIVER_LOW, vq.avail_addr().0 as u32);
        w(&mut t, REG_QUEUE_DEVICE_LOW, vq.used_addr().0 as u32);
        w(&mut t, REG_QUEUE_READY, 1);
        w(
            &mut t,
            REG_STATUS,
            S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        let log = log.lock().unwrap();
        assert_eq!(log.activations, 2);
        assert_eq!(log.queue_sizes[0], (true, 16));
    }

    #[test]
    fn config_space_is_forwarded() {
        let (mut t, log, _) = transport(false);
        let mut data = [0; 3];
        t.read(0x105, &mut data);
        assert_eq!(data, [0x15, 0x16, 0x17]);
        let mut byte = [0];
        t.read(0x100, &mut byte);
        assert_eq!(byte, [0x10]);
        t.write(0x102, &[1, 2]);
        assert_eq!(log.lock().unwrap().config_writes, vec![(2, vec![1, 2])]);
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 0);
    }

    #[test]
    fn driver_features_are_frozen_after_features_ok() {
        let (mut t, log, _) = transport(false);
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0b101);
        w(
            &mut t,
            REG_STATUS,
            S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(log.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
    }
}
