#!/usr/bin/env bash
# Measured latency of the zoo models on 1, 2 and 4 CPU ranks (one process per rank under
# mpirun; 1 rank = the single-device artifact on one thread). Usage: scripts/mpi_bench.sh [RUNS]
# Prints one line per model, mode and rank count: mean / p50 latency in ms.
set -euo pipefail
K=${KILN:-target/release/kiln}
RUNS=${1:-200}
Z=tests/zoo
T=$(mktemp -d)
MPI="mpirun --allow-run-as-root --oversubscribe --bind-to none"
row() { # model mode ranks args...
  local m=$1 mode=$2 n=$3; shift 3
  local check=()
  [ -d $Z/$m/test_data_set_0 ] && [ "$m" != mlp ] && check=(--check $Z/$m/test_data_set_0)
  if [ "$n" = 1 ]; then
    $K compile $Z/$m/model.onnx "$@" -o $T/$m.kiln >/dev/null
    out=$($K run $T/$m.kiln --threads 1 --repeat $RUNS "${check[@]}")
  else
    $K compile $Z/$m/model.onnx "$@" --ranks $n --mode $mode -o $T/$m-$mode$n.kiln >/dev/null
    out=$($MPI -n $n $K run $T/$m-$mode$n.kiln --repeat $RUNS "${check[@]}" 2>&1)
  fi
  echo "$m $mode ranks=$n: $(echo "$out" | grep -o 'mean latency.*')"
}
for m in resnet mobilenet; do
  row $m single 1
  for n in 2 4; do row $m pipeline $n; done
done
row bert single 1 --shape input_ids=1x16 --shape attention_mask=1x16
row gpt single 1 --shape input_ids=2x16
for n in 2 4; do
  for mode in pipeline tensor; do
    row bert $mode $n --shape input_ids=1x16 --shape attention_mask=1x16
    row gpt $mode $n --shape input_ids=2x16
  done
done
row mlp single 1 --shape input=4x32
for n in 2 4; do for mode in pipeline tensor data; do row mlp $mode $n --shape input=4x32; done; done
rm -rf "$T"
