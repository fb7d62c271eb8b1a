/work/main/fuzz/target/debug/deps/runv_proto-26616859e1ab3618.d: /work/main/runv-proto/src/lib.rs /work/main/runv-proto/src/capabilities.rs /work/main/runv-proto/src/client.rs /work/main/runv-proto/src/frame.rs /work/main/runv-proto/src/message.rs /work/main/runv-proto/src/mux.rs /work/main/runv-proto/src/preamble.rs

/work/main/fuzz/target/debug/deps/librunv_proto-26616859e1ab3618.rmeta: /work/main/runv-proto/src/lib.rs /work/main/runv-proto/src/capabilities.rs /work/main/runv-proto/src/client.rs /work/main/runv-proto/src/frame.rs /work/main/runv-proto/src/message.rs /work/main/runv-proto/src/mux.rs /work/main/runv-proto/src/preamble.rs

/work/main/runv-proto/src/lib.rs:
/work/main/runv-proto/src/capabilities.rs:
/work/main/runv-proto/src/client.rs:
/work/main/runv-proto/src/frame.rs:
/work/main/runv-proto/src/message.rs:
/work/main/runv-proto/src/mux.rs:
/work/main/runv-proto/src/preamble.rs:

# env-dep:CARGO_PKG_VERSION=0.1.0
