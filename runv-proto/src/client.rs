//! Host side: a blocking, thread-based client of the guest agent.
//!
//! ```no_run
//! # use std::time::Duration;
//! # use runv_proto::{client::AgentClient, Request};
//! # fn f(fd: std::os::fd::OwnedFd) -> Result<(), runv_proto::client::Error> {
//! let agent = AgentClient::connect(fd, Duration::from_secs(30))?;
//! agent.request(Request::Ping, Duration::from_secs(5))?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{Cursor, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::preamble::{Noise, read_to_magic};
use crate::{
    AgentError, Event, FrameReader, HOST_WINDOW, MAX_NOISE, Message, Mux, OutputHandle,
    PROTOCOL_VERSION, ProtoError, Request, ResponseBody,
};

/// Errors of [`AgentClient`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent answered with an error (runc's wording and exit-code-like `code`).
    #[error("{0}")]
    Agent(#[from] AgentError),
    #[error("guest agent did not answer within {0}s")]
    HandshakeTimeout(u64),
    #[error("guest agent did not answer {what} within {secs:.1}s")]
    Timeout { what: String, secs: f64 },
    /// The connection to the guest is gone (the VM died or the agent exited).
    #[error("connection to the guest agent lost: {0}")]
    Disconnected(String),
    #[error(transparent)]
    Proto(#[from] ProtoError),
}

type Reply = Result<ResponseBody, AgentError>;

const EVENT_HISTORY: usize = 4096;

struct State {
    pending: HashMap<u64, Sender<Reply>>,
    subscribers: Vec<Sender<Event>>,
    history: Vec<Event>,
    /// Why the connection ended, once it has.
    dead: Option<String>,
}

struct Inner {
    mux: Arc<Mux>,
    state: Mutex<State>,
    dead_cv: Condvar,
    next_id: AtomicU64,
    agent_version: String,
    skipped_bytes: usize,
    shutdown_fd: OwnedFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection to one guest agent. Cheap to clone; usable from many threads at once.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl AgentClient {
    /// Takes over a connected byte stream to the agent (socket, pty, char device) and performs
    /// the version handshake: the agent speaks first (data sent to a virtio-serial port that
    /// the guest has not opened yet is discarded), we check its version and answer. Bytes
    /// before the agent's magic are skipped, at most [`MAX_NOISE`] of them
    /// ([`AgentClient::skipped_bytes`] says how many); see [`crate::preamble`].
    pub fn connect(stream: OwnedFd, handshake_timeout: Duration) -> Result<Self, Error> {
        Self::handshake(stream, handshake_timeout, false)
    }

    /// Like [`AgentClient::connect`], for an agent restored from a template: it greeted the
    /// template's host long ago and waits for frames, so we speak first; a Hello after its
    /// first one makes the agent greet again (magic, Hello), and that greeting answers ours.
    pub fn connect_restored(stream: OwnedFd, handshake_timeout: Duration) -> Result<Self, Error> {
        Self::handshake(stream, handshake_timeout, true)
    }

    fn handshake(
        stream: OwnedFd,
        handshake_timeout: Duration,
        restored: bool,
    ) -> Result<Self, Error> {
        let file = File::from(stream);
        let mut reader_file = file.try_clone().map_err(ProtoError::from)?;
        let noise = Arc::new(Mutex::new(Noise::default()));
        let reader_noise = Arc::clone(&noise);
        let shutdown_fd = OwnedFd::from(file.try_clone().map_err(ProtoError::from)?);
        let (hello_tx, hello_rx) = mpsc::channel::<Result<(u32, String), ProtoError>>();
        let (inner_tx, inner_rx) = mpsc::channel::<Arc<Inner>>();
        let mux = Mux::with_receive_window(Box::new(file), HOST_WINDOW);
        let host_hello = Message::Hello {
            version: PROTOCOL_VERSION,
            agent_version: format!("runv-host {}", env!("CARGO_PKG_VERSION")),
            window: Some(mux.receive_window()),
        };
        if restored {
            mux.send_message(&host_hello)?;
        }
        let mux2 = Arc::clone(&mux);
        std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || {
                let rest = match read_to_magic(&mut reader_file, MAX_NOISE, &reader_noise) {
                    Ok(Some(rest)) => rest,
                    Ok(None) => {
                        let _ = hello_tx.send(Err(ProtoError::Unexpected {
                            expected: "Hello from the agent",
                            got: "end of stream".into(),
                        }));
                        return;
                    }
                    Err(e) => {
                        let _ = hello_tx.send(Err(e));
                        return;
                    }
                };
                // The bytes read after the magic are the start of the first frame.
                let mut reader = FrameReader::new(Cursor::new(rest).chain(reader_file));
                let hello = match reader.read_frame() {
                    Ok(Some(f)) => match mux2.handle_frame(f) {
                        Ok(Some(Message::Hello {
                            version,
                            agent_version,
                            window,
                        })) => {
                            mux2.set_send_window(window);
                            Ok((version, agent_version))
                        }
                        Ok(other) => Err(ProtoError::Unexpected {
                            expected: "Hello from the agent",
                            got: format!("{other:?}"),
                        }),
                        Err(e) => Err(e),
                    },
                    Ok(None) => Err(ProtoError::Unexpected {
                        expected: "Hello from the agent",
                        got: "end of stream".into(),
                    }),
                    Err(e) => Err(e),
                };
                let ok = hello.is_ok();
                if hello_tx.send(hello).is_err() || !ok {
                    return;
                }
                if let Ok(inner) = inner_rx.recv() {
                    reader_loop(&inner, reader);
                }
            })
            .map_err(ProtoError::from)?;

        let (version, agent_version) = match hello_rx.recv_timeout(handshake_timeout) {
            Ok(r) => r?,
            Err(_) => {
                mux.close();
                // Output on the channel but no magic: say what came instead of only "no answer".
                let noise = lock(&noise).clone();
                if noise.bytes > 0 {
                    return Err(noise.error().into());
                }
                return Err(Error::HandshakeTimeout(handshake_timeout.as_secs().max(1)));
            }
        };
        let skipped_bytes = lock(&noise).bytes;
        if !restored {
            mux.send_message(&host_hello)?;
        }
        if version != PROTOCOL_VERSION {
            mux.close();
            return Err(ProtoError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
                peer_agent: agent_version,
            }
            .into());
        }
        let inner = Arc::new(Inner {
            mux,
            state: Mutex::new(State {
                pending: HashMap::new(),
                subscribers: Vec::new(),
                history: Vec::new(),
                dead: None,
            }),
            dead_cv: Condvar::new(),
            next_id: AtomicU64::new(1),
            agent_version,
            skipped_bytes,
            shutdown_fd,
        });
        let _ = inner_tx.send(Arc::clone(&inner));
        Ok(Self { inner })
    }

    /// The version string the agent sent in its Hello.
    pub fn agent_version(&self) -> &str {
        &self.inner.agent_version
    }

    /// How many bytes of other output came on the channel before the agent's magic (0 on a
    /// channel that only the agent writes to).
    pub fn skipped_bytes(&self) -> usize {
        self.inner.skipped_bytes
    }

    /// Sends a request and waits for its answer. Safe to call from several threads at once.
    pub fn request(&self, body: Request, timeout: Duration) -> Result<ResponseBody, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let what = request_name(&body);
        let (tx, rx) = mpsc::channel();
        {
            let mut st = lock(&self.inner.state);
            if let Some(why) = &st.dead {
                return Err(Error::Disconnected(why.clone()));
            }
            st.pending.insert(id, tx);
        }
        if let Err(e) = self.inner.mux.send_message(&Message::Request { id, body }) {
            lock(&self.inner.state).pending.remove(&id);
            return Err(e.into());
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => Ok(r?),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&self.inner.state).pending.remove(&id);
                Err(Error::Timeout {
                    what,
                    secs: timeout.as_secs_f64(),
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Disconnected(
                self.disconnected().unwrap_or_else(|| "reader ended".into()),
            )),
        }
    }

    /// A new receiver of agent events. Events that arrived earlier are replayed first, so a
    /// late subscriber does not miss an exit. The receiver disconnects when the connection dies.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        let mut st = lock(&self.inner.state);
        for e in &st.history {
            let _ = tx.send(e.clone());
        }
        if st.dead.is_none() {
            st.subscribers.push(tx);
        }
        rx
    }

    /// Same as [`AgentClient::subscribe`].
    pub fn events(&self) -> Receiver<Event> {
        self.subscribe()
    }

    /// Writes everything the guest sends on `stream` to `sink`; credit goes back to the guest
    /// only after a write succeeded. Output that arrived before this call is kept (at most one
    /// window) and written first. At EOF the sink is dropped and the handle completes.
    pub fn attach_output(&self, stream: u32, sink: Box<dyn Write + Send>) -> OutputHandle {
        self.inner.mux.attach_sink(stream, sink)
    }

    /// Sends input to a guest stream, blocking while the guest has granted no credit.
    pub fn send_input(&self, stream: u32, bytes: &[u8]) -> Result<(), Error> {
        Ok(self.inner.mux.send_data(stream, bytes)?)
    }

    /// Closes a guest input stream (the process reads EOF).
    pub fn close_input(&self, stream: u32) -> Result<(), Error> {
        Ok(self.inner.mux.send_eof(stream)?)
    }

    /// Copies a reader (for example the host's stdin) to a guest stream, then closes it.
    pub fn pump_input(&self, stream: u32, source: impl std::io::Read) -> Result<u64, Error> {
        Ok(self.inner.mux.pump(stream, source)?.bytes)
    }

    /// `Some(reason)` once the connection is gone (VM died, agent exited, protocol error).
    pub fn disconnected(&self) -> Option<String> {
        lock(&self.inner.state).dead.clone()
    }

    /// Waits until the connection is gone; returns the reason, or None on timeout.
    pub fn wait_disconnected(&self, timeout: Duration) -> Option<String> {
        let st = lock(&self.inner.state);
        let (st, _) = self
            .inner
            .dead_cv
            .wait_timeout_while(st, timeout, |s| s.dead.is_none())
            .unwrap_or_else(|e| e.into_inner());
        st.dead.clone()
    }

    /// Closes the connection from our side; pending requests fail with `Disconnected`.
    pub fn close(&self) {
        self.inner.mux.close();
        // Wake the reader thread if the stream is a socket (other fds fail harmlessly).
        if let Ok(fd) = self.inner.shutdown_fd.try_clone() {
            let _ = std::os::unix::net::UnixStream::from(fd).shutdown(std::net::Shutdown::Both);
        }
        mark_dead(&self.inner, "connection closed by the host".into());
    }
}

fn request_name(r: &Request) -> String {
    let v = serde_json::to_value(r).ok();
    v.as_ref()
        .and_then(|v| v.get("op"))
        .and_then(|o| o.as_str())
        .unwrap_or("request")
        .to_string()
}

fn reader_loop(inner: &Arc<Inner>, mut reader: FrameReader<impl Read>) {
    let why = loop {
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break "the guest closed the connection (VM exited?)".to_string(),
            Err(e) => break format!("bad data from the guest: {e}"),
        };
        match inner.mux.handle_frame(frame) {
            Ok(None) => {}
            Ok(Some(Message::Response { id, result })) => {
                if let Some(tx) = lock(&inner.state).pending.remove(&id) {
                    let _ = tx.send(result);
                }
            }
            Ok(Some(Message::Event { event })) => {
                let mut st = lock(&inner.state);
                st.subscribers.retain(|s| s.send(event.clone()).is_ok());
                if st.history.len() >= EVENT_HISTORY {
                    st.history.remove(0);
                }
                st.history.push(event);
            }
            Ok(Some(Message::Hello { .. })) | Ok(Some(Message::Request { .. })) => {
                // The agent sends no requests; a repeated Hello is harmless. Ignore both.
            }
            Err(e) => break format!("bad data from the guest: {e}"),
        }
    };
    inner.mux.close();
    mark_dead(inner, why);
}

fn mark_dead(inner: &Inner, why: String) {
    let mut st = lock(&inner.state);
    if st.dead.is_none() {
        st.dead = Some(why);
    }
    st.pending.clear();
    st.subscribers.clear();
    inner.dead_cv.notify_all();
}
