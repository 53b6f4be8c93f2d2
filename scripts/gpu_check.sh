#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU machine (which has no LLVM, no Rust and no
# network): run on that machine from the repository root, after `scripts/gpu_pack.sh` here
# filled `.gpu/` (runtime-only binaries, artifacts compiled here, test data), carried along.
# Prints the CUDA runtime and NCCL tests (NCCL on every GPU present: one rank per GPU), the zoo artifacts checked and timed (gpu_zoo), the zoo
# sharded over 2 GPU ranks checked and timed (gpu_cluster), the f16 GEMM
# against cuBLAS (gemm_bench) and the PyTorch eager baseline (scripts/torch_eager.py); the
# tables also land in $OUT when set.
set -uo pipefail
OUT=${OUT:-/tmp/kiln_gpu_out}; mkdir -p "$OUT"
# test binaries find their fixtures through the path they were built in
mkdir -p /work && { [ -e /work/main ] || ln -s "$PWD" /work/main; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
# cudarc looks for libcublas.so / .so.12: point it at the wheel's CUDA 13 library
CUB=$(python3 -c "import nvidia.cublas as m; print(list(m.__path__)[0] + '/lib')" 2>/dev/null)
mkdir -p /tmp/kiln_lib
for l in cublas cublasLt; do
  f=$(ls "$CUB"/lib$l.so.* 2>/dev/null | head -1); [ -n "$f" ] && ln -sf "$f" /tmp/kiln_lib/lib$l.so
done
# NCCL from the nvidia-nccl wheel PyTorch depends on (libnccl.so.2)
NCL=$(python3 -c "import nvidia.nccl as m; print(list(m.__path__)[0] + '/lib')" 2>/dev/null)
export LD_LIBRARY_PATH=/tmp/kiln_lib:${CUB:-}:${NCL:-}:${LD_LIBRARY_PATH:-}
export KILN_CUBIN_CACHE=/tmp/kiln_cubin
echo "== gpu_zoo"
{ echo "| artifact | launches | load ms (JIT / cached) | max rel. error | p50 ms | min ms |"; echo "|---|---|---|---|---|---|"
  for f in .gpu/zoo/*.kiln; do timeout 60 .gpu/bin/gpu_zoo .gpu/zoo 200 "$(basename "$f")" 2>&1 || echo "| $(basename "$f") | exit $? |"; done; } | tee "$OUT/zoo.txt"
echo "== gpu_cluster (2 GPU ranks as threads, sharing the GPU)"
timeout 300 .gpu/bin/gpu_cluster .gpu/cluster 20 2>&1 | tee "$OUT/cluster.txt"
echo "== gemm_bench"; timeout 120 .gpu/bin/gemm_bench 2>&1 | tee "$OUT/gemm.txt"
echo "== torch eager"; PYTHONUNBUFFERED=1 timeout 200 python3 scripts/torch_eager.py .gpu/zoo 200 2>&1 | tee "$OUT/torch.txt"
echo "== runtime cuda tests (one process per test)"
for b in cuda_test cuda_ops_test nccl_test; do
  for t in $(.gpu/bin/$b --list 2>/dev/null | grep ': test$' | sed 's/: test$//'); do
    timeout 60 .gpu/bin/$b --exact "$t" --nocapture > "/tmp/t_$t.log" 2>&1; rc=$?
    echo "$b $t: $([ $rc = 0 ] && echo ok || echo "FAILED ($rc)")"; [ $rc = 0 ] || grep -E "panicked|Error|error" "/tmp/t_$t.log" | head -3
  done
done 2>&1 | tee "$OUT/tests.txt"
[ -d .gpu/tune ] && { echo "== tuning bundles"; bash scripts/gpu_tune_check.sh; }
