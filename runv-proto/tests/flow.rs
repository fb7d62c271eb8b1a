use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runv_proto::client::{AgentClient, Error};
use runv_proto::*;

/// A source of a known byte pattern that records how far ahead of the consumer it was read.
struct Source {
    pos: u64,
    len: u64,
    consumed: Arc<AtomicU64>,
    max_ahead: Arc<AtomicU64>,
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2654435761) >> 7) as u8
}

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(self.pos + k as u64);
        }
        self.pos += n as u64;
        let ahead = self.pos - self.consumed.load(Ordering::SeqCst);
        self.max_ahead.fetch_max(ahead, Ordering::SeqCst);
        Ok(n)
    }
}

/// A slow consumer that checks every byte.
struct SlowSink {
    pos: u64,
    consumed: Arc<AtomicU64>,
    writes: u64,
}

impl Write for SlowSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for (k, b) in buf.iter().enumerate() {
            assert_eq!(
                *b,
                pattern(self.pos + k as u64),
                "byte {} out of order",
                self.pos + k as u64
            );
        }
        self.pos += buf.len() as u64;
        self.writes += 1;
        if self.writes.is_multiple_of(16) {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.consumed.store(self.pos, Ordering::SeqCst);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams 8 MiB through a sender and a receiver (windows as given) to a slow consumer that
/// is attached late and checks every byte; returns how far ahead of the consumer the sender
/// read its source at most.
fn slow_reader(receive_window: u64, announced: Option<u64>) -> u64 {
    const TOTAL: u64 = 8 << 20;
    let (a, b) = UnixStream::pair().unwrap();
    let sender = Mux::new(Box::new(a.try_clone().unwrap()));
    sender.set_send_window(announced);
    let receiver = Mux::with_receive_window(Box::new(b.try_clone().unwrap()), receive_window);

    // Sender side: read credit frames coming back.
    let s2 = Arc::clone(&sender);
    let mut a_reader = FrameReader::new(a);
    std::thread::spawn(move || {
        while let Ok(Some(f)) = a_reader.read_frame() {
            s2.handle_frame(f).unwrap();
        }
    });
    // Receiver side: feed data frames into its mux.
    let r2 = Arc::clone(&receiver);
    let mut b_reader = FrameReader::new(b);
    std::thread::spawn(move || {
        while let Ok(Some(f)) = b_reader.read_frame() {
            r2.handle_frame(f).unwrap();
        }
    });

    let consumed = Arc::new(AtomicU64::new(0));
    let max_ahead = Arc::new(AtomicU64::new(0));
    let src = Source {
        pos: 0,
        len: TOTAL,
        consumed: consumed.clone(),
        max_ahead: max_ahead.clone(),
    };
    let pump = {
        let sender = Arc::clone(&sender);
        std::thread::spawn(move || sender.pump(5, src).unwrap())
    };
    // Attach late: the first window is buffered, not lost.
    std::thread::sleep(Duration::from_millis(100));
    let h = receiver.attach_sink(
        5,
        Box::new(SlowSink {
            pos: 0,
            consumed: consumed.clone(),
            writes: 0,
        }),
    );
    assert!(h.wait(Duration::from_secs(60)), "stream did not finish");
    let sent = pump.join().unwrap();
    assert_eq!(sent.bytes, TOTAL);
    // The stats the debug logs show count what really went through.
    assert_eq!(h.stats().bytes, TOTAL);
    assert_eq!(h.stats().frames, sent.frames);
    assert_eq!(consumed.load(Ordering::SeqCst), TOTAL);
    max_ahead.load(Ordering::SeqCst)
}

#[test]
fn slow_reader_gets_every_byte_and_sender_stays_bounded() {
    let ahead = slow_reader(INITIAL_WINDOW, None);
    assert!(
        ahead <= INITIAL_WINDOW,
        "sender read {ahead} bytes ahead of the consumer, window is {INITIAL_WINDOW}"
    );
    assert!(ahead > 0);
}

#[test]
fn a_window_announced_by_the_receiver_is_what_the_sender_uses() {
    const WINDOW: u64 = 1 << 20;
    let ahead = slow_reader(WINDOW, Some(WINDOW));
    // While no consumer is attached the sender fills the whole window, and never more.
    assert!(
        ahead > INITIAL_WINDOW && ahead <= WINDOW,
        "sender read {ahead} bytes ahead of the consumer, window is {WINDOW}"
    );
    // A peer's announcement is bounded.
    let m = Mux::new(Box::new(std::io::sink()));
    m.set_send_window(Some(u64::MAX));
    assert_eq!(m.send_window(), MAX_WINDOW);
    m.set_send_window(Some(0));
    assert_eq!(m.send_window(), MIN_WINDOW);
    m.set_send_window(None);
    assert_eq!(m.send_window(), INITIAL_WINDOW);
}

#[test]
fn data_beyond_the_receive_window_is_refused() {
    let receiver = Mux::with_receive_window(Box::new(std::io::sink()), 64 << 10);
    let chunk = vec![0u8; 32 << 10];
    receiver.handle_frame(Frame::data(3, &chunk)).unwrap();
    receiver.handle_frame(Frame::data(3, &chunk)).unwrap();
    let e = receiver.handle_frame(Frame::data(3, &[0])).unwrap_err();
    assert!(e.to_string().contains("granted credit"), "{e}");
}

fn fake_agent(s: UnixStream, version: u32) -> std::thread::JoinHandle<()> {
    fake_agent_after(s, version, b"")
}

/// The same, after `noise` (console output on the channel before the agent started).
fn fake_agent_after(
    mut s: UnixStream,
    version: u32,
    noise: &'static [u8],
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        s.write_all(noise).unwrap();
        let mux = Mux::new(Box::new(s.try_clone().unwrap()));
        if version == PROTOCOL_VERSION {
            mux.send_agent_hello("fake".into()).unwrap();
        } else {
            s.write_all(AGENT_MAGIC).unwrap();
            mux.send_message(&Message::Hello {
                version,
                agent_version: "fake".into(),
                window: None,
            })
            .unwrap();
        }
        let mut r = FrameReader::new(s);
        while let Ok(Some(f)) = r.read_frame() {
            let Some(msg) = mux.handle_frame(f).unwrap() else {
                continue;
            };
            if let Message::Request { id, body } = msg {
                let mux = Arc::clone(&mux);
                std::thread::spawn(move || {
                    let result = match body {
                        Request::Ping => Ok(ResponseBody::Pong {
                            agent_version: "fake".into(),
                        }),
                        Request::Ps { container_id } => {
                            // Answer slowly so concurrent requests overtake each other.
                            std::thread::sleep(Duration::from_millis(50));
                            Err(AgentError::new(
                                1,
                                format!("container {container_id} does not exist"),
                            ))
                        }
                        Request::StartContainer { id: cid } => {
                            mux.send_data(9, b"out").unwrap();
                            mux.send_eof(9).unwrap();
                            mux.send_message(&Message::Event {
                                event: Event::ProcessExited {
                                    container_id: cid,
                                    exec_id: None,
                                    status: ExitStatus::Exited(42),
                                },
                            })
                            .unwrap();
                            Ok(ResponseBody::Ok)
                        }
                        Request::Shutdown => std::process::exit(0),
                        _ => Err(AgentError::new(1, "unsupported")),
                    };
                    let _ = mux.send_message(&Message::Response { id, result });
                });
            }
        }
    })
}

#[test]
fn client_requests_events_output_and_disconnect() {
    let (a, b) = UnixStream::pair().unwrap();
    let agent = fake_agent(b, PROTOCOL_VERSION);
    let c = AgentClient::connect(a.into(), Duration::from_secs(5)).unwrap();
    assert_eq!(c.agent_version(), "fake");

    let mut threads = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        threads.push(std::thread::spawn(move || {
            if i % 2 == 0 {
                let e = c
                    .request(
                        Request::Ps {
                            container_id: format!("c{i}"),
                        },
                        Duration::from_secs(5),
                    )
                    .unwrap_err();
                assert_eq!(e.to_string(), format!("container c{i} does not exist"));
            } else {
                assert!(matches!(
                    c.request(Request::Ping, Duration::from_secs(5)).unwrap(),
                    ResponseBody::Pong { .. }
                ));
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }

    let out = Arc::new(Mutex::new(Vec::new()));
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let h = c.attach_output(9, Box::new(Shared(out.clone())));
    c.request(
        Request::StartContainer { id: "x".into() },
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(h.wait(Duration::from_secs(5)));
    assert_eq!(&*out.lock().unwrap(), b"out");
    // Subscribing after the event still delivers it.
    let ev = c.subscribe().recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        ev,
        Event::ProcessExited {
            container_id: "x".into(),
            exec_id: None,
            status: ExitStatus::Exited(42)
        }
    );

    drop(agent); // detach; now make the agent's end go away
    c.close();
    assert!(c.wait_disconnected(Duration::from_secs(5)).is_some());
    assert!(matches!(
        c.request(Request::Ping, Duration::from_secs(1)),
        Err(Error::Disconnected(_)) | Err(Error::Proto(_))
    ));
}

#[test]
fn peer_closing_is_reported_as_disconnect() {
    let (a, b) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        let mux = Mux::new(Box::new(b.try_clone().unwrap()));
        mux.send_agent_hello("x".into()).unwrap();
        let mut r = FrameReader::new(b);
        r.read_frame().unwrap(); // the host's hello
        // Drop the socket: the VM "died".
    });
    let c = AgentClient::connect(a.into(), Duration::from_secs(5)).unwrap();
    t.join().unwrap();
    let why = c
        .wait_disconnected(Duration::from_secs(5))
        .expect("disconnect noticed");
    assert!(why.contains("closed the connection"), "{why}");
    let rx = c.subscribe();
    assert!(rx.recv_timeout(Duration::from_secs(1)).is_err());
}

#[test]
fn handshake_timeout_and_version_mismatch() {
    let (a, _b) = UnixStream::pair().unwrap();
    let e = AgentClient::connect(a.into(), Duration::from_millis(200))
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "guest agent did not answer within 1s");

    let (a, b) = UnixStream::pair().unwrap();
    let _agent = fake_agent(b, PROTOCOL_VERSION + 1);
    let e = AgentClient::connect(a.into(), Duration::from_secs(5))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("version mismatch"), "{e}");
}

#[test]
fn console_output_before_the_agent_is_skipped_or_named() {
    // Kernel log lines on the channel before the agent's magic: skipped, counted, and the
    // connection works.
    const BOOT_LOG: &[u8] = b"[    0.000000] Linux version 6.1.0-28-amd64\r\n\
        [    0.000000] Command line: console=ttyS0 runv.channel=/dev/ttyS1\r\n";
    let (a, b) = UnixStream::pair().unwrap();
    let _agent = fake_agent_after(b, PROTOCOL_VERSION, BOOT_LOG);
    let c = AgentClient::connect(a.into(), Duration::from_secs(5)).unwrap();
    assert_eq!(c.skipped_bytes(), BOOT_LOG.len());
    assert!(matches!(
        c.request(Request::Ping, Duration::from_secs(5)).unwrap(),
        ResponseBody::Pong { .. }
    ));

    // Only console output, and no agent: the error says so (not a frame length).
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(BOOT_LOG).unwrap();
    let e = AgentClient::connect(a.into(), Duration::from_millis(300))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with("the agent channel carried console output: "),
        "{e}"
    );
    assert!(e.contains("Linux version"), "{e}");

    // An agent of protocol 1 (no magic, a bare Hello) is a version mismatch.
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mux = Mux::new(Box::new(b.try_clone().unwrap()));
        mux.send_message(&Message::Hello {
            version: 1,
            agent_version: "old".into(),
            window: None,
        })
        .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(b);
    });
    let e = AgentClient::connect(a.into(), Duration::from_secs(5))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("version mismatch") && e.contains("speaks 1"),
        "{e}"
    );
}

#[test]
fn throughput_over_socketpair() {
    // Not a timing assertion: prints the rate so regressions are visible in test logs.
    const TOTAL: u64 = 64 << 20;
    let (a, b) = UnixStream::pair().unwrap();
    let sender = Mux::new(Box::new(a.try_clone().unwrap()));
    let receiver = Mux::new(Box::new(b.try_clone().unwrap()));
    let s2 = Arc::clone(&sender);
    let mut ar = FrameReader::new(a);
    std::thread::spawn(move || {
        while let Ok(Some(f)) = ar.read_frame() {
            s2.handle_frame(f).unwrap();
        }
    });
    let r2 = Arc::clone(&receiver);
    let mut br = FrameReader::new(b);
    std::thread::spawn(move || {
        while let Ok(Some(f)) = br.read_frame() {
            r2.handle_frame(f).unwrap();
        }
    });
    let t0 = std::time::Instant::now();
    let h = receiver.attach_sink(1, Box::new(std::io::sink()));
    let n = sender
        .pump(1, std::io::repeat(7).take(TOTAL))
        .unwrap()
        .bytes;
    assert!(h.wait(Duration::from_secs(120)));
    assert_eq!(n, TOTAL);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("throughput: {:.0} MiB/s", TOTAL as f64 / secs / 1048576.0);
}
