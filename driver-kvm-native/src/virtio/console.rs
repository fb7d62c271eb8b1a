//! virtio-console (virtio 1.2, 5.3) with a single port and no size or multiport support:
//! the guest's /dev/hvc0 as a raw, ordered, lossless byte pipe to a host Unix stream.
//!
//! The host side is watched edge-triggered, so the device keeps its own idea of whether the
//! socket may have more to read or room to write and only clears it on `EAGAIN`.

use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, send};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::state::QueueSnapshot;
use super::{Interrupt, TYPE_CONSOLE, VirtioDevice, signal_used, write_to_chain};

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// How much is moved between the socket and guest memory per system call.
const CHUNK: usize = 64 * 1024;

pub struct Console {
    stream: UnixStream,
    active: Option<Active>,
    /// Bytes read from the host that are not in a receive buffer yet, from `rx_pos` on. They
    /// survive a device reset: the host speaks a framed protocol, so dropping them would
    /// desynchronise it.
    rx_buf: Vec<u8>,
    rx_pos: usize,
    /// The socket may have more to read (no `EAGAIN` seen since the last readable edge).
    host_readable: bool,
    host_eof: bool,
    /// The socket may have room (no `EAGAIN` seen since the last writable edge).
    host_writable: bool,
    /// Writing to the host failed for good: transmitted bytes are discarded so the guest
    /// does not stall.
    host_broken: bool,
    /// The transmit chain being written when the socket filled up; its head stays off the
    /// used ring until all of it is out, which keeps the bytes in order and in guest memory.
    tx_current: Option<TxChain>,
    tx_scratch: Vec<u8>,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queues: Vec<Queue>,
}

/// The readable part of a transmit chain and how much of it the host has got.
struct TxChain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    segment: usize,
    offset: usize,
}

enum Flush {
    Done,
    WouldBlock,
    Broken,
}

enum HostRead {
    Data,
    WouldBlock,
    Eof,
}

impl Console {
    pub fn new(stream: UnixStream) -> Result<Self, String> {
        stream
            .set_nonblocking(true)
            .map_err(|e| format!("making the console socket non-blocking: {e}"))?;
        Ok(Self {
            stream,
            active: None,
            rx_buf: Vec::new(),
            rx_pos: 0,
            host_readable: false,
            host_eof: false,
            host_writable: false,
            host_broken: false,
            tx_current: None,
            tx_scratch: Vec::new(),
        })
    }

    /// Moves host bytes into the guest's receive buffers until either runs out.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = false;
        loop {
            if self.rx_pos >= self.rx_buf.len() {
                self.rx_buf.clear();
                self.rx_pos = 0;
                if !self.host_readable || self.host_eof {
                    break;
                }
                match read_host(&self.stream, &mut self.rx_buf) {
                    HostRead::Data => {}
                    HostRead::WouldBlock => self.host_readable = false,
                    HostRead::Eof => self.host_eof = true,
                }
                continue;
            }
            // Out of buffers with input pending: the guest kicks when it adds some.
            let Some(chain) = super::pop_or_enable_notification(queue, mem) else {
                break;
            };
            let head = chain.head_index();
            let placed = write_to_chain(mem, chain, &self.rx_buf[self.rx_pos..]);
            self.rx_pos += placed;
            // A failure means a head index beyond the ring: the guest broke its own queue.
            let _ = queue.add_used(mem, head, u32::try_from(placed).unwrap_or(u32::MAX));
            used = true;
        }
        if used {
            signal_used(queue, mem, &active.interrupt);
        }
    }

    /// Sends the guest's transmit chains to the host in order, stopping while the socket is
    /// full.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queues[TX_QUEUE];
        let mut used = false;
        while self.host_writable || self.host_broken {
            let tx = match self.tx_current.as_mut() {
                Some(tx) => tx,
                None => {
                    let Some(chain) = super::pop_or_enable_notification(queue, mem) else {
                        break;
                    };
                    self.tx_current.insert(TxChain::new(chain))
                }
            };
            let flush = if self.host_broken {
                Flush::Done
            } else {
                tx.flush(mem, &self.stream, &mut self.tx_scratch)
            };
            match flush {
                Flush::Done => {
                    let _ = queue.add_used(mem, tx.head, 0);
                    used = true;
                    self.tx_current = None;
                }
                Flush::WouldBlock => self.host_writable = false,
                Flush::Broken => self.host_broken = true,
            }
        }
        if used {
            signal_used(queue, mem, &active.interrupt);
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols/rows and max_nr_ports are only meaningful with features we do not offer.
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), String> {
        if queues.len() != 2 {
            return Err(format!(
                "virtio-console needs 2 queues, the transport gave {}",
                queues.len()
            ));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        // Edges that came before activation were not acted on.
        self.host_readable = true;
        self.host_writable = true;
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
        vec![self.stream.as_raw_fd()]
    }

    fn host_fd_ready(&mut self, fd: RawFd, readable: bool, writable: bool) {
        if fd != self.stream.as_raw_fd() {
            return;
        }
        if writable {
            self.host_writable = true;
            self.process_tx();
        }
        if readable {
            self.host_readable = true;
            self.process_rx();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        // The chain belongs to the old queues; what of it the host already has stays sent.
        self.tx_current = None;
    }

    fn active_queues(&self) -> Vec<QueueSnapshot> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueueSnapshot::from).collect())
            .unwrap_or_default()
    }

    fn in_flight(&self) -> Vec<(u16, u16)> {
        self.tx_current
            .iter()
            .map(|tx| (TX_QUEUE as u16, tx.head))
            .collect()
    }
}

impl TxChain {
    fn new(chain: DescriptorChain<&GuestMemoryMmap>) -> Self {
        let head = chain.head_index();
        let segments = chain
            .readable()
            .filter_map(|d: Descriptor| Some((d.addr(), usize::try_from(d.len()).ok()?)))
            .collect();
        Self {
            head,
            segments,
            segment: 0,
            offset: 0,
        }
    }

    fn flush(
        &mut self,
        mem: &GuestMemoryMmap,
        stream: &UnixStream,
        scratch: &mut Vec<u8>,
    ) -> Flush {
        while let Some(&(addr, len)) = self.segments.get(self.segment) {
            let n = (len - self.offset.min(len)).min(CHUNK);
            if n == 0 {
                self.segment += 1;
                self.offset = 0;
                continue;
            }
            scratch.resize(n, 0);
            let readable = u64::try_from(self.offset)
                .ok()
                .and_then(|off| addr.checked_add(off))
                .is_some_and(|at| mem.read_slice(scratch, at).is_ok());
            if !readable {
                // The guest pointed outside its memory: there are no bytes to send.
                self.segment += 1;
                self.offset = 0;
                continue;
            }
            // MSG_NOSIGNAL: a host that hung up must not kill the VMM with SIGPIPE.
            match send(stream.as_raw_fd(), scratch, MsgFlags::MSG_NOSIGNAL) {
                Ok(0) => return Flush::WouldBlock,
                Ok(sent) => self.offset += sent,
                Err(Errno::EAGAIN) => return Flush::WouldBlock,
                Err(Errno::EINTR) => {}
                Err(_) => return Flush::Broken,
            }
        }
        Flush::Done
    }
}

/// Replaces `buf` with the next bytes from the host.
fn read_host(stream: &UnixStream, buf: &mut Vec<u8>) -> HostRead {
    buf.resize(CHUNK, 0);
    loop {
        let result = (&*stream).read(buf);
        match result {
            Ok(0) => {
                buf.clear();
                return HostRead::Eof;
            }
            Ok(n) => {
                buf.truncate(n);
                return HostRead::Data;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                buf.clear();
                return HostRead::WouldBlock;
            }
            // A socket error will not turn into data later.
            Err(_) => {
                buf.clear();
                return HostRead::Eof;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use nix::sys::socket::{setsockopt, sockopt};
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::virtio::mmio::test_utils::{add_chain, guest_memory, used_elem, used_idx};

    const DATA: u64 = 0x10_0000;

    struct Fixture {
        console: Console,
        peer: UnixStream,
        irqfd: Arc<EventFd>,
        fd: RawFd,
    }

    fn fixture() -> Fixture {
        let (ours, peer) = UnixStream::pair().unwrap();
        let fd = ours.as_raw_fd();
        Fixture {
            console: Console::new(ours).unwrap(),
            peer,
            irqfd: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            fd,
        }
    }

    impl Fixture {
        fn activate(
            &mut self,
            mem: &GuestMemoryMmap,
            queues: [&MockSplitQueue<'_, GuestMemoryMmap>; 2],
        ) {
            let queues = queues.iter().map(|q| q.create_queue().unwrap()).collect();
            let features = self.console.features();
            self.console
                .activate(
                    mem.clone(),
                    Interrupt::new(self.irqfd.clone()),
                    queues,
                    features,
                )
                .unwrap();
        }

        fn interrupts(&self) -> u64 {
            self.irqfd.read().unwrap_or(0)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        // 251 is prime, so a chunk that is dropped, doubled or reordered shows.
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn guest_bytes_reach_the_host_in_order() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        f.activate(&mem, [&rxq, &txq]);
        assert_eq!(f.interrupts(), 0);

        mem.write_slice(b"hello ", GuestAddress(DATA)).unwrap();
        mem.write_slice(b"world", GuestAddress(DATA + 0x1000))
            .unwrap();
        mem.write_slice(b"!", GuestAddress(DATA + 0x2000)).unwrap();
        add_chain(&txq, 0, &[(DATA, 6, false), (DATA + 0x1000, 5, false)]);
        add_chain(&txq, 2, &[(DATA + 0x2000, 1, false)]);
        f.console.queue_notify(1);

        let mut got = [0; 12];
        f.peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello world!");
        assert_eq!(used_idx(&txq), 2);
        assert_eq!(used_elem(&txq, 0), (0, 0));
        assert_eq!(used_elem(&txq, 1), (2, 0));
        assert_eq!(f.interrupts(), 1);
    }

    #[test]
    fn event_idx_rearms_notifications() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        let mut queues: Vec<Queue> = [&rxq, &txq]
            .iter()
            .map(|q| q.create_queue().unwrap())
            .collect();
        for q in &mut queues {
            q.set_event_idx(true);
        }
        f.console
            .activate(mem.clone(), Interrupt::new(f.irqfd.clone()), queues, 0)
            .unwrap();
        mem.write_slice(b"ab", GuestAddress(DATA)).unwrap();
        add_chain(&txq, 0, &[(DATA, 1, false)]);
        add_chain(&txq, 1, &[(DATA + 1, 1, false)]);
        f.console.queue_notify(1);
        let mut got = [0; 2];
        f.peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ab");
        // avail_event follows the used ring: the driver kicks for the next chain.
        let avail_event: u16 = mem
            .read_obj(txq.used_addr().unchecked_add(4 + 8 * 16))
            .unwrap();
        assert_eq!(avail_event, 2);
        // used_event is 0 in the mock: only the first used entry crosses it.
        assert_eq!(f.interrupts(), 1);
    }

    #[test]
    fn would_block_loses_nothing() {
        const CHAINS: usize = 32;
        const HALF: usize = 8 * 1024;
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 256);
        let mut f = fixture();
        setsockopt(&f.peer, sockopt::RcvBuf, &4096).unwrap();
        setsockopt(&f.console.stream, sockopt::SndBuf, &4096).unwrap();
        f.peer.set_nonblocking(true).unwrap();

        let expected = pattern(CHAINS * 2 * HALF);
        mem.write_slice(&expected, GuestAddress(DATA)).unwrap();
        for k in 0..CHAINS {
            let a = DATA + (k * 2 * HALF) as u64;
            let b = a + HALF as u64;
            let first = u16::try_from(2 * k).unwrap();
            add_chain(
                &txq,
                first,
                &[(a, HALF as u32, false), (b, HALF as u32, false)],
            );
        }
        f.activate(&mem, [&rxq, &txq]);
        f.console.queue_notify(1);
        let stalled = used_idx(&txq);
        assert!(usize::from(stalled) < CHAINS, "the socket never filled up");
        // A kick while the socket is full consumes nothing more.
        f.console.queue_notify(1);
        assert_eq!(used_idx(&txq), stalled);

        let mut got = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        for _ in 0..100_000 {
            loop {
                match f.peer.read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            if got.len() >= expected.len() {
                break;
            }
            f.console.host_fd_ready(f.fd, false, true);
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes arrived out of order");
        assert_eq!(usize::from(used_idx(&txq)), CHAINS);
    }

    #[test]
    fn host_bytes_land_in_receive_buffers() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        add_chain(&rxq, 0, &[(DATA, 4, true)]);
        add_chain(
            &rxq,
            1,
            &[(DATA + 0x1000, 3, true), (DATA + 0x2000, 100, true)],
        );
        f.activate(&mem, [&rxq, &txq]);

        f.peer.write_all(b"hello world").unwrap();
        f.console.host_fd_ready(f.fd, true, false);
        assert_eq!(used_idx(&rxq), 2);
        assert_eq!(used_elem(&rxq, 0), (0, 4));
        assert_eq!(used_elem(&rxq, 1), (1, 7));
        assert_eq!(read_guest(&mem, DATA, 4), b"hell");
        assert_eq!(read_guest(&mem, DATA + 0x1000, 3), b"o w");
        assert_eq!(read_guest(&mem, DATA + 0x2000, 4), b"orld");
        assert_eq!(f.interrupts(), 1);
    }

    #[test]
    fn pending_input_waits_for_buffers() {
        const LEN: usize = 10_000;
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        f.activate(&mem, [&rxq, &txq]);

        let expected = pattern(LEN);
        f.peer.write_all(&expected).unwrap();
        f.console.host_fd_ready(f.fd, true, false);
        assert_eq!(used_idx(&rxq), 0);
        assert_eq!(f.interrupts(), 0);

        add_chain(&rxq, 0, &[(DATA, 4096, true)]);
        f.console.queue_notify(0);
        assert_eq!(used_idx(&rxq), 1);
        assert_eq!(f.interrupts(), 1);

        add_chain(&rxq, 1, &[(DATA + 4096, 4096, true)]);
        add_chain(&rxq, 2, &[(DATA + 8192, 4096, true)]);
        f.console.queue_notify(0);
        assert_eq!(used_idx(&rxq), 3);
        assert_eq!(used_elem(&rxq, 2), (2, (LEN - 8192) as u32));
        assert_eq!(read_guest(&mem, DATA, LEN), expected);
        assert_eq!(f.interrupts(), 1);
    }

    #[test]
    fn input_before_activation_is_delivered() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        f.peer.write_all(b"early").unwrap();
        // The edge arrives before the driver is up.
        f.console.host_fd_ready(f.fd, true, true);
        add_chain(&rxq, 0, &[(DATA, 64, true)]);
        f.activate(&mem, [&rxq, &txq]);
        assert_eq!(used_elem(&rxq, 0), (0, 5));
        assert_eq!(read_guest(&mem, DATA, 5), b"early");
    }

    #[test]
    fn bad_buffers_lose_no_input() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        f.activate(&mem, [&rxq, &txq]);

        add_chain(&rxq, 0, &[(0xffff_ffff_ffff_f000, 0x2000, true)]);
        add_chain(&rxq, 1, &[(0x3f_fffe, 16, true)]);
        add_chain(&rxq, 2, &[(DATA, 16, false)]);
        add_chain(&rxq, 3, &[(DATA + 0x100, 16, true)]);
        f.peer.write_all(b"data").unwrap();
        f.console.host_fd_ready(f.fd, true, false);
        assert_eq!(used_idx(&rxq), 4);
        assert_eq!(used_elem(&rxq, 0).1, 0);
        assert_eq!(used_elem(&rxq, 1).1, 0);
        assert_eq!(used_elem(&rxq, 2).1, 0);
        assert_eq!(used_elem(&rxq, 3), (3, 4));
        assert_eq!(read_guest(&mem, DATA + 0x100, 4), b"data");

        mem.write_slice(b"ok", GuestAddress(DATA)).unwrap();
        add_chain(&txq, 0, &[(u64::MAX - 3, 0x100, false), (DATA, 2, false)]);
        f.console.queue_notify(1);
        let mut got = [0; 2];
        f.peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok");
        assert_eq!(used_idx(&txq), 1);
    }

    #[test]
    fn host_hangup_neither_stalls_nor_panics() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        f.activate(&mem, [&rxq, &txq]);
        add_chain(&rxq, 0, &[(DATA, 16, true)]);
        f.peer.write_all(b"bye").unwrap();
        let Fixture {
            mut console,
            peer,
            fd,
            ..
        } = f;
        drop(peer);
        console.host_fd_ready(fd, true, true);
        assert_eq!(used_elem(&rxq, 0), (0, 3));
        assert!(console.host_eof);

        add_chain(&txq, 0, &[(DATA, 16, false)]);
        add_chain(&txq, 1, &[(DATA, 16, false)]);
        console.queue_notify(1);
        assert_eq!(used_idx(&txq), 2);
    }

    #[test]
    fn reset_keeps_unplaced_input() {
        let mem = guest_memory();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut f = fixture();
        f.activate(&mem, [&rxq, &txq]);
        f.peer.write_all(b"kept").unwrap();
        f.console.host_fd_ready(f.fd, true, false);
        f.console.reset();
        f.console.queue_notify(0);

        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x3_0000), 16);
        add_chain(&rxq, 0, &[(DATA, 16, true)]);
        f.activate(&mem, [&rxq, &txq]);
        assert_eq!(used_elem(&rxq, 0), (0, 4));
        assert_eq!(read_guest(&mem, DATA, 4), b"kept");
    }
}
