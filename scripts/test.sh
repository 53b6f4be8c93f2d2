#!/usr/bin/env bash
# Runs Kiln's whole test suite (release mode): unit, conformance, zoo and end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release --workspace
scripts/test_python.sh
