//! virtio-blk (virtio 1.2, 5.2) over a host file or block device, one request queue, served
//! synchronously when the guest notifies it.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::state::QueueSnapshot;
use super::{Interrupt, TYPE_BLOCK, VirtioDevice};

const QUEUE_SIZE: u16 = 256;
const SECTOR_SIZE: u64 = 512;
/// type, reserved, sector.
const HEADER_SIZE: usize = 16;
const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The largest piece moved between the file and guest memory at once.
const CHUNK: usize = 128 * 1024;
/// capacity, size_max, seg_max, geometry, blk_size: the fields up to the last one whose
/// feature is offered.
const CONFIG_LEN: usize = 24;

pub struct Block {
    disk: Disk,
    active: Option<Active>,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    queue: Queue,
}

struct Disk {
    file: File,
    readonly: bool,
    /// In 512-byte sectors.
    capacity: u64,
    serial: [u8; SERIAL_LEN],
    bounce: Vec<u8>,
}

/// A request's buffers in guest memory, consumed from the front.
struct Segments {
    list: Vec<(GuestAddress, u64)>,
    index: usize,
    offset: u64,
}

impl Block {
    /// A disk slot without a medium (0 sectors), for a template VM: each of its clones puts
    /// its own disk there, and the guest learns the size from a configuration change.
    pub fn empty(serial: &str) -> Result<Self, String> {
        let none = File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;
        Self::new(none, false, serial)
    }

    /// `serial` (at most 20 bytes) is what the guest finds in /sys/block/vdX/serial.
    pub fn new(mut file: File, readonly: bool, serial: &str) -> Result<Self, String> {
        if serial.len() > SERIAL_LEN {
            return Err(format!(
                "virtio-blk serial {serial:?} is longer than {SERIAL_LEN} bytes"
            ));
        }
        let mut serial_bytes = [0; SERIAL_LEN];
        serial_bytes[..serial.len()].copy_from_slice(serial.as_bytes());
        // Seeking works for block devices too, whose metadata length is 0.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| format!("finding the size of the virtio-blk backing file: {e}"))?;
        Ok(Self {
            disk: Disk {
                file,
                readonly,
                capacity: len / SECTOR_SIZE,
                serial: serial_bytes,
                bounce: Vec::new(),
            },
            active: None,
        })
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0; CONFIG_LEN];
        config[0..8].copy_from_slice(&self.disk.capacity.to_le_bytes());
        // The header and the status take one descriptor each.
        let seg_max = u32::from(QUEUE_SIZE) - 2;
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }

    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let queue = &mut active.queue;
        let mut used = false;
        while let Some(chain) = super::pop_or_enable_notification(queue, mem) {
            let head = chain.head_index();
            let len = self.disk.handle(mem, chain);
            // A failure means a head index beyond the ring: the guest broke its own queue.
            let _ = queue.add_used(mem, head, len);
            used = true;
        }
        // When the ring cannot be read, an extra interrupt is the safe side.
        if used && queue.needs_notification(mem).unwrap_or(true) {
            active.interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
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
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err("virtio-blk needs exactly 1 queue".to_string());
        };
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        // Requests may have been queued before DRIVER_OK reached us.
        self.process_queue();
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn active_queues(&self) -> Vec<QueueSnapshot> {
        self.active
            .iter()
            .map(|a| QueueSnapshot::from(&a.queue))
            .collect()
    }
}

impl Disk {
    /// Serves one request; returns the used length (bytes written to the guest, status
    /// included). A chain without a place for the status is returned untouched.
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let descs: Vec<Descriptor> = chain.collect();
        let Some(last) = descs.last().filter(|d| d.is_write_only() && d.len() > 0) else {
            return 0;
        };
        let Some(status_addr) = last.addr().checked_add(u64::from(last.len() - 1)) else {
            return 0;
        };
        let (status, written) = self.execute(mem, &descs);
        let status_ok =
            u8::try_from(status).is_ok_and(|status| mem.write_obj(status, status_addr).is_ok());
        let total = written + u64::from(status_ok);
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Returns the status and how many data bytes went to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> (u32, u64) {
        // Driver-readable buffers first, then driver-writable ones ending in the status byte.
        let split = descs
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descs.len());
        if descs[split..].iter().any(|d| !d.is_write_only()) {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let mut readable = Segments::new(&descs[..split]);
        let mut writable = Segments::new(&descs[split..]);
        writable.drop_last_byte();

        let mut header = [0; HEADER_SIZE];
        if readable.read(mem, &mut header).is_err() {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);

        match request_type {
            VIRTIO_BLK_T_IN => self.read_sectors(mem, sector, &mut writable),
            VIRTIO_BLK_T_OUT => (self.write_sectors(mem, sector, &mut readable), 0),
            VIRTIO_BLK_T_FLUSH => {
                if self.readonly || self.file.sync_data().is_ok() {
                    (VIRTIO_BLK_S_OK, 0)
                } else {
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = self.serial.len().min(writable.remaining_usize());
                match writable.write(mem, &self.serial[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u64),
                    Err(()) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole sectors on the disk.
    fn disk_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity).then_some(sector * SECTOR_SIZE)
    }

    fn read_sectors(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &mut Segments,
    ) -> (u32, u64) {
        let Some(mut pos) = self.disk_range(sector, data.remaining()) else {
            return (VIRTIO_BLK_S_IOERR, 0);
        };
        let mut written = 0;
        while data.remaining() > 0 {
            let n = data.remaining_usize().min(CHUNK);
            self.bounce.resize(n, 0);
            if self.file.read_exact_at(&mut self.bounce, pos).is_err()
                || data.write(mem, &self.bounce).is_err()
            {
                return (VIRTIO_BLK_S_IOERR, written);
            }
            pos += n as u64;
            written += n as u64;
        }
        (VIRTIO_BLK_S_OK, written)
    }

    fn write_sectors(&mut self, mem: &GuestMemoryMmap, sector: u64, data: &mut Segments) -> u32 {
        if self.readonly {
            return VIRTIO_BLK_S_IOERR;
        }
        let Some(mut pos) = self.disk_range(sector, data.remaining()) else {
            return VIRTIO_BLK_S_IOERR;
        };
        while data.remaining() > 0 {
            let n = data.remaining_usize().min(CHUNK);
            self.bounce.resize(n, 0);
            if data.read(mem, &mut self.bounce).is_err()
                || self.file.write_all_at(&self.bounce, pos).is_err()
            {
                return VIRTIO_BLK_S_IOERR;
            }
            pos += n as u64;
        }
        VIRTIO_BLK_S_OK
    }
}

impl Segments {
    fn new(descs: &[Descriptor]) -> Self {
        Self {
            list: descs
                .iter()
                .map(|d| (d.addr(), u64::from(d.len())))
                .collect(),
            index: 0,
            offset: 0,
        }
    }

    /// Takes the status byte off the end of the driver-writable buffers.
    fn drop_last_byte(&mut self) {
        if let Some(last) = self.list.last_mut() {
            last.1 = last.1.saturating_sub(1);
        }
    }

    fn remaining(&self) -> u64 {
        let rest: u64 = self.list.iter().skip(self.index).map(|&(_, len)| len).sum();
        rest - self.offset
    }

    fn remaining_usize(&self) -> usize {
        usize::try_from(self.remaining()).unwrap_or(usize::MAX)
    }

    /// Fills `buf` from the front of the buffers.
    fn read(&mut self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), ()> {
        self.consume(buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr).map_err(drop)
        })
    }

    /// Writes `buf` to the front of the buffers.
    fn write(&mut self, mem: &GuestMemoryMmap, buf: &[u8]) -> Result<(), ()> {
        self.consume(buf.len(), |addr, range| {
            mem.write_slice(&buf[range], addr).map_err(drop)
        })
    }

    /// Walks the next `len` bytes as pieces of contiguous guest memory, each given with the
    /// range of the caller's buffer it corresponds to.
    fn consume(
        &mut self,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), ()>,
    ) -> Result<(), ()> {
        let mut done = 0;
        while done < len {
            let &(addr, seg_len) = self.list.get(self.index).ok_or(())?;
            let left_in_seg = seg_len - self.offset;
            if left_in_seg == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = usize::try_from(left_in_seg).map_or(len - done, |l| l.min(len - done));
            let at = addr.checked_add(self.offset).ok_or(())?;
            f(at, done..done + n)?;
            done += n;
            self.offset += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::virtio::mmio::test_utils::{add_chain, guest_memory, used_elem, used_idx};

    const HEADER: u64 = 0x10_0000;
    const STATUS: u64 = 0x10_f000;
    const DATA: u64 = 0x20_0000;
    const SECTORS: usize = 8;

    /// A scratch backing file, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &[u8]) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "runv-virtio-blk-test-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }

        fn open(&self) -> File {
            File::options()
                .read(true)
                .write(true)
                .open(&self.0)
                .unwrap()
        }

        fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn disk_pattern() -> Vec<u8> {
        (0..SECTORS * 512).map(|i| (i % 253) as u8).collect()
    }

    struct Fixture<'a> {
        block: Block,
        mem: &'a GuestMemoryMmap,
        vq: MockSplitQueue<'a, GuestMemoryMmap>,
        irqfd: Arc<EventFd>,
    }

    impl<'a> Fixture<'a> {
        fn new(mem: &'a GuestMemoryMmap, file: &TempFile, readonly: bool) -> Self {
            let vq = MockSplitQueue::create(mem, GuestAddress(0), 64);
            let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let mut block = Block::new(file.open(), readonly, "rootfs-0123").unwrap();
            let features = block.features();
            block
                .activate(
                    mem.clone(),
                    Interrupt::new(irqfd.clone()),
                    vec![vq.create_queue().unwrap()],
                    features,
                )
                .unwrap();
            Self {
                block,
                mem,
                vq,
                irqfd,
            }
        }

        /// Submits a chain as is; returns the used length.
        fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let before = used_idx(&self.vq);
            // Requests complete synchronously, so every chain can reuse the same descriptors.
            add_chain(&self.vq, 0, bufs);
            self.block.queue_notify(0);
            assert_eq!(
                used_idx(&self.vq),
                before + 1,
                "the request was not completed"
            );
            let (id, len) = used_elem(&self.vq, usize::from(before));
            assert_eq!(id, 0);
            len
        }

        /// Submits header, data buffers and status; returns (status, used length).
        fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            self.write_header(kind, sector);
            let mut bufs = vec![(HEADER, HEADER_SIZE as u32, false)];
            bufs.extend_from_slice(data);
            bufs.push((STATUS, 1, true));
            let len = self.submit(&bufs);
            (self.status(), len)
        }

        fn write_header(&self, kind: u32, sector: u64) {
            let mut header = [0; HEADER_SIZE];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }
    }

    const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
    const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn config_and_features() {
        let mut contents = disk_pattern();
        contents.extend_from_slice(&[7; 100]);
        let file = TempFile::new(&contents);
        let block = Block::new(file.open(), true, "abc").unwrap();
        let mut config = [0xff; 32];
        block.read_config(0, &mut config);
        assert_eq!(u64::from_le_bytes(config[0..8].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(config[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(config[20..24].try_into().unwrap()), 512);
        assert_eq!(config[24..], [0; 8]);
        let mut far = [0xff; 4];
        block.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(block.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(block.features() & (1 << VIRTIO_F_VERSION_1), 0);

        let writable = Block::new(file.open(), false, "").unwrap();
        assert_eq!(writable.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert!(Block::new(file.open(), false, "123456789012345678901").is_err());
    }

    #[test]
    fn read() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, false);
        let (status, len) = f.request(VIRTIO_BLK_T_IN, 2, &[(DATA, 1024, true)]);
        assert_eq!((status, len), (S_OK, 1025));
        assert_eq!(f.read_guest(DATA, 1024), disk_pattern()[1024..2048]);
        assert_eq!(f.irqfd.read().unwrap(), 1);
    }

    #[test]
    fn read_with_any_layout() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, false);
        f.write_header(VIRTIO_BLK_T_IN, 0);
        // Header split in two, data split unevenly, status sharing the last buffer.
        let len = f.submit(&[
            (HEADER, 5, false),
            (HEADER + 5, 11, false),
            (DATA, 100, true),
            (DATA + 0x1000, 412, true),
            (STATUS - 512, 513, true),
        ]);
        assert_eq!(len, 1025);
        assert_eq!(f.status(), S_OK);
        let mut got = f.read_guest(DATA, 100);
        got.extend(f.read_guest(DATA + 0x1000, 412));
        got.extend(f.read_guest(STATUS - 512, 512));
        assert_eq!(got, disk_pattern()[..1024]);
    }

    #[test]
    fn write_then_flush() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, false);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        mem.write_slice(&[0xcd; 512], GuestAddress(DATA + 0x1000))
            .unwrap();
        let (status, len) = f.request(
            VIRTIO_BLK_T_OUT,
            5,
            &[(DATA, 512, false), (DATA + 0x1000, 512, false)],
        );
        assert_eq!((status, len), (S_OK, 1));
        let (status, len) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!((status, len), (S_OK, 1));

        let mut expected = disk_pattern();
        expected[5 * 512..6 * 512].fill(0xab);
        expected[6 * 512..7 * 512].fill(0xcd);
        assert_eq!(file.contents(), expected);
    }

    #[test]
    fn get_id() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, true);
        mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
        let (status, len) = f.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
        assert_eq!((status, len), (S_OK, 21));
        let mut expected = b"rootfs-0123".to_vec();
        expected.resize(20, 0);
        assert_eq!(f.read_guest(DATA, 20), expected);
        // A short buffer gets what fits.
        let (status, len) = f.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x100, 6, true)]);
        assert_eq!((status, len), (S_OK, 7));
        assert_eq!(f.read_guest(DATA + 0x100, 6), b"rootfs");
    }

    #[test]
    fn out_of_range_is_an_io_error() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, false);
        let (status, _) = f.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 1024, true)]);
        assert_eq!(status, S_IOERR);
        let (status, _) = f.request(VIRTIO_BLK_T_IN, u64::MAX, &[(DATA, 512, true)]);
        assert_eq!(status, S_IOERR);
        let (status, _) = f.request(VIRTIO_BLK_T_OUT, 8, &[(DATA, 512, false)]);
        assert_eq!(status, S_IOERR);
        let (status, _) = f.request(VIRTIO_BLK_T_OUT, u64::MAX / 512, &[(DATA, 512, false)]);
        assert_eq!(status, S_IOERR);
        // Not whole sectors.
        let (status, _) = f.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 100, true)]);
        assert_eq!(status, S_IOERR);
        // The last sector is fine.
        let (status, _) = f.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 512, true)]);
        assert_eq!(status, S_OK);
        assert_eq!(file.contents(), disk_pattern());
    }

    #[test]
    fn readonly_rejects_writes() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, true);
        mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let (status, len) = f.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]);
        assert_eq!((status, len), (S_IOERR, 1));
        let (status, _) = f.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(status, S_OK);
        assert_eq!(file.contents(), disk_pattern());
    }

    #[test]
    fn unknown_requests_are_unsupported() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, false);
        for kind in [2, 11, 13, 99, u32::MAX] {
            let (status, len) = f.request(kind, 0, &[(DATA, 512, true)]);
            assert_eq!((status, len), (S_UNSUPP, 1), "type {kind}");
        }
    }

    #[test]
    fn malformed_chains_do_not_panic() {
        let file = TempFile::new(&disk_pattern());
        let mem = guest_memory();
        let mut f = Fixture::new(&mem, &file, false);
        f.write_header(VIRTIO_BLK_T_IN, 0);

        // No status descriptor: nothing is written back.
        assert_eq!(f.submit(&[(HEADER, 16, false)]), 0);
        assert_eq!(f.status(), 0xff);
        assert_eq!(f.submit(&[(HEADER, 16, false), (STATUS, 1, false)]), 0);
        assert_eq!(f.submit(&[(HEADER, 16, false), (STATUS, 0, true)]), 0);
        assert_eq!(f.status(), 0xff);

        // A header that is too short.
        assert_eq!(f.submit(&[(HEADER, 8, false), (STATUS, 1, true)]), 1);
        assert_eq!(f.status(), S_IOERR);
        assert_eq!(f.submit(&[(STATUS, 1, true)]), 1);
        assert_eq!(f.status(), S_IOERR);

        // A driver-readable buffer after a driver-writable one.
        let len = f.submit(&[
            (HEADER, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!((f.status(), len), (S_IOERR, 1));

        // Buffers outside guest memory.
        let len = f.submit(&[(u64::MAX - 8, 16, false), (STATUS, 1, true)]);
        assert_eq!((f.status(), len), (S_IOERR, 1));
        let len = f.submit(&[
            (HEADER, 16, false),
            (0x3f_fe00, 1024, true),
            (STATUS, 1, true),
        ]);
        assert_eq!((f.status(), len), (S_IOERR, 1));
        f.write_header(VIRTIO_BLK_T_OUT, 0);
        let len = f.submit(&[
            (HEADER, 16, false),
            (0xffff_0000_0000, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!((f.status(), len), (S_IOERR, 1));
        assert_eq!(f.submit(&[(HEADER, 16, false), (u64::MAX, 1, true)]), 0);
        assert_eq!(file.contents(), disk_pattern());

        // The queue still works.
        let (status, len) = f.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]);
        assert_eq!((status, len), (S_OK, 513));
    }

    #[test]
    fn nothing_happens_before_activation_or_after_reset() {
        let file = TempFile::new(&disk_pattern());
        let mut block = Block::new(file.open(), false, "x").unwrap();
        block.queue_notify(0);
        block.reset();
        block.queue_notify(0);
    }
}
