/work/main/fuzz/target/debug/deps/runv_fuzz-66cb8cc5abbf4733.d: src/lib.rs src/../../runv-cli/src/container_id.rs src/../../runv-cli/src/state.rs src/../../runv-cli/src/monitor/config.rs src/../../runv-cli/src/templates/mode.rs Cargo.toml

/work/main/fuzz/target/debug/deps/librunv_fuzz-66cb8cc5abbf4733.rmeta: src/lib.rs src/../../runv-cli/src/container_id.rs src/../../runv-cli/src/state.rs src/../../runv-cli/src/monitor/config.rs src/../../runv-cli/src/templates/mode.rs Cargo.toml

src/lib.rs:
src/../../runv-cli/src/container_id.rs:
src/../../runv-cli/src/state.rs:
src/../../runv-cli/src/monitor/config.rs:
src/../../runv-cli/src/templates/mode.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
