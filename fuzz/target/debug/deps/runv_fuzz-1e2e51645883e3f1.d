/work/main/fuzz/target/debug/deps/runv_fuzz-1e2e51645883e3f1.d: src/lib.rs src/../../runv-cli/src/container_id.rs src/../../runv-cli/src/state.rs src/../../runv-cli/src/monitor/config.rs src/../../runv-cli/src/templates/mode.rs Cargo.toml

/work/main/fuzz/target/debug/deps/librunv_fuzz-1e2e51645883e3f1.rmeta: src/lib.rs src/../../runv-cli/src/container_id.rs src/../../runv-cli/src/state.rs src/../../runv-cli/src/monitor/config.rs src/../../runv-cli/src/templates/mode.rs Cargo.toml

src/lib.rs:
src/../../runv-cli/src/container_id.rs:
src/../../runv-cli/src/state.rs:
src/../../runv-cli/src/monitor/config.rs:
src/../../runv-cli/src/templates/mode.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
