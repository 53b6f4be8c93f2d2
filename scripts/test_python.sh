#!/usr/bin/env bash
# Builds the kiln Python package (python/, PyO3 + maturin) into a scratch folder and runs its
# pytest suite (kiln vs onnxruntime on the zoo mlp and bert models, bit-identity with the
# Rust API via `kiln run`). The package goes to a scratch site folder, not into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
cargo build --release -p kiln --bin kiln
.venv/bin/maturin build --release --quiet --auditwheel skip -m python/Cargo.toml -i .venv/bin/python -o "$OUT/wheel"
.venv/bin/pip install --quiet --no-deps --target "$OUT/site" "$OUT"/wheel/*.whl
KILN_BIN="$TARGET/release/kiln" PYTHONPATH="$OUT/site" .venv/bin/python -m pytest -q python/tests "$@"
