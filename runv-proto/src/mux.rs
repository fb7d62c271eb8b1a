//! Stream multiplexing with credit-based flow control, shared by host and guest.
//!
//! A [`Mux`] owns the writing half of a connection. The owner of the reading half feeds every
//! frame it reads to [`Mux::handle_frame`], which applies data, EOF and credit frames and hands
//! control messages back.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::timing::StreamStats;
use crate::{
    Frame, FrameType, FrameWriter, INITIAL_WINDOW, MAX_DATA, MAX_WINDOW, MIN_WINDOW, Message,
    ProtoError, Result,
};

type Writer = FrameWriter<Box<dyn Write + Send>>;

enum SinkMsg {
    Data(Vec<u8>),
    Eof,
}

enum Slot {
    /// Data that arrived before a sink was attached (bounded by the window).
    Pending {
        chunks: Vec<Vec<u8>>,
        eof: bool,
    },
    Attached(mpsc::Sender<SinkMsg>),
    Closed,
}

struct InStream {
    slot: Slot,
    /// Bytes received and not yet credited back: never above the window.
    outstanding: u64,
}

/// Completion of an attached output stream.
#[derive(Clone)]
pub struct OutputHandle {
    done: Arc<(Mutex<bool>, Condvar)>,
    stats: Arc<Mutex<StreamStats>>,
}

impl OutputHandle {
    fn new() -> Self {
        Self {
            done: Arc::new((Mutex::new(false), Condvar::new())),
            stats: Arc::default(),
        }
    }

    /// What the sink spent its time on, once it is done (zero before).
    pub fn stats(&self) -> StreamStats {
        *lock(&self.stats)
    }

    fn finish(&self) {
        *lock(&self.done.0) = true;
        self.done.1.notify_all();
    }

    /// Waits until the stream's EOF arrived and every byte was written to the sink (or the
    /// connection died). Returns false on timeout.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut done = lock(&self.done.0);
        while !*done {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            done = self
                .done
                .1
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    pub fn is_done(&self) -> bool {
        *lock(&self.done.0)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writing half of a connection plus per-stream flow-control state.
pub struct Mux {
    writer: Mutex<Writer>,
    /// Credit we may still spend per outgoing stream.
    credits: Mutex<HashMap<u32, u64>>,
    credit_cv: Condvar,
    incoming: Mutex<HashMap<u32, InStream>>,
    closed: AtomicBool,
    /// Credit each incoming stream starts with: what we announce in our Hello.
    receive_window: u64,
    /// Credit each outgoing stream starts with: what the peer announced.
    send_window: AtomicU64,
}

impl Mux {
    /// A mux whose incoming streams get the protocol's [`INITIAL_WINDOW`].
    pub fn new(writer: Box<dyn Write + Send>) -> Arc<Self> {
        Self::with_receive_window(writer, INITIAL_WINDOW)
    }

    /// A mux whose incoming streams get `window` bytes of credit; announce it to the peer in
    /// the Hello ([`Mux::receive_window`]).
    pub fn with_receive_window(writer: Box<dyn Write + Send>, window: u64) -> Arc<Self> {
        Arc::new(Self {
            writer: Mutex::new(FrameWriter::new(writer)),
            credits: Mutex::new(HashMap::new()),
            credit_cv: Condvar::new(),
            incoming: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            receive_window: window,
            send_window: AtomicU64::new(INITIAL_WINDOW),
        })
    }

    /// The credit our incoming streams start with.
    pub fn receive_window(&self) -> u64 {
        self.receive_window
    }

    /// Takes the window the peer announced in its Hello (None: it announced none, the
    /// protocol's default), bounded to [`MIN_WINDOW`]..=[`MAX_WINDOW`]; it applies to
    /// outgoing streams that have not started yet.
    pub fn set_send_window(&self, announced: Option<u64>) {
        let w = announced.map_or(INITIAL_WINDOW, |w| w.clamp(MIN_WINDOW, MAX_WINDOW));
        self.send_window.store(w, Ordering::SeqCst);
    }

    /// The credit a new outgoing stream starts with.
    pub fn send_window(&self) -> u64 {
        self.send_window.load(Ordering::SeqCst)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn closed_err() -> ProtoError {
        ProtoError::Io(io::Error::new(
            io::ErrorKind::BrokenPipe,
            "connection closed",
        ))
    }

    fn write_frame(&self, frame: &Frame) -> Result<()> {
        if self.is_closed() {
            return Err(Self::closed_err());
        }
        let r = lock(&self.writer).write_frame(frame);
        if r.is_err() {
            self.close();
        }
        r
    }

    /// Sends one control message.
    pub fn send_message(&self, msg: &Message) -> Result<()> {
        self.write_frame(&Frame::control(msg)?)
    }

    /// The agent's first words: [`crate::AGENT_MAGIC`], then its Hello (see [`crate::preamble`]).
    pub fn send_agent_hello(&self, agent_version: String) -> Result<()> {
        if self.is_closed() {
            return Err(Self::closed_err());
        }
        let hello = Frame::control(&Message::Hello {
            version: crate::PROTOCOL_VERSION,
            agent_version,
            window: Some(self.receive_window),
        })?;
        let r = lock(&self.writer).write_frame_after(crate::AGENT_MAGIC, &hello);
        if r.is_err() {
            self.close();
        }
        r
    }

    /// Marks the connection dead: wakes every sender waiting for credit and ends every sink.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        {
            let _g = lock(&self.credits);
            self.credit_cv.notify_all();
        }
        for s in lock(&self.incoming).values_mut() {
            // Dropping the sender ends the sink thread after it drained its queue.
            if matches!(s.slot, Slot::Attached(_)) {
                s.slot = Slot::Closed;
            }
        }
    }

    /// Waits for credit on `stream`; returns how many bytes (at most `want`) may be sent now.
    /// What is not sent must be given back ([`Mux::give_back_credit`]).
    pub fn take_credit(&self, stream: u32, want: usize) -> Result<usize> {
        let mut credits = lock(&self.credits);
        loop {
            if self.is_closed() {
                return Err(Self::closed_err());
            }
            let c = credits.entry(stream).or_insert(self.send_window());
            if *c > 0 {
                let n = (*c).min(want as u64) as usize;
                *c -= n as u64;
                return Ok(n);
            }
            credits = self
                .credit_cv
                .wait(credits)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Returns credit taken with [`Mux::take_credit`] and not spent.
    pub fn give_back_credit(&self, stream: u32, n: usize) {
        if n > 0 {
            *lock(&self.credits).entry(stream).or_insert(0) += n as u64;
            self.credit_cv.notify_all();
        }
    }

    /// Current unspent credit of an outgoing stream (for tests and diagnostics).
    pub fn credit(&self, stream: u32) -> u64 {
        lock(&self.credits)
            .get(&stream)
            .copied()
            .unwrap_or(self.send_window())
    }

    /// Sends `bytes` on `stream`, blocking while the receiver has granted no credit.
    pub fn send_data(&self, stream: u32, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let n = self.take_credit(stream, bytes.len().min(MAX_DATA))?;
            let mut w = lock(&self.writer);
            if let Err(e) = w.write_data(stream, &bytes[..n]) {
                drop(w);
                self.close();
                return Err(e);
            }
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Sends a data frame of `len` bytes (credit already taken) whose payload `payload`
    /// writes to the connection itself, with the connection locked between the header and
    /// its return: for a caller that moves the bytes without copying them through here (the
    /// agent splices a process's pipe into its channel). `payload` must write exactly `len`
    /// bytes or fail; a failure closes the connection, whose stream of frames is broken.
    pub fn send_data_with(
        &self,
        stream: u32,
        len: usize,
        payload: impl FnOnce() -> io::Result<()>,
    ) -> Result<()> {
        if self.is_closed() {
            return Err(Self::closed_err());
        }
        let mut w = lock(&self.writer);
        let r = w
            .write_data_header(stream, len)
            .and_then(|()| payload().map_err(ProtoError::from));
        drop(w);
        if r.is_err() {
            self.close();
        }
        r
    }

    /// Signals the end of `stream`.
    pub fn send_eof(&self, stream: u32) -> Result<()> {
        self.write_frame(&Frame::eof(stream))?;
        lock(&self.credits).remove(&stream);
        Ok(())
    }

    /// Copies `source` to `stream` until its end, then sends EOF. It reads only as much as the
    /// receiver's credit allows, so a slow receiver leaves the rest in `source` (for example a
    /// process's pipe). Returns what it sent and where the time went.
    pub fn pump(&self, stream: u32, mut source: impl Read) -> Result<StreamStats> {
        let mut buf = vec![0u8; MAX_DATA];
        let mut st = StreamStats::default();
        let start = Instant::now();
        loop {
            let t = Instant::now();
            let n = self.take_credit(stream, MAX_DATA)?;
            let t_credit = Instant::now();
            st.credit += t_credit - t;
            let got = loop {
                match source.read(&mut buf[..n]) {
                    Ok(k) => break k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // A pty master reports EIO once the last slave fd is closed: that is EOF.
                    Err(e) if e.raw_os_error() == Some(5) => break 0,
                    Err(e) => {
                        self.give_back_credit(stream, n);
                        let _ = self.send_eof(stream);
                        return Err(e.into());
                    }
                }
            };
            let t_read = Instant::now();
            st.waiting += t_read - t_credit;
            self.give_back_credit(stream, n - got);
            if got == 0 {
                break;
            }
            let mut w = lock(&self.writer);
            if let Err(e) = w.write_data(stream, &buf[..got]) {
                drop(w);
                self.close();
                return Err(e);
            }
            drop(w);
            st.writing += t_read.elapsed();
            st.bytes += got as u64;
            st.frames += 1;
        }
        self.send_eof(stream)?;
        st.elapsed = start.elapsed();
        Ok(st)
    }

    /// Routes incoming data of `stream` to `sink`, written by a thread of its own. Credit is
    /// granted back only after a write to the sink succeeded. Data that arrived before this
    /// call is kept (at most one window) and written first. The sink is dropped at EOF.
    ///
    /// If no thread can be started (the guest's process table is full), the stream is left
    /// without a sink: its sender stalls once the window is spent, nothing else does. Use
    /// [`Mux::try_attach_sink`] to learn about that.
    pub fn attach_sink(self: &Arc<Self>, stream: u32, sink: Box<dyn Write + Send>) -> OutputHandle {
        self.try_attach_sink(stream, sink).unwrap_or_else(|_| {
            let h = OutputHandle::new();
            h.finish();
            h
        })
    }

    /// [`Mux::attach_sink`], failing (with nothing changed) when its thread cannot be started.
    pub fn try_attach_sink(
        self: &Arc<Self>,
        stream: u32,
        sink: Box<dyn Write + Send>,
    ) -> io::Result<OutputHandle> {
        let handle = OutputHandle::new();
        let (tx, rx) = mpsc::channel();
        // The thread first: it only waits on `rx`, and if it cannot be made the stream's
        // state is still untouched.
        let mux = Arc::clone(self);
        let h = handle.clone();
        std::thread::Builder::new()
            .name(format!("sink-{stream}"))
            .spawn(move || {
                let st = mux.run_sink(stream, sink, rx);
                *lock(&h.stats) = st;
                h.finish();
            })?;
        {
            let mut incoming = lock(&self.incoming);
            let entry = incoming.entry(stream).or_insert(InStream {
                slot: Slot::Pending {
                    chunks: Vec::new(),
                    eof: false,
                },
                outstanding: 0,
            });
            let old = std::mem::replace(&mut entry.slot, Slot::Attached(tx.clone()));
            match old {
                Slot::Pending { chunks, eof } => {
                    for c in chunks {
                        let _ = tx.send(SinkMsg::Data(c));
                    }
                    if eof {
                        let _ = tx.send(SinkMsg::Eof);
                        entry.slot = Slot::Closed;
                    }
                }
                Slot::Attached(_) | Slot::Closed => {
                    // A second attach or an attach after EOF: nothing more will come.
                    entry.slot = old;
                    let _ = tx.send(SinkMsg::Eof);
                }
            }
            if self.is_closed() {
                entry.slot = Slot::Closed;
            }
        }
        drop(tx);
        Ok(handle)
    }

    fn run_sink(
        &self,
        stream: u32,
        mut sink: Box<dyn Write + Send>,
        rx: mpsc::Receiver<SinkMsg>,
    ) -> StreamStats {
        let mut broken = false;
        let mut st = StreamStats::default();
        let start = Instant::now();
        loop {
            let t = Instant::now();
            let Ok(msg) = rx.recv() else { break };
            let t_got = Instant::now();
            st.waiting += t_got - t;
            match msg {
                SinkMsg::Data(d) => {
                    if !broken && sink.write_all(&d).and_then(|_| sink.flush()).is_err() {
                        // The consumer went away: keep draining so the sender does not hang.
                        broken = true;
                    }
                    st.writing += t_got.elapsed();
                    st.bytes += d.len() as u64;
                    st.frames += 1;
                    if let Some(s) = lock(&self.incoming).get_mut(&stream) {
                        s.outstanding = s.outstanding.saturating_sub(d.len() as u64);
                    }
                    let _ = self.write_frame(&Frame::credit(stream, d.len() as u32));
                }
                SinkMsg::Eof => break,
            }
        }
        drop(sink);
        st.elapsed = start.elapsed();
        st
    }

    /// Applies one incoming frame. Control messages are returned to the caller.
    pub fn handle_frame(&self, frame: Frame) -> Result<Option<Message>> {
        match frame.kind {
            FrameType::Control => Ok(Some(frame.message()?)),
            FrameType::Credit => {
                let grant = frame.credit_grant()?;
                self.give_back_credit(frame.stream, grant as usize);
                Ok(None)
            }
            FrameType::Data => {
                let mut incoming = lock(&self.incoming);
                let s = incoming.entry(frame.stream).or_insert(InStream {
                    slot: Slot::Pending {
                        chunks: Vec::new(),
                        eof: false,
                    },
                    outstanding: 0,
                });
                s.outstanding += frame.payload.len() as u64;
                if s.outstanding > self.receive_window {
                    return Err(ProtoError::Unexpected {
                        expected: "data within the granted credit",
                        got: format!(
                            "{} bytes outstanding on stream {}",
                            s.outstanding, frame.stream
                        ),
                    });
                }
                match &mut s.slot {
                    Slot::Pending { chunks, eof: false } => chunks.push(frame.payload),
                    Slot::Attached(tx) => {
                        let _ = tx.send(SinkMsg::Data(frame.payload));
                    }
                    Slot::Pending { eof: true, .. } | Slot::Closed => {
                        return Err(ProtoError::Unexpected {
                            expected: "no data after EOF",
                            got: format!("data on closed stream {}", frame.stream),
                        });
                    }
                }
                Ok(None)
            }
            FrameType::Eof => {
                let mut incoming = lock(&self.incoming);
                let s = incoming.entry(frame.stream).or_insert(InStream {
                    slot: Slot::Pending {
                        chunks: Vec::new(),
                        eof: false,
                    },
                    outstanding: 0,
                });
                match &mut s.slot {
                    Slot::Pending { eof, .. } => *eof = true,
                    Slot::Attached(tx) => {
                        let _ = tx.send(SinkMsg::Eof);
                        s.slot = Slot::Closed;
                    }
                    Slot::Closed => {}
                }
                Ok(None)
            }
        }
    }
}
