#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup, lint, build, guest image, tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== build"
cargo build --workspace --quiet
cargo xtask guest

echo "== tests"
cargo test --workspace --no-fail-fast
