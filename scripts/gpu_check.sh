#!/usr/bin/env bash
# Every GPU check of a session that is lent a GPU machine (no LLVM, no Rust, no network
# there), in ONE device call: run on that machine from the repository root, after
# `scripts/gpu_pack.sh SKU` here filled `.gpu/` (runtime-only binaries, artifacts compiled
# here, test data), carried along (`carry: [".gpu"]`).
#
# A session has 15 minutes of device time, the machine's start included, so the checks run
# against a deadline (DEADLINE seconds from the start, default 480) in the order of what is
# most needed (the open issue first), and a section that would not fit is skipped, saying so:
#   1. eqsat     tensat's graphs at -O0 and -O2, measured speed-up (issue 4, open), then
#                the per-launch device time of NasRNN's and BERT's artifacts (KILN_PROFILE:
#                time per launch over its K steps calibrates the cost model's k_step_us)
#   2. gemm      f16 GEMM 4096³ against cuBLAS, every wgmma/mma.sync variant (issue 5 bar)
#   3. tests     runtime CUDA tests, one process each (wgmma bn = 64 fix, CUDA ops)
#   4. zoo       zoo artifacts checked and timed (gpu_zoo), then PyTorch eager (issue 5 bar)
#   5. tune      tuning bundles measured, records to $OUT/tune/*.jsonl (issue 6)
#   6. cluster   zoo sharded over 2 GPU ranks, NCCL test (issue 7)
# SECTIONS="gemm zoo" runs only those. Every table lands in $OUT as soon as it is printed.
set -uo pipefail
OUT=${OUT:-/tmp/kiln_gpu_out}; mkdir -p "$OUT"
START=$(date +%s); DEADLINE=${DEADLINE:-480}
SECTIONS=${SECTIONS:-eqsat gemm tests zoo tune cluster}
# seconds left before the deadline
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# cap SECS: SECS, or what is left minus a margin, whichever is smaller (at least 1)
cap() { local l=$(( $(left) - 10 )); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }
# section NAME NEED: whether NAME is asked for and at least NEED seconds are left
section() {
  case " $SECTIONS " in *" $1 "*) ;; *) return 1 ;; esac
  if [ "$(left)" -lt "$2" ]; then
    echo "== $1: skipped, $(left) s left (needs $2)" | tee -a "$OUT/skipped.txt"; return 1
  fi
  echo "== $1 (at $(( $(date +%s) - START )) s)"
}
source "$(dirname "$0")/gpu_env.sh"

# one process per test of each binary (a faulting kernel poisons its process's context)
run_tests() {
  for b in "$@"; do
    for t in $(.gpu/bin/$b --list 2>/dev/null | grep ': test$' | sed 's/: test$//'); do
      if [ "$(left)" -lt 15 ]; then echo "$b $t: skipped (deadline)"; continue; fi
      timeout "$(cap 60)" .gpu/bin/$b --exact "$t" --nocapture > "/tmp/t_$t.log" 2>&1; rc=$?
      echo "$b $t: $([ $rc = 0 ] && echo ok || echo "FAILED ($rc)")"
      [ $rc = 0 ] || { grep -E "panicked|Error|error" "/tmp/t_$t.log" | head -3; tail -n 2 "/tmp/t_$t.log"; }
    done
  done
}

if [ -f .gpu/eqsat.tar.xz ] && section eqsat 60; then
  EQSAT_TIMEOUT=$(cap 120) PROFILE_GRAPHS=${PROFILE_GRAPHS:-"nasrnn bert"} \
    bash scripts/gpu_eqsat_check.sh 50
fi
if section gemm 60; then
  timeout "$(cap 150)" .gpu/bin/gemm_bench 2>&1 | tee "$OUT/gemm.txt"
fi
if section tests 40; then
  run_tests cuda_test cuda_ops_test 2>&1 | tee "$OUT/tests.txt"
fi
if section zoo 60; then
  { echo "| artifact | launches | load ms (JIT / cached) | max rel. error | p50 ms | min ms |"; echo "|---|---|---|---|---|---|"
    for f in .gpu/zoo/*.kiln; do
      [ "$(left)" -lt 15 ] && { echo "| $(basename "$f") | skipped (deadline) |"; continue; }
      timeout "$(cap 60)" .gpu/bin/gpu_zoo .gpu/zoo 200 "$(basename "$f")" 2>&1 || echo "| $(basename "$f") | exit $? |"
    done; } | tee "$OUT/zoo.txt"
  [ "$(left)" -gt 40 ] && PYTHONUNBUFFERED=1 timeout "$(cap 200)" python3 scripts/torch_eager.py .gpu/zoo 200 2>&1 | tee "$OUT/torch.txt"
  # Kiln's p50 per model and precision over PyTorch eager's (f32): issue 5's bar is < 1
  python3 - "$OUT/zoo.txt" "$OUT/torch.txt" <<'PY' 2>&1 | tee "$OUT/zoo_vs_torch.txt"
import sys
def rows(path):
    for line in open(path):
        c = [x.strip() for x in line.strip().strip('|').split('|')]
        if len(c) >= 4:
            yield c
torch = {}
for c in rows(sys.argv[2]):
    try: torch[c[0]] = float(c[2])
    except ValueError: pass
print('| artifact | Kiln p50 ms | torch eager p50 ms | Kiln / torch |')
print('|---|---|---|---|')
for c in rows(sys.argv[1]):
    model = c[0].split('.')[0]
    try: k = float(c[4])
    except (ValueError, IndexError): continue
    t = torch.get(model)
    print(f'| {c[0]} | {k:.4f} | {t if t is not None else "-"} | ' + (f'{k / t:.2f}x |' if t else '- |'))
PY
fi
if [ -d .gpu/tune ] && section tune 60; then
  # the bundles share what is left of the tune section's share of the time
  n=$(ls -d .gpu/tune/*/ | wc -l); share=$(( ($(left) - 150) / (n > 0 ? n : 1) ))
  [ "$share" -lt 10 ] && share=10
  RUNS=${RUNS:-10} BUNDLE_TIMEOUT=$share bash scripts/gpu_tune_check.sh
fi
if section cluster 40; then
  timeout "$(cap 150)" .gpu/bin/gpu_cluster .gpu/cluster 20 2>&1 | tee "$OUT/cluster.txt"
  run_tests nccl_test 2>&1 | tee -a "$OUT/tests.txt"
fi
# a device call brings back only so many files: the tuning results travel as one archive
# (here: tar xzf OUT/tune.tgz; then kiln db import tune/*.jsonl)
if [ -d "$OUT/tune" ]; then
  tar czf "$OUT/tune.tgz" -C "$OUT" tune && rm -rf "$OUT/tune"
fi
echo "== done at $(( $(date +%s) - START )) s of $DEADLINE"
