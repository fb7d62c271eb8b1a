//! virtio-net (virtio 1.2, 5.1) on a host tap device, without offloads: every frame the guest
//! sends is complete (no checksum or segmentation offload is negotiated), and the tap, opened
//! without a vnet header, hands complete frames to us. The 12-byte virtio-net header is
//! stripped on transmit and written (all zero but `num_buffers = 1`) on receive.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::state::QueueSnapshot;
use super::{Interrupt, VirtioDevice, pop_or_enable_notification, signal_used, write_to_chain};

pub const TYPE_NET: u32 = 1;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
const HEADER_LEN: usize = 12;
/// The largest frame a tap hands out without offloads: a 64 KiB MTU plus the Ethernet header.
const MAX_FRAME: usize = 65536 + 14;

pub struct Net {
    /// `None` for a template's NIC, which has no host side yet (its clones bring their own
    /// tap): what the guest sends is dropped and nothing arrives.
    tap: Option<File>,
    mac: [u8; 6],
    mtu: u16,
    active: Option<Active>,
    /// A frame read from the tap that waits for a receive buffer (header included).
    pending: Option<Vec<u8>>,
    tap_readable: bool,
    frame: Vec<u8>,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
}

impl Net {
    /// `tap` must be non-blocking, opened with `IFF_TAP | IFF_NO_PI` (no vnet header).
    pub fn new(tap: Option<File>, mac: [u8; 6], mtu: u16) -> Self {
        Self {
            tap,
            mac,
            mtu,
            active: None,
            pending: None,
            tap_readable: false,
            frame: vec![0; MAX_FRAME],
        }
    }

    fn config(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        // status (6..8) without VIRTIO_NET_F_STATUS; max_virtqueue_pairs (8..10) = 1.
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c
    }

    /// Reads the next frame from the tap, header first; `None` when it has none now.
    fn read_frame(&mut self) -> Option<Vec<u8>> {
        let tap = self.tap.as_mut()?;
        loop {
            match tap.read(&mut self.frame) {
                Ok(0) => return None,
                Ok(n) => {
                    let mut out = vec![0u8; HEADER_LEN];
                    out[10..12].copy_from_slice(&1u16.to_le_bytes());
                    out.extend_from_slice(&self.frame[..n]);
                    return Some(out);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.tap_readable = false;
                    return None;
                }
            }
        }
    }

    /// Tap frames into receive buffers until either runs out.
    fn process_rx(&mut self) {
        let mut used = false;
        loop {
            if self.pending.is_none() {
                if !self.tap_readable {
                    break;
                }
                self.pending = self.read_frame();
                if self.pending.is_none() {
                    break;
                }
            }
            let Some(active) = self.active.as_mut() else {
                break;
            };
            let queue = &mut active.queues[RX_QUEUE];
            // No buffer: the frame waits, and the guest kicks when it adds some.
            let Some(chain) = pop_or_enable_notification(queue, &active.mem) else {
                break;
            };
            let head = chain.head_index();
            let frame = self.pending.take().unwrap_or_default();
            // A frame larger than the buffers is dropped (the guest sized them by the MTU).
            let placed = write_to_chain(&active.mem, chain, &frame);
            let len = if placed == frame.len() { placed } else { 0 };
            let _ = queue.add_used(&active.mem, head, len as u32);
            used = true;
        }
        if used && let Some(active) = self.active.as_mut() {
            signal_used(&mut active.queues[RX_QUEUE], &active.mem, &active.interrupt);
        }
    }

    /// Guest frames out to the tap; a frame the tap refuses is dropped, as a NIC would.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let mut used = false;
        while let Some(chain) = pop_or_enable_notification(queue, mem) {
            let head = chain.head_index();
            let mut frame = Vec::new();
            for desc in chain.readable() {
                let len = desc.len() as usize;
                if frame.len() + len > HEADER_LEN + MAX_FRAME {
                    frame.clear();
                    break;
                }
                let start = frame.len();
                frame.resize(start + len, 0);
                if mem.read_slice(&mut frame[start..], desc.addr()).is_err() {
                    frame.clear();
                    break;
                }
            }
            if frame.len() > HEADER_LEN
                && let Some(tap) = self.tap.as_mut()
            {
                let _ = tap.write(&frame[HEADER_LEN..]);
            }
            let _ = queue.add_used(mem, head, 0);
            used = true;
        }
        if used {
            signal_used(queue, mem, &active.interrupt);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f =
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_NET_F_MAC);
        if self.mtu > 0 {
            f |= 1 << VIRTIO_NET_F_MTU;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_window(&self.config(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), String> {
        if queues.len() != 2 {
            return Err("virtio-net needs a receive and a transmit queue".into());
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        // Frames may have arrived before DRIVER_OK, with no edge to come.
        self.tap_readable = true;
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        match usize::from(index) {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }

    fn host_fds(&self) -> Vec<RawFd> {
        self.tap.iter().map(|t| t.as_raw_fd()).collect()
    }

    fn host_fd_ready(&mut self, _fd: RawFd, readable: bool, _writable: bool) {
        if readable {
            self.tap_readable = true;
            self.process_rx();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending = None;
    }

    fn active_queues(&self) -> Vec<QueueSnapshot> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueueSnapshot::from).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;

    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::virtio::mmio::test_utils::{add_chain, guest_memory, used_elem, used_idx};

    /// A datagram socketpair stands for the tap: one frame per read and write.
    fn net() -> (Net, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(a));
        (Net::new(Some(file), [2, 0, 0, 0, 0, 1], 1500), b)
    }

    #[test]
    fn config_space_has_the_mac_and_the_mtu() {
        let (n, _peer) = net();
        let mut mac = [0u8; 6];
        n.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
        let mut mtu = [0u8; 2];
        n.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1500);
        let mut past = [9u8; 4];
        n.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
        assert_ne!(n.features() & (1 << VIRTIO_NET_F_MAC), 0);
    }

    #[test]
    fn frames_cross_both_ways_with_the_header_handled() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, vm_memory::GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, vm_memory::GuestAddress(0x1_0000), 16);
        let (mut n, peer) = net();
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let queues = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        n.activate(mem.clone(), Interrupt::new(irq.clone()), queues, 0)
            .unwrap();

        // Transmit: header + frame in the guest; the tap gets the frame alone.
        let mut out = vec![0u8; HEADER_LEN];
        out.extend_from_slice(b"frame-out");
        mem.write_slice(&out, vm_memory::GuestAddress(0x10_0000))
            .unwrap();
        add_chain(&txq, 0, &[(0x10_0000, out.len() as u32, false)]);
        n.queue_notify(TX_QUEUE as u16);
        let mut got = [0u8; 64];
        let len = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..len], b"frame-out");
        assert_eq!(used_idx(&txq), 1);

        // Receive: a tap frame lands after a 12-byte header with num_buffers = 1.
        peer.send(b"frame-in").unwrap();
        add_chain(&rxq, 0, &[(0x20_0000, 2048, true)]);
        n.host_fd_ready(0, true, false);
        n.queue_notify(RX_QUEUE as u16);
        assert_eq!(used_idx(&rxq), 1);
        assert_eq!(used_elem(&rxq, 0).1 as usize, HEADER_LEN + 8);
        let mut buf = vec![0u8; HEADER_LEN + 8];
        mem.read_slice(&mut buf, vm_memory::GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(&buf[10..12], &1u16.to_le_bytes());
        assert_eq!(&buf[HEADER_LEN..], b"frame-in");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn a_frame_waits_for_a_buffer_and_a_malformed_chain_does_not_panic() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, vm_memory::GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, vm_memory::GuestAddress(0x1_0000), 16);
        let (mut n, peer) = net();
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let queues = vec![rxq.create_queue().unwrap(), txq.create_queue().unwrap()];
        n.activate(mem.clone(), Interrupt::new(irq), queues, 0)
            .unwrap();
        peer.send(b"early").unwrap();
        n.host_fd_ready(0, true, false);
        assert_eq!(used_idx(&rxq), 0, "no buffer yet");
        add_chain(&rxq, 0, &[(0x20_0000, 2048, true)]);
        n.queue_notify(RX_QUEUE as u16);
        assert_eq!(used_idx(&rxq), 1);
        // A transmit descriptor far outside guest memory is consumed and dropped.
        add_chain(&txq, 0, &[(0xffff_0000_0000, 64, false)]);
        n.queue_notify(TX_QUEUE as u16);
        assert_eq!(used_idx(&txq), 1);
    }
}
