/work/main/fuzz/target/debug/deps/preamble-f34bea3977527d5e.d: src/bin/preamble.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libpreamble-f34bea3977527d5e.rmeta: src/bin/preamble.rs Cargo.toml

src/bin/preamble.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
