/work/main/fuzz/target/debug/deps/seeds-4885e2e0c7be509e.d: src/bin/seeds.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libseeds-4885e2e0c7be509e.rmeta: src/bin/seeds.rs Cargo.toml

src/bin/seeds.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
