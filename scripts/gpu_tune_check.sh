#!/usr/bin/env bash
# GPU tuning on a lent GPU machine (no LLVM, no Rust, no network): run from the repository
# root there, after `scripts/gpu_tune_pack.sh` here filled `.gpu/` (the runtime-only
# measurer `gpu_measure` and one bundle per model/precision written by
# `kiln tune --target cuda:SKU --export`), carried along. Measures every bundle (each task in
# a child process of its own: faults and hangs are recorded, measuring goes on) and writes the
# results as JSON lines in `kiln db export` format to $OUT/tune/*.jsonl; here:
#   for f in OUT/tune/*.jsonl; do kiln db import "$f" --db tuning.db; done
#   kiln compile MODEL --target cuda:SKU --precision P --db tuning.db
set -uo pipefail
OUT=${OUT:-/tmp/kiln_gpu_out}; mkdir -p "$OUT/tune"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
RUNS=${RUNS:-20}
# f16 bundles first (the tensor-core kernels matter most), then the others
for b in $(ls -d .gpu/tune/*.f16/ 2>/dev/null; ls -d .gpu/tune/*/ | grep -v '\.f16/$'); do
  name=$(basename "$b")
  echo "== $name"
  timeout "${BUNDLE_TIMEOUT:-240}" .gpu/bin/gpu_measure "$b" -o "$OUT/tune/$name.jsonl" --runs "$RUNS" 2>&1 \
    | tee "$OUT/tune/$name.txt"
  echo "exit ${PIPESTATUS[0]}"
done
