//! runv's fuzz targets: each takes arbitrary bytes and must not panic, hang or allocate
//! without bound. Built by `cargo xtask fuzz` with AFL++ (stable toolchain); see build.rs.
//!
//! runv-cli is a binary crate: its state and monitor-config parsers are compiled in here from
//! their sources, with stubs for the two things they reach outside of them.
#![allow(dead_code)]

use std::io::Read;
use std::sync::Mutex;

use runv_proto::{Frame, FrameReader, FrameType, Mux, decode_frame};

#[path = "../../runv-cli/src/container_id.rs"]
mod container_id;
#[path = "../../runv-cli/src/state.rs"]
pub mod state;

mod logging {
    pub fn rfc3339_now() -> String {
        String::new()
    }
}

#[path = "../../runv-cli/src/monitor/config.rs"]
pub mod monitor_config;
#[path = "../../runv-cli/src/templates/mode.rs"]
mod template_mode;

pub mod templates {
    pub use super::template_mode::Mode;
}

pub mod monitor {
    pub use super::monitor_config as config;
    pub mod volumes {
        pub fn unmount_all_under(_: &std::path::Path) {}
    }
}

/// Defines the entry point of a target: `LLVMFuzzerTestOneInput` for AFL++'s driver, or a
/// `main` that runs the files named on the command line (to replay a crash).
#[macro_export]
macro_rules! target {
    ($name:ident) => {
        #[cfg(afl)]
        // SAFETY: the only symbol of this name in the binary: AFL++'s driver calls it.
        #[unsafe(no_mangle)]
        pub extern "C" fn LLVMFuzzerTestOneInput(data: *const u8, size: usize) -> i32 {
            let data = if data.is_null() || size == 0 {
                &[][..]
            } else {
                // SAFETY: the driver passes a buffer of `size` bytes, valid for this call.
                unsafe { std::slice::from_raw_parts(data, size) }
            };
            // A panic must be a crash AFL++ sees, not an unwind into C.
            if std::panic::catch_unwind(|| $crate::$name(data)).is_err() {
                std::process::abort();
            }
            0
        }

        #[cfg(not(afl))]
        fn main() {
            for path in std::env::args_os().skip(1) {
                let data = std::fs::read(&path).unwrap_or_else(|e| {
                    eprintln!("{}: {e}", std::path::Path::new(&path).display());
                    std::process::exit(2)
                });
                $crate::$name(&data);
            }
        }
    };
}

/// Host side of the agent channel: the frame decoders (buffer and stream) and the mux that
/// applies data, EOF and credit frames and hands control messages back. Accepted: the input is
/// whole frames the mux takes.
pub fn frames(data: &[u8]) -> bool {
    let mut rest = data;
    while let Ok(Some((frame, n))) = decode_frame(rest) {
        if frame.kind == FrameType::Control {
            let _ = frame.message();
        }
        rest = &rest[n..];
    }
    let mux = Mux::new(Box::new(std::io::sink()));
    let mut r = FrameReader::new(data);
    let mut handled = 0;
    while let Ok(Some(frame)) = r.read_frame() {
        if mux.handle_frame(frame).is_err() {
            return false;
        }
        handled += 1;
    }
    rest.is_empty() && handled > 0
}

/// Control messages, the agent's replies and events included, as a control frame carries
/// them (JSON), and their re-encoding. Accepted: a message.
pub fn messages(data: &[u8]) -> bool {
    let frame = Frame {
        kind: FrameType::Control,
        stream: 0,
        payload: data.to_vec(),
    };
    let Ok(msg) = frame.message() else {
        return false;
    };
    let _ = Frame::control(&msg).and_then(|f| f.encode());
    let _ = format!("{msg:?}");
    true
}

/// The reader that skips a boot console's noise up to the agent's magic. The first byte
/// sets how the stream is cut into reads, so magics split across reads are tried too.
/// Accepted: the magic was found.
pub fn preamble(data: &[u8]) -> bool {
    let Some((&cut, rest)) = data.split_first() else {
        return false;
    };
    let mut r = Chunked {
        data: rest,
        step: usize::from(cut % 32) + 1,
    };
    let noise = Mutex::new(Default::default());
    let Ok(Some(after)) = runv_proto::preamble::read_to_magic(&mut r, 4096, &noise) else {
        return false;
    };
    let mut reader = FrameReader::new(std::io::Cursor::new(after).chain(r));
    while let Ok(Some(_)) = reader.read_frame() {}
    true
}

struct Chunked<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// `<root>/<id>/state.json` as `runv state`, `list` and the hooks read it. Accepted: a state.
pub fn state(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(s) = serde_json::from_str::<state::ContainerState>(text) else {
        return false;
    };
    let _ = s.to_runc_json().to_string();
    let _ = s.to_list_json().to_string();
    let _ = s.to_oci_json().to_string();
    true
}

/// `<root>/<id>/monitor.json`, what the monitor reads at its start. Accepted: a config.
pub fn monitor(data: &[u8]) -> bool {
    let Ok(c) = serde_json::from_slice::<monitor::config::MonitorConfig>(data) else {
        return false;
    };
    let _ = serde_json::to_vec(&c);
    true
}

/// A fuzz target: true when the input was accepted.
pub type Target = fn(&[u8]) -> bool;

/// The target function of each target name.
pub const TARGETS: [(&str, Target); 5] = [
    ("frames", frames),
    ("messages", messages),
    ("preamble", preamble),
    ("state", state),
    ("monitor", monitor),
];

/// A starting corpus per target: valid inputs for the fuzzer to mutate. Encoding the known
/// messages cannot fail, so a failure panics here (the `seeds` program checks, besides, that
/// each target accepts each of its seeds: a seed that rots as formats change would leave the
/// fuzzer on error paths only).
pub fn seeds() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    use runv_proto::{Event, ExitStatus, Message, Request, ResponseBody};
    let msgs = vec![
        Message::Hello {
            version: runv_proto::PROTOCOL_VERSION,
            agent_version: "runv-agent 0.1.0".into(),
            window: Some(runv_proto::INITIAL_WINDOW),
        },
        Message::Request {
            id: 7,
            body: Request::Ping,
        },
        Message::Response {
            id: 7,
            result: Ok(ResponseBody::Process { pid: 12 }),
        },
        Message::Response {
            id: 8,
            result: Err(runv_proto::AgentError::new(
                1,
                "container does not exist: x",
            )),
        },
        Message::Event {
            event: Event::ProcessExited {
                container_id: "c1".into(),
                exec_id: Some("e1".into()),
                status: ExitStatus::Signaled(9),
            },
        },
    ];
    let json: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| serde_json::to_vec(m).expect("encoding a seed message"))
        .collect();
    let mut wire = Vec::new();
    for m in &msgs {
        Frame::control(m)
            .and_then(|f| f.encode_into(&mut wire))
            .expect("framing a seed message");
    }
    for f in [
        Frame::data(3, b"hello\n"),
        Frame::credit(3, 4096),
        Frame::eof(3),
    ] {
        f.encode_into(&mut wire).expect("framing a seed frame");
    }
    let mut pre = vec![7u8];
    pre.extend_from_slice(b"[    0.000000] Linux version 6.1\r\n");
    pre.extend_from_slice(runv_proto::AGENT_MAGIC);
    pre.extend_from_slice(&wire);
    let state = br#"{"ociVersion":"1.0.2","id":"c1","status":"running","pid":1,"bundle":"/b","annotations":{"a":"b"},"created":"2026-01-01T00:00:00Z","owner":"","runv":{"driver":"qemu","driver_file":"/d/q.so","storage":null,"rootfs":"/b/rootfs","monitor_start_time":5,"exit_status":null,"console_log":"/r/c1/console.log","vm_pids":[2],"vm_start_times":[6]}}"#;
    let monitor = serde_json::to_vec(&monitor::config::MonitorConfig::default())
        .expect("encoding the default monitor config");
    vec![
        ("frames", vec![wire.clone()]),
        ("messages", json),
        ("preamble", vec![pre]),
        ("state", vec![state.to_vec()]),
        ("monitor", vec![monitor]),
    ]
}
