#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with everything scripts/gpu_check.sh runs on a GPU machine that
# has no compiler, for ONE device call: stripped runtime-only binaries (gpu_zoo, gemm_bench,
# the runtime's CUDA and NCCL test binaries, gpu_cluster), every zoo model compiled for SKU
# at f32 and f16 (bert/gpt also tf32, bf16) and sharded over 2 GPU ranks, the models and
# their test data; then the tuning bundles (scripts/gpu_tune_pack.sh) and tensat's graphs
# (scripts/gpu_eqsat_pack.sh) unless NO_TUNE=1 / NO_EQSAT=1. Small files go into one
# .gpu/pack.tar.xz; the whole must stay under the 64 MiB a device call carries.
# SKU: the kind `status` says a run gets (h100 or h200; default h200). With GPU tuning
# records of an earlier session in tuning/records/SKU.jsonl, the zoo is also compiled tuned.
# Then: device run with carry [".gpu"] and command `bash scripts/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
SKU=${1:-h200}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/bin .gpu/zoo
cargo build --release -p kiln
cargo build --release -p kiln-runtime --features nccl --example gpu_zoo --example gemm_bench \
  --example gpu_cluster
cp target/release/examples/gpu_zoo target/release/examples/gemm_bench \
  target/release/examples/gpu_cluster .gpu/bin/
for t in cuda cuda_ops nccl; do
  exe=$(cargo test --release -p kiln-runtime --features nccl --test $t --no-run --message-format=json 2>/dev/null \
        | .venv/bin/python -c "import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get('reason')=='compiler-artifact' and m.get('executable') and m['target']['name']=='$t': print(m['executable'])" | tail -1)
  cp "$exe" .gpu/bin/${t}_test
done
strip .gpu/bin/*
# GPU tuning records committed by an earlier GPU session (tuning/records/SKU.jsonl): the zoo
# is also compiled with them (MODEL.P.tuned.kiln), so that one call measures tuned against
# untuned end to end
REC=tuning/records/$SKU.jsonl; TDB=""
if [ -f "$REC" ]; then
  TDB=$(mktemp -d)/records.db
  ./target/release/kiln db import "$REC" --db "$TDB"
fi
.venv/bin/python - "$SKU" "$TDB" <<'PY'
import filecmp, os, subprocess, sys
sys.path.insert(0, 'scripts')
from zoo_shapes import ZOO, shape_args
sku, tdb = sys.argv[1], sys.argv[2]
for m in ZOO:
    shapes = shape_args(m)
    subprocess.run(f'mkdir -p .gpu/zoo/{m} && cp tests/zoo/{m}/model.onnx tests/zoo/{m}/test_data_set_0/*.pb .gpu/zoo/{m}/', shell=True, check=True)
    for p in ['f32', 'f16'] + (['tf32', 'bf16'] if m in ('bert', 'gpt') else []):
        subprocess.run(['./target/release/kiln', 'compile', f'tests/zoo/{m}/model.onnx', '--target', f'cuda:{sku}',
                        '--precision', p, '-o', f'.gpu/zoo/{m}.{p}.kiln'] + shapes, check=True, stdout=subprocess.DEVNULL)
        if tdb:
            tuned = f'.gpu/zoo/{m}.{p}.tuned.kiln'
            subprocess.run(['./target/release/kiln', 'compile', f'tests/zoo/{m}/model.onnx', '--target', f'cuda:{sku}',
                            '--precision', p, '--db', tdb, '-o', tuned] + shapes, check=True, stdout=subprocess.DEVNULL)
            if filecmp.cmp(tuned, f'.gpu/zoo/{m}.{p}.kiln', shallow=False):
                os.remove(tuned)  # no record applied: the same artifact
    # Sharded over 2 GPU ranks (both on the one GPU of the machine; gpu_cluster runs them as
    # threads): tensor parallel for the MLP/transformers, a pipeline for the CNNs.
    subprocess.run(f'mkdir -p .gpu/cluster/{m} && cp tests/zoo/{m}/test_data_set_0/*.pb .gpu/cluster/{m}/', shell=True, check=True)
    mode = 'pipeline' if m in ('resnet', 'mobilenet') else 'tensor'
    subprocess.run(['./target/release/kiln', 'compile', f'tests/zoo/{m}/model.onnx', '--target', f'cuda:{sku}',
                    '--ranks', '2', '--mode', mode, '-o', f'.gpu/cluster/{m}.{mode}2.kiln'] + shapes,
                   check=True, stdout=subprocess.DEVNULL)
PY
[ "${NO_TUNE:-0}" = 1 ] || scripts/gpu_tune_pack.sh "$SKU"
[ "${NO_EQSAT:-0}" = 1 ] || scripts/gpu_eqsat_pack.sh "$SKU"
echo "$SKU" > .gpu/SKU
# everything but the (already compressed) eqsat archive and the local tuning database into
# one xz archive, written outside .gpu/ so that it does not pack itself
PART=$(mktemp)
( cd .gpu && find . -mindepth 1 -maxdepth 1 ! -name eqsat.tar.xz ! -name tuning.db -print0 \
    | xargs -0 tar -cf - | xz -6 -T2 > "$PART" \
  && find . -mindepth 1 -maxdepth 1 ! -name eqsat.tar.xz ! -name tuning.db -exec rm -rf {} + \
  && mv "$PART" pack.tar.xz && echo "$SKU" > SKU )
du -sh .gpu/* .gpu
bytes=$(du -sb .gpu | cut -f1)
if [ "$bytes" -gt $(( 62 * 1024 * 1024 )) ]; then
  echo "error: .gpu/ holds $bytes bytes, over what one device call carries (64 MiB)" >&2; exit 1
fi
