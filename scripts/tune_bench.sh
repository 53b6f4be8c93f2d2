#!/usr/bin/env bash
# Autotuning benchmark: for each model, `kiln tune` (TRIALS measurements, into one database),
# then Kiln untuned vs tuned, 1 thread: both artifacts timed alternately (`kiln run --repeat`,
# A B A B A B, best per-run time of each — this VM's speed drifts by tens of percent within
# minutes, so only interleaved timings are compared), and onnxruntime's p50 from `kiln bench`
# (same shapes) for the tuned/ORT column. Models: the zoo and single kernels with BERT-base
# MatMul / ResNet-50 Conv shapes (scripts/make_tune_shapes.py). Prints a markdown table.
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
shapes() { # the zoo's test-data shapes (what kiln bench uses)
  case "$(basename "$1")" in
    mlp) echo "--shape input=2x32" ;;
    bert) echo "--shape input_ids=1x16 --shape attention_mask=1x16" ;;
    gpt) echo "--shape input_ids=2x16" ;;
  esac
}
per_run() { # artifact repeat -> seconds per run
  local t0 t1
  t0=$(date +%s.%N); "$KILN" run "$1" --threads 1 --repeat "$2" > /dev/null; t1=$(date +%s.%N)
  "$PY" -c "print(($t1 - $t0) / $2)"
}
echo "| model | tuned kernels | Kiln untuned ms | Kiln tuned ms | tuned speed-up | onnxruntime p50 ms | tuned / ORT | tuning s (trials) |"
echo "|---|---|---|---|---|---|---|---|"
for d in "$@"; do
  m="$d/model.onnx"
  n=$(basename "$d")
  # shellcheck disable=SC2046
  t0=$(date +%s.%N)
  "$KILN" tune "$m" $(shapes "$d") --trials "$TRIALS" --db "$DB" > "$OUT/$n.tune.txt"
  t1=$(date +%s.%N)
  # shellcheck disable=SC2046
  "$KILN" compile "$m" $(shapes "$d") -o "$OUT/$n.0.kiln" > /dev/null
  # shellcheck disable=SC2046
  tuned=$("$KILN" compile "$m" $(shapes "$d") --db "$DB" -o "$OUT/$n.1.kiln" | sed -n 's/tuned schedules: \(.*\) tunable kernels/\1/p')
  # shellcheck disable=SC2046
  "$KILN" bench "$m" $(shapes "$d") --threads 1 --runs 300 --json "$OUT/$n.bench.json" > /dev/null
  p50=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0]['kiln']['p50_ms'])" "$OUT/$n.bench.json")
  reps=$("$PY" -c "print(max(200, int(1000 / $p50)))")
  best0=1e9; best1=1e9
  for _ in 1 2 3; do
    a=$(per_run "$OUT/$n.0.kiln" "$reps"); b=$(per_run "$OUT/$n.1.kiln" "$reps")
    best0=$("$PY" -c "print(min($best0, $a))"); best1=$("$PY" -c "print(min($best1, $b))")
  done
  "$PY" - "$OUT/$n.bench.json" "$n" "$t0" "$t1" "$TRIALS" "$best0" "$best1" "${tuned:-0 of 0}" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"][0]
n, t0, t1, trials = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
u, t, tuned = float(sys.argv[6]) * 1e3, float(sys.argv[7]) * 1e3, sys.argv[8]
o = r["onnxruntime"]["p50_ms"]
k = r["kiln"]["p50_ms"]  # untuned, same run as o
print(f"| {n} | {tuned} | {u:.4f} | {t:.4f} | {u / t:.2f}x | {o:.4f} | {k * t / u / o:.2f}x | {t1 - t0:.0f} ({trials}) |")
PYEOF
done
