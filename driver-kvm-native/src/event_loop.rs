//! The device thread: one epoll over the virtqueues' ioeventfds, the devices' host file
//! descriptors and a stop event.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio::MmioTransport;

enum Source {
    Stop,
    Queue { device: usize, queue: u16 },
    Host { device: usize, fd: RawFd },
}

pub struct EventLoop {
    epoll: Epoll,
    sources: Vec<Source>,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    stop: Arc<EventFd>,
}

impl EventLoop {
    /// Watches every queue notification and host fd of `devices`.
    pub fn new(devices: Vec<Arc<Mutex<MmioTransport>>>) -> Result<Self, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll_create: {e}"))?;
        let stop =
            Arc::new(EventFd::new(nix::libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
        let mut this = Self {
            epoll,
            sources: Vec::new(),
            devices,
            stop,
        };
        this.watch(this.stop.as_raw_fd(), EventSet::IN, Source::Stop)?;
        for device in 0..this.devices.len() {
            let (queues, hosts) = {
                let t = this.devices[device]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let queues: Vec<RawFd> = t.queue_events().iter().map(|e| e.as_raw_fd()).collect();
                (queues, t.host_fds())
            };
            for (queue, fd) in queues.into_iter().enumerate() {
                let queue = queue as u16;
                this.watch(fd, EventSet::IN, Source::Queue { device, queue })?;
            }
            for fd in hosts {
                let events = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
                this.watch(fd, events, Source::Host { device, fd })?;
            }
        }
        Ok(this)
    }

    fn watch(&mut self, fd: RawFd, events: EventSet, source: Source) -> Result<(), String> {
        let token = self.sources.len() as u64;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
            .map_err(|e| format!("epoll_ctl add fd {fd}: {e}"))?;
        self.sources.push(source);
        Ok(())
    }

    /// Writing to this ends [`run`](Self::run).
    pub fn stop_event(&self) -> Arc<EventFd> {
        self.stop.clone()
    }

    pub fn run(self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            for event in &events[..n] {
                let Some(source) = self.sources.get(event.data() as usize) else {
                    continue;
                };
                match *source {
                    Source::Stop => return,
                    Source::Queue { device, queue } => {
                        let mut t = self.devices[device]
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        // Reading resets the counter: notifications coalesce.
                        if t.queue_events()[usize::from(queue)].read().is_ok() {
                            t.notify(queue);
                        }
                    }
                    Source::Host { device, fd } => {
                        let set = event.event_set();
                        let readable =
                            set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
                        let writable = set.intersects(EventSet::OUT | EventSet::ERROR);
                        self.devices[device]
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .host_fd_ready(fd, readable, writable);
                    }
                }
            }
        }
    }
}
