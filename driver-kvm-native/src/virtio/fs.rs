//! virtio-fs (virtio 1.2, 5.11) served by a vhost-user daemon ([`crate::virtiofsd`]): this
//! process answers the transport registers and hands the daemon the guest's RAM (a shared
//! mapping, see [`crate::memory`]), the rings' addresses and two eventfds per queue. The
//! daemon reads requests from and writes replies into guest memory itself.
//!
//! The guest's notifications reach the daemon through this device (the transport's
//! ioeventfd is the event loop's; [`queue_notify`](VirtioDevice::queue_notify) kicks the
//! daemon), and the daemon's "used" signals come back here: the MMIO transport's
//! InterruptStatus must say why before the guest's handler looks at the rings.
//!
//! A daemon that goes away (killed on the host) would leave every file access of the guest
//! waiting for ever: the device watches its connection and ends the VM instead.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::state::QueueSnapshot;
use super::{Interrupt, VirtioDevice};
use crate::control::Control;
use crate::exit::ExitReason;
use crate::virtiofsd::Daemon;

pub const TYPE_FS: u32 = 26;
/// The high-priority queue and one request queue.
const QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 256;
/// `struct virtio_fs_config`: the tag, NUL-padded, then `num_request_queues`.
const TAG_LEN: usize = 36;
/// What this device passes on from the daemon's features to the guest.
const GUEST_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// Where the daemon for a share runs and logs.
pub struct FsBackend<'a> {
    pub binary: &'a Path,
    pub socket: &'a Path,
    pub log: Option<&'a Path>,
}

pub struct Fs {
    tag: String,
    config: [u8; TAG_LEN + 4],
    /// Dropped before the daemon: closing the connection is what ends it.
    frontend: Frontend,
    daemon: Daemon,
    daemon_features: u64,
    /// `VHOST_USER_F_PROTOCOL_FEATURES` was offered: the rings then start disabled.
    protocol: bool,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    active: Option<Active>,
    /// Told to end the VM when the daemon's connection closes.
    control: Arc<Control>,
    /// The connection's fd (the frontend locks to give it out).
    socket: RawFd,
}

struct Active {
    interrupt: Interrupt,
    queues: Vec<Queue>,
}

fn vhost_err(what: &'static str) -> impl FnOnce(vhost::Error) -> String {
    move |e| format!("virtio-fs: {what}: {e}")
}

impl Fs {
    /// Starts the daemon for `dir` and agrees on the protocol with it.
    pub fn new(
        tag: &str,
        dir: &Path,
        readonly: bool,
        backend: &FsBackend,
        control: Arc<Control>,
    ) -> Result<Self, String> {
        if tag.is_empty() || tag.len() >= TAG_LEN {
            return Err(format!(
                "the virtio-fs tag {tag:?} must have 1 to {} bytes",
                TAG_LEN - 1
            ));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        let (daemon, stream) =
            Daemon::start(backend.binary, dir, readonly, backend.socket, backend.log)?;
        let mut frontend = Frontend::from_stream(stream, QUEUES as u64);
        frontend.set_owner().map_err(vhost_err("SET_OWNER"))?;
        let daemon_features = frontend.get_features().map_err(vhost_err("GET_FEATURES"))?;
        if daemon_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(format!(
                "virtio-fs: {} does not offer virtio 1.0 (features {daemon_features:#x})",
                backend.binary.display()
            ));
        }
        let protocol = daemon_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(vhost_err("GET_PROTOCOL_FEATURES"))?;
            // Replies to every request: a refused memory table is an error here, not a
            // daemon that silently serves nothing.
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::REPLY_ACK)
                .map_err(vhost_err("SET_PROTOCOL_FEATURES"))?;
        }
        let frontend_fd = frontend.as_raw_fd();
        let eventfds = || {
            (0..QUEUES)
                .map(|_| EventFd::new(nix::libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            tag: tag.to_string(),
            config,
            kicks: eventfds()?,
            calls: eventfds()?,
            frontend,
            daemon,
            daemon_features,
            protocol,
            active: None,
            control,
            socket: frontend_fd,
        })
    }

    /// Whether the daemon closed its end of the connection. Peeks, so that a reply on its way
    /// to a request of a vCPU thread stays where it is.
    fn daemon_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            nix::sys::socket::recv(
                self.socket,
                &mut byte,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ),
            Ok(0) | Err(nix::errno::Errno::ECONNRESET)
        )
    }

    /// Gives the daemon the guest RAM and the rings of `queues`.
    fn start_daemon(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        acked_features: u64,
    ) -> Result<(), String> {
        let protocol_bit = self.daemon_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(acked_features | protocol_bit)
            .map_err(vhost_err("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("virtio-fs: the guest RAM cannot be shared: {e}"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(vhost_err("SET_MEM_TABLE"))?;
        let host = |addr: u64| {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|e| {
                    format!("virtio-fs: a ring at {addr:#x} is outside the guest RAM: {e}")
                })
        };
        for (i, queue) in queues.iter().enumerate() {
            if !queue.ready() {
                continue;
            }
            let rings = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host(queue.desc_table())?,
                used_ring_addr: host(queue.used_ring())?,
                avail_ring_addr: host(queue.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, queue.size())
                .map_err(vhost_err("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &rings)
                .map_err(vhost_err("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, queue.next_avail())
                .map_err(vhost_err("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &self.calls[i])
                .map_err(vhost_err("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &self.kicks[i])
                .map_err(vhost_err("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(vhost_err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; QUEUES]
    }

    fn features(&self) -> u64 {
        self.daemon_features & GUEST_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_window(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), String> {
        self.start_daemon(&mem, &queues, acked_features)?;
        self.active = Some(Active { interrupt, queues });
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        if let Some(kick) = self.kicks.get(usize::from(index)) {
            // Fails only when the counter would overflow: a kick is pending anyway.
            let _ = kick.write(1);
        }
    }

    fn host_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.calls.iter().map(|c| c.as_raw_fd()).collect();
        fds.push(self.socket);
        fds
    }

    fn host_fd_ready(&mut self, fd: RawFd, readable: bool, _writable: bool) {
        if fd == self.socket {
            if readable && self.daemon_gone() {
                self.control.request_exit(ExitReason::HostError(format!(
                    "virtiofsd for the share {:?} exited: the guest cannot reach its files",
                    self.tag
                )));
            }
            return;
        }
        let Some(call) = self.calls.iter().find(|c| c.as_raw_fd() == fd) else {
            return;
        };
        // Edge-triggered: one read takes the whole count.
        if readable && call.read().is_ok() {
            if let Some(active) = &self.active {
                active.interrupt.signal_used_queue();
            }
        }
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            // GET_VRING_BASE stops a ring; the next activation sets it up again.
            for (i, queue) in active.queues.iter().enumerate() {
                if queue.ready() {
                    let _ = self.frontend.get_vring_base(i);
                }
            }
        }
    }

    fn process(&self) -> Option<u32> {
        Some(self.daemon.pid())
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
    use super::*;
    use crate::memory::{Backing, guest_memory};
    use crate::virtio::MmioTransport;
    use crate::virtio::mmio::test_utils::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const FUSE_INIT: u32 = 26;
    const FUSE_LOOKUP: u32 = 1;
    const REQUEST_QUEUE: u32 = 1;
    const REQ: u64 = 0x20_0000;
    const REPLY: u64 = 0x21_0000;

    /// A FUSE request: `fuse_in_header` (len, opcode, unique, nodeid, uid, gid, pid,
    /// total_extlen, padding), then `body`.
    fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        r.extend_from_slice(&opcode.to_le_bytes());
        r.extend_from_slice(&unique.to_le_bytes());
        r.extend_from_slice(&nodeid.to_le_bytes());
        r.extend_from_slice(&[0u8; 16]);
        r.extend_from_slice(body);
        r
    }

    /// Puts `request` on the request queue as chain `first`, kicks, and waits for the daemon
    /// to give it back; returns the reply's `fuse_out_header` error and the reply.
    fn round_trip(
        t: &mut MmioTransport,
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        first: u16,
        request: &[u8],
    ) -> (i32, Vec<u8>) {
        let used_before = used_idx(vq);
        mem.write_slice(request, GuestAddress(REQ)).unwrap();
        mem.write_slice(&[0u8; 4096], GuestAddress(REPLY)).unwrap();
        add_chain(
            vq,
            first,
            &[(REQ, request.len() as u32, false), (REPLY, 4096, true)],
        );
        t.notify(REQUEST_QUEUE as u16);
        let deadline = Instant::now() + Duration::from_secs(10);
        while used_idx(vq) == used_before {
            assert!(Instant::now() < deadline, "virtiofsd did not answer");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut reply = vec![0u8; 4096];
        mem.read_slice(&mut reply, GuestAddress(REPLY)).unwrap();
        let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
        (error, reply)
    }

    /// The device against a real virtiofsd, without a VM: the rings in guest memory, FUSE_INIT
    /// and a LOOKUP of a file in the shared directory, answered by the daemon through the
    /// shared RAM; then the daemon goes with the device.
    #[test]
    fn a_real_virtiofsd_answers_fuse_requests_through_the_rings() {
        let Some(binary) = crate::virtiofsd::find(None) else {
            println!("skipped: no virtiofsd (scripts/test.sh builds one)");
            return;
        };
        let binary = binary.unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let shared = dir.as_path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("hello"), b"12345").unwrap();
        let socket = dir.as_path().join("fs.sock");
        let log = dir.as_path().join("virtiofsd.log");
        let fs = Fs::new(
            "rootfs",
            &shared,
            false,
            &FsBackend {
                binary: &binary,
                socket: &socket,
                log: Some(&log),
            },
            Arc::new(Control::default()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let pid = fs.process().unwrap();
        assert!(
            !socket.exists(),
            "the socket file stays only until connected"
        );

        let mem = guest_memory(64, Backing::Shared).unwrap();
        let irq = Arc::new(EventFd::new(nix::libc::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(Box::new(fs), mem.clone(), irq).unwrap();
        let mut config = [0u8; 8];
        t.read(0x100, &mut config);
        assert_eq!(&config[..7], b"rootfs\0");
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let requests = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        assert!(negotiate(&mut t, 1 << VIRTIO_F_VERSION_1));
        setup_queue(&mut t, 0, &hiprio, 16);
        setup_queue(&mut t, REQUEST_QUEUE, &requests, 16);
        w(&mut t, 0x70, S_ACK_DRIVER | 0x8 | 0x4);
        assert!(t.activated(), "{:?}", t.last_error());

        // FUSE_INIT 7.31: major, minor, max_readahead, flags.
        let init: Vec<u8> = [7u32, 31, 0, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let (error, reply) = round_trip(
            &mut t,
            &mem,
            &requests,
            0,
            &fuse_request(FUSE_INIT, 1, 0, &init),
        );
        assert_eq!(
            error,
            0,
            "FUSE_INIT: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(reply[16..20].try_into().unwrap()), 7);

        // LOOKUP "hello" in the root (node 1): fuse_entry_out's attr.size is the file's.
        let lookup = fuse_request(FUSE_LOOKUP, 2, 1, b"hello\0");
        let (error, reply) = round_trip(&mut t, &mem, &requests, 2, &lookup);
        assert_eq!(error, 0, "LOOKUP hello");
        // out header 16, nodeid, generation, entry_valid, attr_valid 8 each, two u32
        // nsec fields, then fuse_attr: ino, size.
        let size = u64::from_le_bytes(reply[16 + 40 + 8..16 + 40 + 16].try_into().unwrap());
        assert_eq!(size, 5);
        let missing = fuse_request(FUSE_LOOKUP, 3, 1, b"nothing-here\0");
        let (error, _) = round_trip(&mut t, &mem, &requests, 4, &missing);
        assert_eq!(error, -nix::libc::ENOENT);

        drop(t);
        let gone = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                break;
            }
            assert!(Instant::now() < gone, "virtiofsd {pid} outlived its device");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A daemon killed on the host ends the VM (with why) instead of leaving the guest's file
    /// accesses waiting for ever; a daemon that is alive does not.
    #[test]
    fn a_killed_daemon_ends_the_vm() {
        let Some(binary) = crate::virtiofsd::find(None) else {
            println!("skipped: no virtiofsd (scripts/test.sh builds one)");
            return;
        };
        let binary = binary.unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let control = Arc::new(Control::default());
        let mut fs = Fs::new(
            "vol",
            dir.as_path(),
            true,
            &FsBackend {
                binary: &binary,
                socket: &dir.as_path().join("fs.sock"),
                log: None,
            },
            control.clone(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let socket = *fs.host_fds().last().unwrap();
        fs.host_fd_ready(socket, true, false);
        assert_eq!(control.exit_reason(), None);

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(fs.process().unwrap() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.exit_reason().is_none() {
            assert!(Instant::now() < deadline, "the VM did not end");
            fs.host_fd_ready(socket, true, false);
            std::thread::sleep(Duration::from_millis(10));
        }
        let why = control.exit_reason().unwrap().to_string();
        assert!(
            why.contains("virtiofsd for the share \"vol\" exited"),
            "{why}"
        );
    }

    #[test]
    fn tags_that_do_not_fit_the_config_space_are_refused_before_any_daemon_starts() {
        let backend = FsBackend {
            binary: Path::new("/nonexistent/virtiofsd"),
            socket: Path::new("/nonexistent/fs.sock"),
            log: None,
        };
        for tag in ["", &"t".repeat(TAG_LEN)] {
            let control = Arc::new(Control::default());
            let e = Fs::new(tag, Path::new("/"), false, &backend, control)
                .err()
                .unwrap();
            assert!(e.contains("must have 1 to 35 bytes"), "{e}");
        }
    }
}
