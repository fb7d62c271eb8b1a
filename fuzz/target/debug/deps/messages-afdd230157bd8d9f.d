/work/main/fuzz/target/debug/deps/messages-afdd230157bd8d9f.d: src/bin/messages.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libmessages-afdd230157bd8d9f.rmeta: src/bin/messages.rs Cargo.toml

src/bin/messages.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
