#!/usr/bin/env bash
# Sets up what is missing, builds runv and its drivers, and shows the drivers found.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --workspace --release --quiet
./target/release/runv drivers
