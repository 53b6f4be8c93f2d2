#!/usr/bin/env bash
# Sourced by the GPU machine's check scripts (gpu_check.sh, gpu_profile_check.sh): unpacks
# .gpu/pack.tar.xz, links /work/main to the working tree (test binaries find their fixtures
# through the path they were built in), prints the GPU into $OUT/gpu.txt, and points cudarc
# at the cuBLAS and NCCL libraries of the machine's Python wheels.
# a packed .gpu/ keeps its binaries and small files in one archive
if [ -f .gpu/pack.tar.xz ]; then
  python3 -c "import lzma,tarfile; tarfile.open(fileobj=lzma.open('.gpu/pack.tar.xz')).extractall('.gpu')"
fi
# test binaries find their fixtures through the path they were built in
mkdir -p /work && { [ -e /work/main ] || ln -s "$PWD" /work/main; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
[ -f .gpu/SKU ] && echo "artifacts compiled for cuda:$(cat .gpu/SKU)" | tee -a "$OUT/gpu.txt"
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
