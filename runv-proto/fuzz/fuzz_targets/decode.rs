#![no_main]
//! Feeds arbitrary bytes to both decoders and the mux: nothing may panic.

use libfuzzer_sys::fuzz_target;
use runv_proto::{FrameReader, Mux, decode_frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, n))) = decode_frame(rest) {
        let _ = frame.message();
        rest = &rest[n..];
    }
    let mux = Mux::new(Box::new(std::io::sink()));
    let mut r = FrameReader::new(data);
    while let Ok(Some(frame)) = r.read_frame() {
        if mux.handle_frame(frame).is_err() {
            break;
        }
    }
});
