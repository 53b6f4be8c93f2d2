#!/usr/bin/env bash
# Kiln vs onnxruntime on every zoo model at 1 and 2 threads, untuned and (when a tuning
# database is given) tuned: one `kiln bench` per model and database (interleaved rounds,
# same process), p50 and min ratios as a markdown table.
#
# Usage: scripts/zoo_bench.sh [RUNS=500] [TUNING_DB]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-500}
DB=${2:-}
KILN=${KILN:-target/release/kiln}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-target/zoo_bench}
mkdir -p "$OUT"
[ -x "$KILN" ] || cargo build --release -p kiln
shapes() {
  case "$1" in
    mlp) echo "--shape input=2x32" ;;
    bert) echo "--shape input_ids=1x16 --shape attention_mask=1x16" ;;
    gpt) echo "--shape input_ids=2x16" ;;
  esac
}
echo "| model | schedules | threads | Kiln p50 ms | ORT p50 ms | Kiln/ORT p50 | Kiln/ORT min |"
echo "|---|---|---|---|---|---|---|"
for n in mlp bert gpt resnet mobilenet; do
  for tuned in untuned ${DB:+tuned}; do
    json="$OUT/$n.$tuned.json"
    extra=()
    [ "$tuned" = tuned ] && extra=(--db "$DB")
    # shellcheck disable=SC2046
    "$KILN" bench "tests/zoo/$n/model.onnx" $(shapes "$n") --threads 1,2 --runs "$RUNS" \
      "${extra[@]}" --json "$json" > "$OUT/$n.$tuned.txt"
    "$PY" - "$json" "$n" "$tuned" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for t in r["results"]:
    k, o = t["kiln"], t.get("onnxruntime")
    if not o:
        continue
    print(f"| {sys.argv[2]} | {sys.argv[3]} | {t['threads']} | {k['p50_ms']:.4f} | {o['p50_ms']:.4f} "
          f"| {k['p50_ms'] / o['p50_ms']:.2f}x | {k['min_ms'] / o['min_ms']:.2f}x |")
PY
  done
done
