#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) for one device call on a SKU that has no tuning records of its
# own, to measure transfer across SKUs (issue 6): per zoo model and precision two tuning
# bundles for SKU, `MODEL.P.transfer` (candidates ranked by the cost model trained on
# RECORDS, another SKU's measurements) and `MODEL.P.cold` (no records: random candidates),
# each with the default schedule as its first candidate; plus gemm_bench. Then: device run
# with carry [".gpu"] and `SECTIONS="gemm tune" bash scripts/gpu_check.sh`, and here
# `scripts/gpu_transfer_report.py OUT/tune` compares the two.
# Usage: scripts/gpu_transfer_pack.sh SKU RECORDS [CANDIDATES]
set -euo pipefail
cd "$(dirname "$0")/.."
SKU=$1; REC=$2; N=${3:-8}
EXCL=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$EXCL")"
grep -qx '/.gpu/' "$EXCL" 2>/dev/null || echo '/.gpu/' >> "$EXCL"
rm -rf .gpu && mkdir -p .gpu/bin .gpu/tune
cargo build --release -p kiln
cargo build --release -p kiln-runtime --features cuda --example gpu_measure --example gemm_bench
cp target/release/examples/gpu_measure target/release/examples/gemm_bench .gpu/bin/
strip .gpu/bin/*
TMP=$(mktemp -d)
./target/release/kiln db import "$REC" --db "$TMP/transfer.db"
.venv/bin/python - "$SKU" "$N" "$TMP" <<'PY'
import subprocess, sys
sys.path.insert(0, 'scripts')
from zoo_shapes import ZOO, shape_args
sku, n, tmp = sys.argv[1:4]
for m in ZOO:
    shapes = shape_args(m)
    for p in ['f32', 'f16']:
        for kind, db in [('transfer', f'{tmp}/transfer.db'), ('cold', f'{tmp}/cold.db')]:
            subprocess.run(['./target/release/kiln', 'tune', f'tests/zoo/{m}/model.onnx', '--target', f'cuda:{sku}',
                            '--precision', p, '--export', f'.gpu/tune/{m}.{p}.{kind}', '--candidates', n, '--db', db]
                           + shapes, check=True, stdout=subprocess.DEVNULL)
PY
echo "$SKU" > .gpu/SKU
du -sh .gpu
