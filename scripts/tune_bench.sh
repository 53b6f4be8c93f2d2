#!/usr/bin/env bash
# Autotuning benchmark: for each model, Kiln untuned vs tuned (kiln tune with TRIALS
# measurements, then kiln bench --db) beside onnxruntime, 1 thread, p50 latency; plus the
# tuning time. Models: the zoo and single kernels with BERT-base MatMul / ResNet-50 Conv
# shapes (scripts/make_tune_shapes.py). Writes a markdown table to stdout.
#
# Usage: scripts/tune_bench.sh [TRIALS=64] [MODEL_DIR...]
set -euo pipefail
cd "$(dirname "$0")/.."
TRIALS=${1:-64}
shift || true
KILN=${KILN:-target/release/kiln}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-target/tune_bench}
mkdir -p "$OUT"
[ -x "$KILN" ] || cargo build --release -p kiln
if [ $# -eq 0 ]; then
  "$PY" scripts/make_tune_shapes.py "$OUT/shapes"
  set -- tests/zoo/mlp tests/zoo/resnet tests/zoo/mobilenet tests/zoo/bert tests/zoo/gpt "$OUT"/shapes/*
fi
DB="$OUT/tuning.db"
echo "| model | Kiln untuned ms | Kiln tuned ms | tuned speed-up | onnxruntime ms | tuned / ORT | tuning s (trials) |"
echo "|---|---|---|---|---|---|---|"
for d in "$@"; do
  m="$d/model.onnx"
  n=$(basename "$d")
  "$KILN" bench "$m" --threads 1 --json "$OUT/$n.untuned.json" > /dev/null
  t0=$(date +%s.%N)
  "$KILN" tune "$m" --trials "$TRIALS" --db "$DB" > "$OUT/$n.tune.txt"
  t1=$(date +%s.%N)
  "$KILN" bench "$m" --threads 1 --db "$DB" --json "$OUT/$n.tuned.json" > /dev/null
  "$PY" - "$OUT/$n.untuned.json" "$OUT/$n.tuned.json" "$n" "$t0" "$t1" "$TRIALS" <<'PYEOF'
import json, sys
u, t = (json.load(open(p))["results"][0] for p in sys.argv[1:3])
n, t0, t1, trials = sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
ku, kt = u["kiln"]["p50_ms"], t["kiln"]["p50_ms"]
# onnxruntime: the mean of its p50 in the two runs
o = (u["onnxruntime"]["p50_ms"] + t["onnxruntime"]["p50_ms"]) / 2
print(f"| {n} | {ku:.4f} | {kt:.4f} | {ku / kt:.2f}x | {o:.4f} | {kt / o:.2f}x | {t1 - t0:.0f} ({trials}) |")
PYEOF
done
