/work/main/fuzz/target/debug/deps/frames-deeb49e64233ec48.d: src/bin/frames.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libframes-deeb49e64233ec48.rmeta: src/bin/frames.rs Cargo.toml

src/bin/frames.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
