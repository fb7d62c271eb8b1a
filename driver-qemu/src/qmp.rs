//! A tiny QMP client: one connection per operation (the QMP socket serves one client at a
//! time), greeting, `qmp_capabilities`, then one command; asynchronous events are skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Longest line accepted from QEMU (QMP replies here are small).
const MAX_LINE: usize = 1 << 20;

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    deadline: Instant,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, all within `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, String> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| format!("connecting to QMP at {}: {e}", socket.display()))?;
        Self::from_stream(stream, timeout)
    }

    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self, String> {
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            deadline: Instant::now() + timeout,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, String> {
        let remaining = self
            .deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or("timed out waiting for QMP")?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(remaining))
            .map_err(|e| format!("QMP socket: {e}"))?;
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    "timed out waiting for QMP".to_string()
                }
                _ => format!("reading from QMP: {e}"),
            })?;
        if n == 0 {
            return Err("QMP connection closed (qemu exited?)".into());
        }
        serde_json::from_str(line.trim()).map_err(|e| format!("invalid QMP message: {e}"))
    }

    /// Runs `command` and returns its `return` value; a QMP `error` becomes `Err(desc)`.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut request = json!({ "execute": command });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("sending QMP {command}: {e}"))?;
        self.reply(command)
    }

    /// Reads up to the reply of `command` (events are skipped).
    fn reply(&mut self, command: &str) -> Result<Value, String> {
        loop {
            let message = self.read_message()?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(format!("QMP {command}: {desc}"));
            }
            // Anything else ({"event": ...}) is not the reply: skip it.
        }
    }

    /// Hands `fd` to qemu under `name` (QMP `getfd`, the fd riding along as SCM_RIGHTS), for
    /// a later `fd:NAME` URI: qemu then needs neither the file's path nor a shell.
    pub fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd) -> Result<(), String> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::AsRawFd;
        let mut line = json!({"execute": "getfd", "arguments": {"fdname": name}}).to_string();
        line.push('\n');
        let fds = [fd.as_raw_fd()];
        let sent = sendmsg::<()>(
            self.writer.as_raw_fd(),
            &[std::io::IoSlice::new(line.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| format!("sending QMP getfd: {e}"))?;
        if sent != line.len() {
            // The fd went with the first bytes; the rest of the line follows.
            self.writer
                .write_all(&line.as_bytes()[sent..])
                .map_err(|e| format!("sending QMP getfd: {e}"))?;
        }
        self.reply("getfd").map(drop)
    }

    /// `query-status`'s `status`, e.g. `running` or `paused`.
    pub fn status(&mut self) -> Result<String, String> {
        let value = self.execute("query-status", None)?;
        value
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("unexpected query-status reply: {value}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::thread;

    /// A fake QEMU: sends the greeting, then answers each request from `script`, a list of
    /// (expected command, lines to send back).
    fn fake(
        script: Vec<(&'static str, Vec<&'static str>)>,
    ) -> (UnixStream, thread::JoinHandle<()>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let handle = thread::spawn(move || {
            let mut out = theirs.try_clone().unwrap();
            let mut input = BufReader::new(theirs);
            out.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            for (expected, replies) in script {
                let mut line = String::new();
                input.read_line(&mut line).unwrap();
                let request: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(request["execute"], expected, "{line}");
                for reply in replies {
                    out.write_all(reply.as_bytes()).unwrap();
                    out.write_all(b"\r\n").unwrap();
                }
            }
        });
        (ours, handle)
    }

    #[test]
    fn handshake_events_skipped_and_status() {
        let (stream, peer) = fake(vec![
            ("qmp_capabilities", vec![r#"{"return": {}}"#]),
            (
                "query-status",
                vec![
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
                    r#"{"return": {"status": "paused", "running": false}}"#,
                ],
            ),
            ("stop", vec![r#"{"return": {}}"#]),
        ]);
        let mut qmp = Qmp::from_stream(stream, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.status().unwrap(), "paused");
        assert_eq!(qmp.execute("stop", None).unwrap(), json!({}));
        peer.join().unwrap();
    }

    #[test]
    fn errors_are_reported() {
        let (stream, peer) = fake(vec![
            ("qmp_capabilities", vec![r#"{"return": {}}"#]),
            (
                "cont",
                vec![r#"{"error": {"class": "GenericError", "desc": "no can do"}}"#],
            ),
        ]);
        let mut qmp = Qmp::from_stream(stream, Duration::from_secs(5)).unwrap();
        let err = qmp.execute("cont", None).unwrap_err();
        assert_eq!(err, "QMP cont: no can do");
        peer.join().unwrap();
    }

    #[test]
    fn silence_times_out_and_eof_is_an_error() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let started = Instant::now();
        let err = match Qmp::from_stream(ours, Duration::from_millis(200)) {
            Err(e) => e,
            Ok(_) => panic!("connected to a silent peer"),
        };
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(theirs);

        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let err = match Qmp::from_stream(ours, Duration::from_secs(5)) {
            Err(e) => e,
            Ok(_) => panic!("connected to a closed peer"),
        };
        assert!(err.contains("closed"), "{err}");
    }
}
