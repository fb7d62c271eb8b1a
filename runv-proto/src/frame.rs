//! Frame encoding and decoding.

use std::io::{self, Read, Write};

use crate::{HEADER_AFTER_LEN, MAX_FRAME, Message, ProtoError, Result};

/// The kind of a frame (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    Control = 1,
    Data = 2,
    Eof = 3,
    Credit = 4,
}

impl FrameType {
    pub fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => Self::Control,
            2 => Self::Data,
            3 => Self::Eof,
            4 => Self::Credit,
            other => return Err(ProtoError::UnknownType(other)),
        })
    }
}

/// One frame as it travels on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A control frame carrying `msg` as JSON.
    pub fn control(msg: &Message) -> Result<Self> {
        Ok(Self {
            kind: FrameType::Control,
            stream: 0,
            payload: serde_json::to_vec(msg)?,
        })
    }

    pub fn data(stream: u32, bytes: &[u8]) -> Self {
        Self {
            kind: FrameType::Data,
            stream,
            payload: bytes.to_vec(),
        }
    }

    pub fn eof(stream: u32) -> Self {
        Self {
            kind: FrameType::Eof,
            stream,
            payload: Vec::new(),
        }
    }

    pub fn credit(stream: u32, grant: u32) -> Self {
        Self {
            kind: FrameType::Credit,
            stream,
            payload: grant.to_le_bytes().to_vec(),
        }
    }

    /// Parses the payload of a control frame.
    pub fn message(&self) -> Result<Message> {
        Ok(serde_json::from_slice(&self.payload)?)
    }

    /// The grant of a credit frame.
    pub fn credit_grant(&self) -> Result<u32> {
        let b: [u8; 4] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| ProtoError::BadCredit(self.payload.len()))?;
        Ok(u32::from_le_bytes(b))
    }

    /// Checks the per-type payload rules.
    fn validate(&self) -> Result<()> {
        match self.kind {
            FrameType::Credit if self.payload.len() != 4 => {
                Err(ProtoError::BadCredit(self.payload.len()))
            }
            FrameType::Eof if !self.payload.is_empty() => {
                Err(ProtoError::BadEof(self.payload.len()))
            }
            _ => Ok(()),
        }
    }

    /// Appends the wire form of this frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let len = HEADER_AFTER_LEN + self.payload.len();
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge(len as u64));
        }
        out.reserve(4 + len);
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.encode_into(&mut v)?;
        Ok(v)
    }
}

/// Checks a length field; returns the number of bytes that follow it.
fn check_len(len: u32) -> Result<usize> {
    if (len as usize) < HEADER_AFTER_LEN {
        return Err(ProtoError::TooShort(len));
    }
    if len as usize > MAX_FRAME {
        return Err(ProtoError::TooLarge(len as u64));
    }
    Ok(len as usize)
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (and that part is valid so far),
/// `Ok(Some((frame, consumed)))` otherwise. Invalid input is an error, never a panic.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = check_len(u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")))?;
    if let Some(&t) = buf.get(4) {
        FrameType::from_u8(t)?;
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    let frame = Frame {
        kind: FrameType::from_u8(body[0])?,
        stream: u32::from_le_bytes(body[1..5].try_into().expect("4 bytes")),
        payload: body[5..].to_vec(),
    };
    frame.validate()?;
    Ok(Some((frame, 4 + len)))
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// Reads the next frame. `Ok(None)` is a clean end of stream between frames.
    pub fn read_frame(&mut self) -> Result<Option<Frame>> {
        let mut len_buf = [0u8; 4];
        let got = read_full(&mut self.inner, &mut len_buf)?;
        if got == 0 {
            return Ok(None);
        }
        if got < 4 {
            return Err(ProtoError::Truncated { got, want: 4 });
        }
        let len = check_len(u32::from_le_bytes(len_buf))?;
        let mut hdr = [0u8; HEADER_AFTER_LEN];
        let got = read_full(&mut self.inner, &mut hdr)?;
        if got < hdr.len() {
            return Err(ProtoError::Truncated { got, want: len });
        }
        let kind = FrameType::from_u8(hdr[0])?;
        let stream = u32::from_le_bytes(hdr[1..5].try_into().expect("4 bytes"));
        // `len` is bounded by MAX_FRAME above, so this allocation is bounded too.
        let mut payload = vec![0u8; len - HEADER_AFTER_LEN];
        let got = read_full(&mut self.inner, &mut payload)?;
        if got < payload.len() {
            return Err(ProtoError::Truncated {
                got: got + HEADER_AFTER_LEN,
                want: len,
            });
        }
        let frame = Frame {
            kind,
            stream,
            payload,
        };
        frame.validate()?;
        Ok(Some(frame))
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// Reads until `buf` is full or end of stream; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes frames to a byte stream, one `write_all` per frame.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    pub fn write_frame(&mut self, frame: &Frame) -> Result<()> {
        self.write_frame_after(&[], frame)
    }

    /// Writes `prefix` and then `frame` in one write (the agent's magic and its Hello).
    pub fn write_frame_after(&mut self, prefix: &[u8], frame: &Frame) -> Result<()> {
        self.buf.clear();
        self.buf.extend_from_slice(prefix);
        frame.encode_into(&mut self.buf)?;
        self.inner.write_all(&self.buf)?;
        self.inner.flush()?;
        Ok(())
    }

    /// Writes a data frame without copying the payload into a `Frame` first.
    pub fn write_data(&mut self, stream: u32, bytes: &[u8]) -> Result<()> {
        let len = HEADER_AFTER_LEN + bytes.len();
        if len > MAX_FRAME {
            return Err(ProtoError::TooLarge(len as u64));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        self.buf.push(FrameType::Data as u8);
        self.buf.extend_from_slice(&stream.to_le_bytes());
        self.buf.extend_from_slice(bytes);
        self.inner.write_all(&self.buf)?;
        self.inner.flush()?;
        Ok(())
    }

    /// Writes the header of a data frame of `len` bytes; the caller writes the payload to the
    /// same stream next (see `Mux::send_data_with`).
    pub fn write_data_header(&mut self, stream: u32, len: usize) -> Result<()> {
        let total = HEADER_AFTER_LEN + len;
        if total > MAX_FRAME {
            return Err(ProtoError::TooLarge(total as u64));
        }
        let mut hdr = [0u8; 4 + HEADER_AFTER_LEN];
        hdr[..4].copy_from_slice(&(total as u32).to_le_bytes());
        hdr[4] = FrameType::Data as u8;
        hdr[5..].copy_from_slice(&stream.to_le_bytes());
        self.inner.write_all(&hdr)?;
        self.inner.flush()?;
        Ok(())
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}
