//! virtio devices on the MMIO transport (virtio 1.x, split queues).
//!
//! Threads: the MMIO registers are read and written by vCPU threads; queue notifications
//! (ioeventfds registered with KVM) and host file descriptors are served by the VMM's event
//! loop. Both reach a device through the `Mutex` around its [`MmioTransport`].

pub mod block;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod state;

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use block::Block;
pub use console::Console;
pub use fs::{Fs, FsBackend};
pub use mmio::MmioTransport;
pub use net::Net;

/// virtio device ids (virtio 1.2, 5).
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_BLOCK: u32 = 2;

/// InterruptStatus bits of the MMIO transport.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The device's interrupt line: the InterruptStatus register plus the irqfd that KVM turns
/// into an edge on the device's GSI.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    irqfd: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(irqfd: Arc<EventFd>) -> Self {
        Self {
            status: Arc::new(AtomicU32::new(0)),
            irqfd,
        }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // An eventfd write fails only when the counter would overflow: it is pending anyway.
        let _ = self.irqfd.write(1);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The InterruptStatus register of a restored device (the line's state is the irqchip's).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// The next available chain; when there is none, re-enables guest notifications and looks
/// once more, for a chain the guest added in between (with EVENT_IDX it will not kick for it).
pub fn pop_or_enable_notification<'a>(
    queue: &mut virtio_queue::Queue,
    mem: &'a GuestMemoryMmap,
) -> Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmap>> {
    use virtio_queue::QueueT;
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match queue.enable_notification(mem) {
        Ok(true) => queue.pop_descriptor_chain(mem),
        _ => None,
    }
}

/// Copies the front of `data` into the chain's writable buffers; returns how many bytes
/// landed. Bytes that did not fit, or met a bad buffer, stay with the caller.
pub fn write_to_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    data: &[u8],
) -> usize {
    let mut placed = 0;
    for desc in chain.writable() {
        let rest = &data[placed..];
        if rest.is_empty() {
            break;
        }
        let n = usize::try_from(desc.len()).map_or(rest.len(), |len| len.min(rest.len()));
        if mem.write_slice(&rest[..n], desc.addr()).is_err() {
            break;
        }
        placed += n;
    }
    placed
}

pub fn signal_used(queue: &mut virtio_queue::Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    // When the ring cannot be read, an extra interrupt is the safe side.
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}

/// Reads `data.len()` bytes of a device's configuration space `config` from `offset`; bytes
/// past its end read as 0.
pub fn read_config_window(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = start
            .checked_add(i)
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// One virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space (out-of-range bytes read as 0).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: the queues are valid from now on.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<virtio_queue::Queue>,
        acked_features: u64,
    ) -> Result<(), String>;
    /// The guest notified queue `index`.
    fn queue_notify(&mut self, index: u16);
    /// Host file descriptors the event loop watches for this device, edge-triggered for both
    /// reading and writing; events before activation are the device's to remember.
    fn host_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `fd` (one of [`host_fds`](Self::host_fds)) became readable and/or writable.
    fn host_fd_ready(&mut self, _fd: RawFd, _readable: bool, _writable: bool) {}
    /// The driver reset the device: drop the queues and go back to the state before activate.
    fn reset(&mut self);
    /// The queues as the device works on them since activation (none before).
    fn active_queues(&self) -> Vec<state::QueueSnapshot>;
    /// Chains taken from a queue and not yet returned, as (queue, head).
    fn in_flight(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }
    /// A process that serves this device (virtiofsd), whose PID the core records.
    fn process(&self) -> Option<u32> {
        None
    }
}
