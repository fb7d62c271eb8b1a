//! The host <-> guest protocol of runv.
//!
//! One framed, versioned protocol runs over any reliable byte stream (a virtio-serial port, a
//! serial line, a vsock or unix socket). Every frame is
//!
//! ```text
//! +----------------+------+-----------+-----------------+
//! | len: u32 LE    | type | id: u32 LE| payload         |
//! +----------------+------+-----------+-----------------+
//!   len = 1 + 4 + payload.len(),  5 <= len <= MAX_FRAME
//! ```
//!
//! Frame types:
//! - [`FrameType::Control`]: the payload is one JSON [`Message`]; the id is 0.
//! - [`FrameType::Data`]: raw bytes of stream `id` (stdin towards the guest, stdout/stderr
//!   towards the host).
//! - [`FrameType::Eof`]: stream `id` is closed; empty payload.
//! - [`FrameType::Credit`]: the receiver of stream `id` grants the sender `u32 LE` more bytes.
//!
//! # Why binary data frames and JSON control messages
//!
//! Control traffic (create, start, exec, signals, exit events) is rare and benefits from being
//! self-describing: JSON with serde makes adding an optional field a compatible change and keeps
//! the wire readable in a log. Stdio is the opposite: it can be hundreds of MiB per second, so
//! it travels as raw bytes in [`FrameType::Data`] frames, with no escaping or base64 and no
//! parsing beyond a 9-byte header (the target is >= 100 MiB/s end to end).
//!
//! # Flow control
//!
//! Every stream starts with [`INITIAL_WINDOW`] bytes of credit, or the window its receiver
//! announced in its Hello (the host announces [`HOST_WINDOW`]). A sender never sends more bytes
//! than it has been granted; the receiver grants more ([`FrameType::Credit`]) only after it has
//! delivered the bytes to their final consumer (written them to the sink). A slow reader thus
//! makes the sender stop reading from its source (a process's stdout pipe fills up and the
//! process blocks, exactly as with a pipe on the host) instead of buffering without bound, and
//! nothing is lost. One stream being slow never blocks the control channel or other streams,
//! because data is queued per stream (bounded by the window) and written by a per-stream thread.
//!
//! Stream ids are chosen by the host, are unique per connection and must not be reused.
//!
//! # Versioning
//!
//! Both sides send [`Message::Hello`] first; the agent writes [`AGENT_MAGIC`] right before its
//! Hello, and the host skips anything before that magic (bounded, see [`preamble`]), so a
//! channel that carried other output first (a guest UART taken by a boot console) is still
//! usable, or fails saying so. Version 2 added the magic; an agent of version 1 is recognised
//! by its bare Hello and refused as a version mismatch. A peer whose [`PROTOCOL_VERSION`]
//! differs is refused with a clear error ([`ProtoError::VersionMismatch`]).
//!
//! # Trust
//!
//! The guest is not trusted: the decoder checks the length before allocating, rejects unknown
//! frame types and bad JSON with an error that says what was wrong, and never panics.

pub mod capabilities;
pub mod client;
pub mod frame;
pub mod message;
pub mod mux;
pub mod preamble;
pub mod timing;

pub use capabilities::LINUX_CAPABILITIES;
pub use frame::{Frame, FrameReader, FrameType, FrameWriter, decode_frame};
pub use message::*;
pub use mux::{Mux, OutputHandle};
pub use preamble::{AGENT_MAGIC, MAX_NOISE};
pub use timing::{Phases, StreamStats};

/// Version of the wire protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest allowed value of the length field (type + id + payload).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the frame header that the length field covers (type + id).
pub const HEADER_AFTER_LEN: usize = 5;
/// Largest payload of a data frame that senders produce.
pub const MAX_DATA: usize = 64 * 1024;
/// Credit every stream starts with, in bytes, unless the receiver's Hello says otherwise
/// ([`Message::Hello`]'s `window`).
pub const INITIAL_WINDOW: u64 = 256 * 1024;
/// The window the host grants on the guest's output streams: a few large frames in flight
/// (issue 16: under TCG each frame has a fixed cost in the guest).
pub const HOST_WINDOW: u64 = 2 << 20;
/// Bounds on a window a peer advertises (the guest is not trusted).
pub const MIN_WINDOW: u64 = 4 << 10;
pub const MAX_WINDOW: u64 = 16 << 20;

/// Everything that can go wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame length {0} exceeds the maximum of {MAX_FRAME} bytes")]
    TooLarge(u64),
    #[error("frame length {0} is shorter than the 5-byte frame header")]
    TooShort(u32),
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("stream closed in the middle of a frame (got {got} of {want} bytes)")]
    Truncated { got: usize, want: usize },
    #[error("bad credit frame: payload of {0} bytes, expected 4")]
    BadCredit(usize),
    #[error("bad eof frame: payload of {0} bytes, expected none")]
    BadEof(usize),
    #[error("bad control message JSON: {0}")]
    BadJson(#[from] serde_json::Error),
    #[error("protocol version mismatch: we speak {ours}, peer ({peer_agent}) speaks {theirs}")]
    VersionMismatch {
        ours: u32,
        theirs: u32,
        peer_agent: String,
    },
    /// Bytes that are not the protocol came where the agent's magic and Hello should be.
    #[error(
        "the agent channel carried console output: {bytes} bytes that are not the agent's \
         hello, starting {sample:?}"
    )]
    ConsoleOutput { bytes: usize, sample: String },
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = ProtoError> = std::result::Result<T, E>;
