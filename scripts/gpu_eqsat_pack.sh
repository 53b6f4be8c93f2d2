#!/usr/bin/env bash
# Issue 4 on a GPU: fills .gpu/eqsat.tar.xz (git-ignored) with tensat's evaluation graphs
# compiled for cuda:SKU (default h100) at -O0 and -O2 (the GPU cost model), each with its
# input and the reference interpreter's output (`cargo run --release --example
# eqsat_speedup -- --gpu SKU DIR`; weights are a short repeating sequence per tensor, so the
# artifacts, 5–550 MB each, compress to 0.4–3.3 MB). Graphs whose -O2 artifact is the -O0
# one byte for byte (eqsat kept the input graph: vgg19, resnext50) keep only -O0. Adds the
# runtime-only gpu_zoo to .gpu/bin. Then: device run with carry [".gpu"] and command
# `bash scripts/gpu_eqsat_check.sh` (measured -O2 vs -O0 speed-up per graph).
# Usage: scripts/gpu_eqsat_pack.sh [SKU [MODEL...]]
set -euo pipefail
cd "$(dirname "$0")/.."
SKU=${1:-h100}; shift || true
EXCL=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$EXCL")"
grep -qx '/.gpu/' "$EXCL" 2>/dev/null || echo '/.gpu/' >> "$EXCL"
mkdir -p .gpu/bin
cargo build --release --example eqsat_speedup
cargo build --release -p kiln-runtime --features cuda --example gpu_zoo
cp target/release/examples/gpu_zoo .gpu/bin/ && strip .gpu/bin/gpu_zoo
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/eqsat"
./target/release/examples/eqsat_speedup --gpu "$SKU" "$TMP/eqsat" "$@" | tee "$TMP/eqsat/pack.log"
for o0 in "$TMP"/eqsat/*.O0.kiln; do
  o2=${o0%.O0.kiln}.O2.kiln
  if [ -f "$o2" ] && cmp -s "$o0" "$o2"; then
    rm "$o2"; echo "$(basename "${o0%.O0.kiln}"): -O2 = -O0 (the input graph was kept)" | tee -a "$TMP/eqsat/pack.log"
  fi
done
tar -C "$TMP" -cf - eqsat | xz -1 -T2 > .gpu/eqsat.tar.xz.part && mv .gpu/eqsat.tar.xz.part .gpu/eqsat.tar.xz
du -sh .gpu/eqsat.tar.xz .gpu
