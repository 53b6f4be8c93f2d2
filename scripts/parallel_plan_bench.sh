#!/usr/bin/env bash
# Parallel plan search benchmark (docs/performance.md, "Parallel plans"): BERT-base and
# GPT-2-medium sized graphs on 8×H100 and 4×H100+4×A100, found plan vs best data-parallel,
# tensor-parallel and Megatron plans (predicted samples/s) and search seconds; then the
# predicted latency of the zoo BERT/GPT on 1, 2, 4 CPU ranks (compare with mpirun runs).
# Usage: scripts/parallel_plan_bench.sh [BATCH...]   (default: 1 8 32)
set -euo pipefail
cd "$(dirname "$0")/.."
for b in "${@:-1 8 32}"; do
  for bb in $b; do
    KILN_PLAN_BATCH=$bb cargo test --release -q -p kiln --test e2e parallel_plan::bench_parallel_plans \
      -- --ignored --nocapture 2>/dev/null | grep '^|'
  done
done
cargo build --release -q -p kiln
for m in bert gpt; do
  shapes="--shape input_ids=8x64"
  [ "$m" = bert ] && shapes="$shapes --shape attention_mask=8x64"
  for n in 1 2 4; do
    echo "== zoo $m, batch 8, seq 64, cpu$n"
    # shellcheck disable=SC2086
    ./target/release/kiln plan "tests/zoo/$m/model.onnx" --cluster "examples/clusters/cpu$n.toml" \
      $shapes --latency | grep -E '^(found|data parallel|tensor parallel|megatron|single)'
  done
done
