//! Snapshots of a transport: [`MmioTransport::freeze`] stops the device from touching guest
//! memory while a paused VM is saved, [`MmioTransport::save`] describes it,
//! [`MmioTransport::restore`] rebuilds it around a clone's own device from that description,
//! which is untrusted: every size, index and feature is checked against the device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{MmioTransport, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
use crate::snapshot::blob::Blob;
use crate::virtio::state::{QueueSnapshot, TransportState};
use crate::virtio::{INT_CONFIG, INT_USED_RING, VirtioDevice};

/// Every Status bit a driver or device may set (virtio 1.2, 2.1).
const STATUS_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x80;
/// The device-specific configuration window (0x100..0x200).
const CONFIG_WINDOW: usize = 0x100;

impl MmioTransport {
    /// Rebuilds a saved transport around `device` (the clone's own, of the same type), in
    /// memory that holds the saved guest. The device is activated on the saved queues; a
    /// configuration space that differs from the saved one (a disk of another size, another
    /// MAC) owes the guest a configuration-change interrupt, and chains the template's device
    /// held are given back: see [`raise_owed_interrupts`](Self::raise_owed_interrupts).
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irqfd: Arc<EventFd>,
        state: &TransportState,
    ) -> Result<Self, String> {
        let mut t = Self::new(device, mem, irqfd)?;
        if state.device_type != t.device.device_type() {
            return Err(format!(
                "the template has a device of type {} where this VM has one of type {}",
                state.device_type,
                t.device.device_type()
            ));
        }
        if state.queues.len() != t.queues.len() {
            return Err(format!(
                "{} queues in the state file, the device has {}",
                state.queues.len(),
                t.queues.len()
            ));
        }
        let offered = t.device.features();
        if state.acked_features & !offered != 0 {
            return Err(format!(
                "the guest accepted features {:#x} that this device does not offer ({offered:#x})",
                state.acked_features
            ));
        }
        if state.status & !STATUS_KNOWN != 0 {
            return Err(format!("unknown device status bits {:#x}", state.status));
        }
        let running = STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if state.activated && state.status & running != running {
            return Err(format!(
                "a started device whose status {:#x} lacks FEATURES_OK or DRIVER_OK",
                state.status
            ));
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(format!(
                "unknown interrupt status bits {:#x}",
                state.interrupt_status
            ));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, max)) in state.queues.iter().zip(&t.queues).enumerate() {
            if saved.max_size != max.max_size() {
                return Err(format!(
                    "queue {i}: maximum size {} in the state file, the device's is {}",
                    saved.max_size,
                    max.max_size()
                ));
            }
            let q = saved.to_queue().map_err(|e| format!("queue {i}: {e}"))?;
            if state.activated && q.ready() && !q.is_valid(&t.mem) {
                return Err(format!(
                    "queue {i}: its rings (size {}, desc {:#x}, avail {:#x}, used {:#x}) are                      not in guest memory",
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring()
                ));
            }
            queues.push(q);
        }
        for &(queue, head) in &state.in_flight {
            let q = queues
                .get_mut(usize::from(queue))
                .filter(|q| q.ready() && state.activated)
                .ok_or_else(|| {
                    format!("a chain in flight on queue {queue}, which is not in use")
                })?;
            q.add_used(&t.mem, head, 0)
                .map_err(|e| format!("giving back chain {head} of queue {queue}: {e:?}"))?;
            t.owed_interrupts |= INT_USED_RING;
        }
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.acked_features = state.acked_features;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.interrupt.set_status(state.interrupt_status);
        if state.activated {
            let copies = queues
                .iter()
                .map(|q| Queue::try_from(q.state()).map_err(|e| format!("{e:?}")))
                .collect::<Result<Vec<_>, _>>()?;
            t.device.activate(
                t.mem.clone(),
                t.interrupt.clone(),
                copies,
                state.acked_features,
            )?;
            t.activated = true;
            if t.config_bytes() != state.config {
                t.owed_interrupts |= INT_CONFIG;
            }
        }
        t.queues = queues;
        Ok(t)
    }

    /// Raises what [`restore`](Self::restore) found the guest must hear about: call it once the
    /// vCPUs (and their local APICs) are restored, or the interrupt has nowhere to go.
    pub fn raise_owed_interrupts(&mut self) {
        let owed = std::mem::take(&mut self.owed_interrupts);
        if owed & INT_USED_RING != 0 {
            self.interrupt.signal_used_queue();
        }
        if owed & INT_CONFIG != 0 {
            self.interrupt.signal_config_change();
        }
    }

    /// Stops serving queue and host events, so that guest memory stays as saved.
    pub fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Serves events again, and catches up on the ones that came while frozen (their edges
    /// are gone).
    pub fn thaw(&mut self) {
        if !std::mem::take(&mut self.frozen) || !self.activated {
            return;
        }
        for fd in self.device.host_fds() {
            self.device.host_fd_ready(fd, true, true);
        }
        for queue in 0..self.queues.len() {
            self.device.queue_notify(queue as u16);
        }
    }

    /// The device as the state file keeps it.
    pub fn save(&self) -> TransportState {
        let queues: Vec<QueueSnapshot> = if self.activated {
            self.device.active_queues()
        } else {
            self.queues.iter().map(QueueSnapshot::from).collect()
        };
        TransportState {
            device_type: self.device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            queues,
            in_flight: if self.activated {
                self.device.in_flight()
            } else {
                Vec::new()
            },
            config: self.config_bytes(),
        }
    }

    fn config_bytes(&self) -> Blob {
        let mut config = vec![0u8; CONFIG_WINDOW];
        self.device.read_config(0, &mut config);
        Blob(config)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::super::test_utils::*;
    use super::*;
    use crate::virtio::{Block, Console};

    const RUNNING: u32 = S_ACK_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    const DATA: u64 = 0x10_0000;

    fn irq() -> Arc<EventFd> {
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    /// A started console transport on `rxq`/`txq`, and the host end of its socket.
    fn console(
        mem: &GuestMemoryMmap,
        rxq: &MockSplitQueue<'_, GuestMemoryMmap>,
        txq: &MockSplitQueue<'_, GuestMemoryMmap>,
    ) -> (MmioTransport, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        let mut t =
            MmioTransport::new(Box::new(Console::new(ours).unwrap()), mem.clone(), irq()).unwrap();
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, rxq, 16);
        setup_queue(&mut t, 1, txq, 16);
        w(&mut t, 0x070, RUNNING);
        assert!(t.activated());
        (t, host)
    }

    fn send(mem: &GuestMemoryMmap, txq: &MockSplitQueue<'_, GuestMemoryMmap>, at: u16, s: &[u8]) {
        let addr = DATA + u64::from(at) * 0x100;
        mem.write_slice(s, GuestAddress(addr)).unwrap();
        add_chain(txq, at, &[(addr, s.len() as u32, false)]);
    }

    #[test]
    fn a_restored_device_goes_on_where_the_saved_one_stopped() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let (mut t, mut host) = console(&mem, &rxq, &txq);
        send(&mem, &txq, 0, b"hello");
        t.notify(1);
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();

        t.freeze();
        // Frozen: a notification does nothing, so guest memory stays as saved.
        send(&mem, &txq, 1, b"world");
        t.notify(1);
        assert_eq!(used_idx(&txq), 1);
        let state = t.save();
        assert_eq!(
            (state.queues[1].next_avail, state.queues[1].next_used),
            (1, 1)
        );
        assert!(state.activated && state.in_flight.is_empty());
        let json = serde_json::to_string(&state).unwrap();
        let state: TransportState = serde_json::from_str(&json).unwrap();

        // The clone's console, on its own socket: the chain made while frozen is its first.
        let (ours, mut clone_host) = UnixStream::pair().unwrap();
        let device = Box::new(Console::new(ours).unwrap());
        let mut c = MmioTransport::restore(device, mem.clone(), irq(), &state).unwrap();
        assert!(c.activated());
        assert_eq!(r(&mut c, 0x070), RUNNING);
        c.notify(1);
        let mut got = [0u8; 5];
        clone_host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");
        assert_eq!(used_idx(&txq), 2);
    }

    #[test]
    fn thawing_catches_up_on_what_came_while_frozen() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let (mut t, mut host) = console(&mem, &rxq, &txq);
        t.freeze();
        send(&mem, &txq, 0, b"late");
        t.notify(1);
        t.host_fd_ready(0, true, true);
        assert_eq!(used_idx(&txq), 0);
        t.thaw();
        assert_eq!(used_idx(&txq), 1);
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"late");
    }

    #[test]
    fn a_chain_in_flight_is_given_back_and_interrupts() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let (t, _host) = console(&mem, &rxq, &txq);
        let mut state = t.save();
        state.in_flight = vec![(1, 3)];
        let (ours, _peer) = UnixStream::pair().unwrap();
        let irqfd = irq();
        let mut c = MmioTransport::restore(
            Box::new(Console::new(ours).unwrap()),
            mem.clone(),
            irqfd.clone(),
            &state,
        )
        .unwrap();
        assert_eq!(used_idx(&txq), 1);
        assert_eq!(used_elem(&txq, 0), (3, 0));
        assert!(irqfd.read().is_err(), "an interrupt before the vCPUs exist");
        c.raise_owed_interrupts();
        assert_eq!(irqfd.read().unwrap(), 1);
        assert_eq!(r(&mut c, 0x060) & INT_USED_RING, INT_USED_RING);

        state.in_flight = vec![(7, 0)];
        let (ours, _peer) = UnixStream::pair().unwrap();
        let e = MmioTransport::restore(
            Box::new(Console::new(ours).unwrap()),
            mem.clone(),
            irq(),
            &state,
        )
        .err()
        .unwrap();
        assert_eq!(e, "a chain in flight on queue 7, which is not in use");
    }

    #[test]
    fn a_clone_disk_of_another_size_owes_a_config_change() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut t = MmioTransport::new(
            Box::new(Block::empty("rootfs").unwrap()),
            mem.clone(),
            irq(),
        )
        .unwrap();
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, &vq, 16);
        w(&mut t, 0x070, RUNNING);
        let state = t.save();

        let same = Box::new(Block::empty("rootfs").unwrap());
        let irqfd = irq();
        let mut c = MmioTransport::restore(same, mem.clone(), irqfd.clone(), &state).unwrap();
        c.raise_owed_interrupts();
        assert!(irqfd.read().is_err(), "nothing changed, yet an interrupt");

        let disk = vmm_sys_util::tempfile::TempFile::new().unwrap();
        disk.as_file().set_len(1 << 20).unwrap();
        let bigger = Box::new(Block::new(disk.into_file(), false, "rootfs").unwrap());
        let irqfd = irq();
        let mut c = MmioTransport::restore(bigger, mem.clone(), irqfd.clone(), &state).unwrap();
        c.raise_owed_interrupts();
        assert_eq!(irqfd.read().unwrap(), 1);
        assert_eq!(r(&mut c, 0x060), INT_CONFIG);
        assert_eq!(r(&mut c, 0x100), 2048, "capacity in sectors");
    }

    #[test]
    fn states_that_do_not_fit_the_device_are_refused() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let (t, _host) = console(&mem, &rxq, &txq);
        let good = t.save();
        let attempt = |change: &dyn Fn(&mut TransportState)| {
            let mut state = good.clone();
            change(&mut state);
            let (ours, _peer) = UnixStream::pair().unwrap();
            MmioTransport::restore(
                Box::new(Console::new(ours).unwrap()),
                mem.clone(),
                irq(),
                &state,
            )
            .err()
            .unwrap()
        };
        assert_eq!(
            attempt(&|s| s.device_type = 2),
            "the template has a device of type 2 where this VM has one of type 3"
        );
        assert!(attempt(&|s| s.acked_features |= 1 << 50).contains("does not offer"));
        assert!(attempt(&|s| s.queues.pop().map(drop).unwrap_or(())).contains("1 queues"));
        assert!(attempt(&|s| s.status = 0x300).contains("unknown device status"));
        assert!(attempt(&|s| s.status = S_ACK_DRIVER).contains("lacks FEATURES_OK"));
        assert!(attempt(&|s| s.interrupt_status = 4).contains("unknown interrupt status"));
        assert!(attempt(&|s| s.queues[0].max_size = 8).contains("maximum size 8"));
        assert!(attempt(&|s| s.queues[1].size = 7).starts_with("queue 1: "));
        assert!(attempt(&|s| s.queues[1].used_ring = 0x7fff_0000).contains("not in guest memory"));
    }
}
