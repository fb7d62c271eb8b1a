/work/main/fuzz/target/debug/deps/monitor-813a6bc9341a44b5.d: src/bin/monitor.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libmonitor-813a6bc9341a44b5.rmeta: src/bin/monitor.rs Cargo.toml

src/bin/monitor.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
