#!/usr/bin/env bash
# Runs every test: unit, integration, CLI and the golden format vectors.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --all-targets "$@"
