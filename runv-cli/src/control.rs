//! The monitor's control socket: one JSON request per connection (with file descriptors
//! attached for `exec`), answered by one or more JSON lines.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::CONTROL_SOCKET;

/// Largest request accepted (process specs are a few KiB).
const MAX_REQUEST: usize = 1 << 20;
const MAX_FDS: usize = 3;

#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Start,
    Kill {
        signal: i32,
        all: bool,
    },
    Pause,
    Resume,
    Ps,
    Stats,
    /// Ends the VM now (delete --force).
    Destroy,
    /// Runs a process; the fds sent along are its stdin, stdout, stderr (or one pty for tty).
    Exec {
        process: Value,
        tty: bool,
    },
    /// To a pod sandbox's monitor, from a member's: creates container `id` of the pod in the
    /// pod's VM, its rootfs bound into the pod's share. The fds are its stdio (as for
    /// `Exec`). Answered `{"pid":N}` once created, then `{"exit":N}` when its init ended.
    PodCreate(Box<PodContainer>),
    /// To a pod sandbox's monitor, from a member's: `request` for the pod's container `id`.
    Member {
        id: String,
        request: Box<Request>,
    },
}

/// A pod member as its monitor hands it to the sandbox's.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PodContainer {
    pub id: String,
    /// The member's spec (config.json).
    pub spec: Value,
    /// The member's rootfs on the host (the engine mounted it).
    pub rootfs: PathBuf,
    pub terminal: bool,
    pub hosts: Option<String>,
    pub resolv_conf: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// An exit-code-like status for errors (127 not found, 126 not executable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default)]
    pub data: Value,
}

impl Reply {
    pub fn ok(data: Value) -> Self {
        Reply {
            data,
            ..Reply::default()
        }
    }

    pub fn err(error: impl Into<String>, code: Option<i32>) -> Self {
        Reply {
            error: Some(error.into()),
            code,
            data: Value::Null,
        }
    }
}

/// A connection to a monitor, after the request was sent.
pub struct Call {
    reader: BufReader<UnixStream>,
}

impl Call {
    /// Reads the next reply line; `timeout` None waits for ever.
    pub fn next(&mut self, timeout: Option<Duration>) -> anyhow::Result<Reply> {
        self.reader.get_ref().set_read_timeout(timeout)?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => bail!("the container's monitor closed the connection"),
            Ok(_) => Ok(serde_json::from_str(&line).context("bad reply from the monitor")?),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                bail!("the container's monitor did not answer in time")
            }
            Err(e) => Err(e).context("reading from the monitor"),
        }
    }
}

/// Longest path a unix socket address holds (sun_path less its NUL).
const SUN_PATH_MAX: usize = 107;

/// A path to `dir/name` short enough for a unix socket address. Engines use 64-character ids
/// under long roots (docker: `/run/docker/runtime-runc/moby/<id>`), past the 107-byte limit;
/// then the path goes through an `O_PATH` fd on `dir`: `/proc/<pid>/fd/<n>/name`, usable by
/// this process and (with `/proc/<pid>`) by its children. Keep the fd while the path is used.
pub fn short_socket_path(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, Option<OwnedFd>)> {
    let path = dir.join(name);
    if path.as_os_str().len() <= SUN_PATH_MAX - 16 {
        return Ok((path, None));
    }
    let fd = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("opening {}", dir.display()))?;
    // SAFETY: open returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let short = PathBuf::from(format!(
        "/proc/{}/fd/{}/{name}",
        std::process::id(),
        fd.as_raw_fd()
    ));
    Ok((short, Some(fd)))
}

/// Sends `request` (with `fds`) to the monitor of the container in `dir`.
pub fn send(dir: &Path, request: &Request, fds: &[RawFd]) -> anyhow::Result<Call> {
    let path = dir.join(CONTROL_SOCKET);
    let (short, _dir_fd) = short_socket_path(dir, CONTROL_SOCKET)?;
    let stream = UnixStream::connect(&short).with_context(|| {
        format!(
            "connecting to the container's monitor at {}",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    let cmsgs = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .context("sending to the monitor")?;
    if sent < line.len() {
        (&stream).write_all(&line[sent..])?;
    }
    Ok(Call {
        reader: BufReader::new(stream),
    })
}

/// Sends a request and returns its single reply, failing on an error reply.
pub fn call(dir: &Path, request: &Request, timeout: Duration) -> anyhow::Result<Value> {
    let reply = send(dir, request, &[])?.next(Some(timeout))?;
    match reply.error {
        Some(e) => bail!("{e}"),
        None => Ok(reply.data),
    }
}

/// Server side: reads one request and the fds sent with it.
pub fn receive(stream: &UnixStream) -> anyhow::Result<(Request, Vec<OwnedFd>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("reading a control request")?;
        for c in msg.cmsgs().context("reading control message")? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS hands us fresh descriptors that nothing else owns.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let n = msg.bytes;
        if n == 0 {
            bail!("control connection closed before a full request");
        }
        data.extend_from_slice(&buf[..n]);
        if data.contains(&b'\n') {
            break;
        }
        if data.len() > MAX_REQUEST {
            bail!("control request larger than {MAX_REQUEST} bytes");
        }
    }
    let end = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let request = serde_json::from_slice(&data[..end]).context("malformed control request")?;
    Ok((request, fds))
}

pub fn reply(mut stream: &UnixStream, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    stream.write_all(&line)
}
