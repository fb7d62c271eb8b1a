/work/main/fuzz/target/debug/deps/state-980856fb80da11e4.d: src/bin/state.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libstate-980856fb80da11e4.rmeta: src/bin/state.rs Cargo.toml

src/bin/state.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
