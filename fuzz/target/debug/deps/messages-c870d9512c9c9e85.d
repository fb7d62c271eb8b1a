/work/main/fuzz/target/debug/deps/messages-c870d9512c9c9e85.d: src/bin/messages.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libmessages-c870d9512c9c9e85.rmeta: src/bin/messages.rs Cargo.toml

src/bin/messages.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
