//! The agent's magic: where the protocol starts on a channel that may carry other bytes first.
//!
//! Some channels are not private to the agent from the moment the host opens them: a guest
//! UART can be taken by the kernel's boot console (kvmtool's `earlyprintk=serial` did exactly
//! that), and a pty or serial line may hold noise from before the agent opened it. The agent
//! therefore writes [`AGENT_MAGIC`] right before its Hello frame, and the host skips whatever
//! comes before it, up to [`MAX_NOISE`] bytes. Beyond that (or when the channel closes or the
//! handshake times out first) the host fails with an error that says the channel carried other
//! output and shows how it started, instead of a nonsensical frame length.

use std::io::{ErrorKind, Read};

use crate::{FrameType, Message, PROTOCOL_VERSION, ProtoError, Result, decode_frame};

/// What the agent writes before its first frame. NUL bytes around a fixed word, so console
/// text (which has no NULs) never contains it; no version in it: the Hello after it carries
/// the version.
pub const AGENT_MAGIC: &[u8] = b"\0runv-agent-hello\0";
/// Most bytes the host skips before [`AGENT_MAGIC`].
pub const MAX_NOISE: usize = 1 << 20;
/// How many skipped bytes are kept to show in an error.
const NOISE_HEAD: usize = 256;
/// How many of those an error message shows.
const NOISE_SAMPLE: usize = 80;

/// The bytes skipped before the magic: how many, and the first [`NOISE_HEAD`] of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Noise {
    pub bytes: usize,
    pub head: Vec<u8>,
}

impl Noise {
    fn record(&mut self, skipped: &[u8]) {
        self.bytes += skipped.len();
        let room = NOISE_HEAD.saturating_sub(self.head.len());
        self.head
            .extend_from_slice(&skipped[..room.min(skipped.len())]);
    }

    /// Why the skipped bytes are not the protocol: a Hello frame with no magic before it is an
    /// agent of protocol version 1 (older than the magic); anything else is other output.
    pub fn error(&self) -> ProtoError {
        if let Some(e) = bare_hello(&self.head) {
            return e;
        }
        let sample = &self.head[..self.head.len().min(NOISE_SAMPLE)];
        ProtoError::ConsoleOutput {
            bytes: self.bytes,
            sample: String::from_utf8_lossy(sample).into_owned(),
        }
    }
}

/// The version mismatch, if the stream starts with a whole Hello frame and no magic (an agent
/// older than the magic, which then waits for our Hello and sends nothing more).
fn bare_hello(start: &[u8]) -> Option<ProtoError> {
    let (frame, _) = decode_frame(start).ok()??;
    if frame.kind != FrameType::Control {
        return None;
    }
    match frame.message().ok()? {
        Message::Hello {
            version,
            agent_version,
            ..
        } => Some(ProtoError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version,
            peer_agent: agent_version,
        }),
        _ => None,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Reads `r` until [`AGENT_MAGIC`] and returns the bytes read after it (the start of the first
/// frame), or `None` when the stream ended before any byte came. `noise` records what was
/// skipped, as it is skipped (the caller may look at it while this blocks). More than `limit`
/// skipped bytes, or an end of stream after some, is [`Noise::error`].
pub fn read_to_magic<R: Read>(
    r: &mut R,
    limit: usize,
    noise: &std::sync::Mutex<Noise>,
) -> Result<Option<Vec<u8>>> {
    let note = |skipped: &[u8]| -> Noise {
        let mut n = noise.lock().unwrap_or_else(|e| e.into_inner());
        n.record(skipped);
        n.clone()
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(at) = find(&buf, AGENT_MAGIC) {
            note(&buf[..at]);
            return Ok(Some(buf[at + AGENT_MAGIC.len()..].to_vec()));
        }
        // The last bytes may be the start of a magic cut by the read.
        let keep = buf.len().min(AGENT_MAGIC.len() - 1);
        let skipped = note(&buf[..buf.len() - keep]);
        buf.drain(..buf.len() - keep);
        if skipped.bytes > limit {
            return Err(skipped.error());
        }
        // An old agent's bare Hello: say so now rather than after the handshake timeout.
        if skipped.bytes < NOISE_HEAD {
            let mut start = skipped.head;
            start.extend_from_slice(&buf);
            if let Some(e) = bare_hello(&start) {
                return Err(e);
            }
        }
        let n = match r.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            let skipped = note(&buf);
            return if skipped.bytes == 0 {
                Ok(None)
            } else {
                Err(skipped.error())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::Mutex;

    use super::*;
    use crate::Frame;

    /// A reader that hands out at most `step` bytes per read, to cut the magic anywhere.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(self.1).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn hello(version: u32) -> Vec<u8> {
        Frame::control(&Message::Hello {
            version,
            agent_version: "runv-agent test".into(),
            window: None,
        })
        .unwrap()
        .encode()
        .unwrap()
    }

    #[test]
    fn clean_channel_starts_at_the_magic() {
        let mut wire = AGENT_MAGIC.to_vec();
        wire.extend(hello(PROTOCOL_VERSION));
        let noise = Mutex::new(Noise::default());
        let rest = read_to_magic(&mut Cursor::new(&wire), MAX_NOISE, &noise)
            .unwrap()
            .unwrap();
        assert_eq!(rest, hello(PROTOCOL_VERSION));
        assert_eq!(*noise.lock().unwrap(), Noise::default());
    }

    #[test]
    fn console_output_before_the_magic_is_skipped_wherever_reads_cut_it() {
        let console =
            b"[    0.000000] Linux version 6.1.0\r\n[    0.000000] Command line: \0x\0runv";
        let mut wire = console.to_vec();
        wire.extend_from_slice(AGENT_MAGIC);
        wire.extend(hello(PROTOCOL_VERSION));
        wire.extend_from_slice(b"after");
        for step in [1, 2, 3, 7, 17, 4096] {
            let noise = Mutex::new(Noise::default());
            let mut r = Trickle(&wire, step);
            let mut got = read_to_magic(&mut r, MAX_NOISE, &noise).unwrap().unwrap();
            r.read_to_end(&mut got).unwrap();
            let mut want = hello(PROTOCOL_VERSION);
            want.extend_from_slice(b"after");
            assert_eq!(got, want, "step {step}");
            let noise = noise.lock().unwrap();
            assert_eq!(noise.bytes, console.len(), "step {step}");
            assert_eq!(noise.head, console, "step {step}");
        }
    }

    #[test]
    fn too_much_output_is_console_output_not_a_frame_length() {
        let wire = b"[    1.234567] serial8250: ttyS1 at I/O 0x2f8\r\n".repeat(1000);
        let noise = Mutex::new(Noise::default());
        let e = read_to_magic(&mut Cursor::new(&wire), 4096, &noise)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the agent channel carried console output: "),
            "{e}"
        );
        assert!(e.contains("serial8250: ttyS1"), "{e}");
        assert!(!e.contains("frame length"), "{e}");
        // Bounded: it stopped soon after the limit, not at the end of the stream.
        assert!(noise.lock().unwrap().bytes < 4096 + 2 * 4096);
    }

    #[test]
    fn end_of_stream() {
        let noise = Mutex::new(Noise::default());
        assert!(
            read_to_magic(&mut Cursor::new(b""), MAX_NOISE, &noise)
                .unwrap()
                .is_none()
        );
        let e = read_to_magic(&mut Cursor::new(b"Booting the kernel"), MAX_NOISE, &noise)
            .unwrap_err()
            .to_string();
        assert!(e.contains("console output") && e.contains("Booting"), "{e}");
    }

    #[test]
    fn an_old_agent_is_named_without_waiting_for_the_end_of_the_stream() {
        // The old agent sends its Hello and then waits: the reader must not need more bytes.
        struct HelloThenBlock(Vec<u8>);
        impl Read for HelloThenBlock {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                assert!(!self.0.is_empty(), "read past the old agent's hello");
                let n = self.0.len().min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0.drain(..n);
                Ok(n)
            }
        }
        let noise = Mutex::new(Noise::default());
        let e = read_to_magic(&mut HelloThenBlock(hello(1)), MAX_NOISE, &noise).unwrap_err();
        assert!(e.to_string().contains("speaks 1"), "{e}");
    }

    #[test]
    fn an_agent_without_the_magic_is_a_version_mismatch() {
        let noise = Mutex::new(Noise::default());
        let e = read_to_magic(&mut Cursor::new(hello(1)), MAX_NOISE, &noise).unwrap_err();
        match e {
            ProtoError::VersionMismatch { ours, theirs, .. } => {
                assert_eq!((ours, theirs), (PROTOCOL_VERSION, 1))
            }
            other => panic!("{other}"),
        }
    }
}
