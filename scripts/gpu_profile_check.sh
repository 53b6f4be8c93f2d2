#!/usr/bin/env bash
# Where a GPU model spends its time, and the GEMM against cuBLAS at model shapes, on a lent
# GPU machine (run from the repository root there; .gpu/ carried along). Expects in .gpu/
# (packed into .gpu/pack.tar.xz or not): bin/gpu_zoo and bin/gemm_bench (runtime-only),
# eq/ (`eqsat_speedup --gpu SKU DIR MODEL...` output) and/or zoo/ (MODEL.P.kiln + MODEL/
# test data). For each artifact: checked, timed, then the device time per kernel entry
# (`KILN_PROFILE`, CUDA events around each launch); then `gemm_bench` at GEMM_SHAPES
# ("M N K" triples, default BERT-base's projections at sequence 128 and 2048³).
set -uo pipefail
OUT=${OUT:-/tmp/kiln_gpu_out}; mkdir -p "$OUT"
source "$(dirname "$0")/gpu_env.sh"
for d in .gpu/eq .gpu/zoo; do
  [ -d "$d" ] || continue
  for f in "$d"/*.kiln; do
    KILN_PROFILE=${PROFILE_RUNS:-20} timeout 120 .gpu/bin/gpu_zoo "$d" 20 "$(basename "$f")" \
      2>&1 | tee -a "$OUT/profile.txt"
  done
done
GEMM_SHAPES=${GEMM_SHAPES:-"128 768 768;128 3072 768;128 768 3072;2048 2048 2048"}
IFS=';' read -ra shapes <<< "$GEMM_SHAPES"
for s in "${shapes[@]}"; do
  # shellcheck disable=SC2086
  timeout 120 .gpu/bin/gemm_bench $s 10 2>&1 | tee -a "$OUT/gemm_shapes.txt"
done
