#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what scripts/gpu_tune_check.sh runs on a GPU machine that has
# no compiler: the stripped runtime-only measurer (gpu_measure) and, per zoo model and
# precision, a tuning bundle for SKU (default h200) written by
# `kiln tune MODEL --target cuda:SKU --precision P --export .gpu/tune/MODEL.P` (PTX per
# candidate checked by ptxas, launches, seeded inputs, expected outputs). Invalid candidates
# are recorded in DB (default .gpu/tuning.db) here. Then: device run with carry [".gpu"] and
# command `bash scripts/gpu_tune_check.sh`; import $OUT/tune/*.jsonl with `kiln db import`.
# Usage: scripts/gpu_tune_pack.sh [SKU [CANDIDATES [DB]]]
set -euo pipefail
cd "$(dirname "$0")/.."
SKU=${1:-h200}; N=${2:-8}; DB=${3:-.gpu/tuning.db}
EXCL=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$EXCL")"
grep -qx '/.gpu/' "$EXCL" 2>/dev/null || echo '/.gpu/' >> "$EXCL"
mkdir -p .gpu/bin && rm -rf .gpu/tune && mkdir -p .gpu/tune
cargo build --release -p kiln
cargo build --release -p kiln-runtime --features cuda --example gpu_measure
cp target/release/examples/gpu_measure .gpu/bin/ && strip .gpu/bin/gpu_measure
.venv/bin/python - "$SKU" "$N" "$DB" <<'PY'
import subprocess, sys
sys.path.insert(0, 'scripts')
from zoo_shapes import ZOO, shape_args
sku, n, db = sys.argv[1:4]
for m in ZOO:
    shapes = shape_args(m)
    for p in ['f32', 'f16'] + (['tf32', 'bf16'] if m in ('bert', 'gpt') else []):
        subprocess.run(['./target/release/kiln', 'tune', f'tests/zoo/{m}/model.onnx', '--target', f'cuda:{sku}',
                        '--precision', p, '--export', f'.gpu/tune/{m}.{p}', '--candidates', n, '--db', db] + shapes,
                       check=True, stdout=subprocess.DEVNULL)
PY
du -sh .gpu/tune .gpu/bin/gpu_measure
