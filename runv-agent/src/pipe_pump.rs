//! A process's output pipe to the host without copying it through the agent (issue 16:
//! stdout throughput).
//!
//! `Mux::pump` reads the pipe into a buffer and writes frames from it: every byte is copied
//! out of the pipe, into the frame and into the virtio-serial driver's buffer (which takes at
//! most 32 KiB per write), and under TCG every copy of every byte is emulated. Here the agent
//! writes only each frame's 9-byte header and splice(2) moves the payload: first from the
//! process's pipe into a pipe of the pump's own (which gives the frame its length: what that
//! splice moved), then from there into the channel, where the virtio-console driver queues
//! the pages as they are.
//!
//! Why the pipe of our own: Linux 6.1's virtio-console splice sizes its scatterlist by the
//! buffers the pipe holds and hands all of them to the virtqueue, also the ones it did not
//! fill when it was asked for less than the pipe holds; QEMU then refuses the zero-sized
//! buffers and marks the device broken (the agent channel is dead). Our pipe holds exactly one
//! frame's bytes, and each splice into the channel asks for all of them.
//!
//! Where the channel cannot splice (EINVAL) the payload is read and written instead, and
//! splice is not tried again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use runv_proto::{Mux, ProtoError, StreamStats};

/// Most bytes per frame. Each frame has a fixed cost under TCG (a header, two virtqueue
/// buffers, a credit frame back and the wake-ups of both), so frames are as large as the
/// host's window allows with at least two in flight: 512 KiB with the host's 2 MiB
/// (`runv_proto::HOST_WINDOW`), 128 KiB with the protocol's default 256 KiB.
const MAX_CHUNK: usize = 512 * 1024;

/// Capacity of a process's stdout and stderr pipes: a writer fills two of the largest
/// frames before the agent has to wake up (the default is 64 KiB).
const PIPE_SIZE: usize = 2 * MAX_CHUNK;

/// The frame size for the host's window: half of it, at most [`MAX_CHUNK`].
fn chunk(window: u64) -> usize {
    ((window / 2) as usize).clamp(4096, MAX_CHUNK)
}

/// Set once a splice into the channel failed with EINVAL: copy from then on.
static NO_SPLICE: AtomicBool = AtomicBool::new(false);

/// Gives `pipe` room for `size` bytes; it keeps its default where that is refused.
fn resize(pipe: &File, size: usize) {
    let _ = fcntl(pipe.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size as i32));
}

/// Makes a process's output pipe larger (see [`PIPE_SIZE`]).
pub fn enlarge(pipe: &File) {
    resize(pipe, PIPE_SIZE);
}

/// Sends everything `pipe` carries as `stream`, then EOF; like `Mux::pump`, it takes from
/// the pipe only as much as the host's credit allows.
pub fn pump(mux: &Mux, stream: u32, pipe: File, channel: &File) -> Result<StreamStats, ProtoError> {
    let (frame_r, frame_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let (frame_r, frame_w) = (File::from(frame_r), File::from(frame_w));
    let chunk = chunk(mux.send_window());
    resize(&frame_w, chunk);
    let mut st = StreamStats::default();
    let start = Instant::now();
    loop {
        let t = Instant::now();
        let credit = mux.take_credit(stream, chunk)?;
        let t_credit = Instant::now();
        st.credit += t_credit - t;
        // Waits for the process's output; 0 is its end.
        let moved = loop {
            match splice(
                pipe.as_fd(),
                None,
                frame_w.as_fd(),
                None,
                credit,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Err(Errno::EINTR) => {}
                r => break r,
            }
        };
        let n = match moved {
            Ok(n) => n,
            Err(e) => {
                mux.give_back_credit(stream, credit);
                let _ = mux.send_eof(stream);
                return Err(io::Error::from(e).into());
            }
        };
        let t_read = Instant::now();
        st.waiting += t_read - t_credit;
        mux.give_back_credit(stream, credit - n);
        if n == 0 {
            break;
        }
        mux.send_data_with(stream, n, || move_all(&frame_r, channel, n))?;
        st.writing += t_read.elapsed();
        st.bytes += n as u64;
        st.frames += 1;
    }
    mux.send_eof(stream)?;
    st.elapsed = start.elapsed();
    Ok(st)
}

/// Moves the `n` bytes `pipe` holds (all it holds) into `channel`.
fn move_all(pipe: &File, channel: &File, mut n: usize) -> io::Result<()> {
    while n > 0 && !NO_SPLICE.load(Ordering::Relaxed) {
        match splice(
            pipe.as_fd(),
            None,
            channel.as_fd(),
            None,
            n,
            SpliceFFlags::SPLICE_F_MOVE,
        ) {
            Ok(0) => return Err(io::Error::other("a frame's pipe ran dry")),
            Ok(k) => n -= k,
            Err(Errno::EINTR) => {}
            // Nothing moved: this channel cannot splice.
            Err(Errno::EINVAL) => NO_SPLICE.store(true, Ordering::Relaxed),
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; n.min(64 * 1024)];
    while n > 0 {
        let want = n.min(buf.len());
        let k = (&*pipe).read(&mut buf[..want])?;
        if k == 0 {
            return Err(io::Error::other("a frame's pipe ran dry"));
        }
        (&*channel).write_all(&buf[..k])?;
        n -= k;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_half_the_window_within_bounds() {
        assert_eq!(chunk(runv_proto::HOST_WINDOW), MAX_CHUNK);
        assert_eq!(chunk(runv_proto::INITIAL_WINDOW), 128 * 1024);
        assert_eq!(chunk(runv_proto::MIN_WINDOW), 4096);
        assert_eq!(chunk(runv_proto::MAX_WINDOW), MAX_CHUNK);
    }
}
