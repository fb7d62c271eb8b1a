/work/main/fuzz/target/debug/deps/seeds-400e943f3c1a9ab3.d: src/bin/seeds.rs Cargo.toml

/work/main/fuzz/target/debug/deps/libseeds-400e943f3c1a9ab3.rmeta: src/bin/seeds.rs Cargo.toml

src/bin/seeds.rs:
Cargo.toml:

# env-dep:CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__
# env-dep:CLIPPY_CONF_DIR
