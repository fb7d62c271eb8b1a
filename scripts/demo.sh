#!/usr/bin/env bash
# Sets up what is missing, builds runv, its drivers and the guest image, and boots a busybox
# container in a VM with the default driver.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --workspace --release --quiet
cargo xtask guest
./target/release/runv drivers
cargo xtask demo
