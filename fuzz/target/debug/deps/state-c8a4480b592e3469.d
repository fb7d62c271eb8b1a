/work/main/fuzz/target/debug/deps/state-c8a4480b592e3469.d: src/bin/state.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libstate-c8a4480b592e3469.rmeta: src/bin/state.rs Cargo.toml

src/bin/state.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
