/work/main/fuzz/target/debug/deps/monitor-ea8c792ec0b50b82.d: src/bin/monitor.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libmonitor-ea8c792ec0b50b82.rmeta: src/bin/monitor.rs Cargo.toml

src/bin/monitor.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
