/work/main/fuzz/target/debug/deps/preamble-7533b0bacdd94e40.d: src/bin/preamble.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libpreamble-7533b0bacdd94e40.rmeta: src/bin/preamble.rs Cargo.toml

src/bin/preamble.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
