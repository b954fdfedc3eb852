#!/usr/bin/env bash
# The test command (README): runs every test tier this machine can run.
# Tier 0 needs nothing; later tiers need NVRTC or a GPU and say so when they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace "$@"
