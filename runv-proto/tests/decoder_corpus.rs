//! Feeds the decoder hand-made bad inputs from `tests/corpus/` (`<name>.hex` files, hex bytes
//! with whitespace) and checks the error names what was wrong.

use runv_proto::*;

fn load(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/corpus/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hex: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn read_err(bytes: &[u8]) -> String {
    let mut r = FrameReader::new(bytes);
    loop {
        match r.read_frame() {
            Ok(Some(f)) => {
                if f.kind == FrameType::Control {
                    if let Err(e) = f.message() {
                        return e.to_string();
                    }
                }
            }
            Ok(None) => return "clean eof".into(),
            Err(e) => return e.to_string(),
        }
    }
}

#[test]
fn corpus_errors_are_named() {
    let cases = [
        ("oversized", "exceeds the maximum"),
        ("huge_len", "exceeds the maximum"),
        ("zero_len", "shorter than the 5-byte frame header"),
        ("short_len", "shorter than the 5-byte frame header"),
        ("unknown_type", "unknown frame type 0x09"),
        ("truncated_payload", "in the middle of a frame"),
        ("truncated_len", "in the middle of a frame"),
        ("bad_json", "bad control message JSON"),
        ("unknown_message", "bad control message JSON"),
        ("bad_credit", "bad credit frame"),
        ("eof_with_payload", "bad eof frame"),
        ("valid_then_garbage", "unknown frame type"),
    ];
    for (name, want) in cases {
        let bytes = load(name);
        let got = read_err(&bytes);
        assert!(got.contains(want), "{name}: got {got:?}, want {want:?}");
        // The slice decoder agrees (or asks for more bytes), and never panics.
        let mut rest = &bytes[..];
        while let Ok(Some((_, n))) = decode_frame(rest) {
            rest = &rest[n..];
        }
    }
}

#[test]
fn oversized_length_rejected_before_reading_payload() {
    // Claims 4 GiB but carries nothing: must fail on the header, not try to allocate.
    let bytes = [0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0];
    let e = decode_frame(&bytes).unwrap_err().to_string();
    assert!(e.contains("4294967295"), "{e}");
}

#[test]
fn valid_corpus_frame_decodes() {
    let bytes = load("valid_hello");
    let (f, n) = decode_frame(&bytes).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    assert_eq!(
        f.message().unwrap(),
        Message::Hello {
            version: 1,
            agent_version: "a".into(),
            window: None,
        }
    );
}
