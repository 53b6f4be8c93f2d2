#!/usr/bin/env bash
# The main job on the bundled example model: set up (first time), build, compile the model to
# a CPU artifact, run the artifact and check its outputs against onnxruntime's reference
# outputs stored beside the model. Then run a CNN through the reference interpreter (CNN
# kernels are not compiled yet).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin kiln
K=./target/release/kiln
mkdir -p target/demo
$K inspect tests/zoo/mlp/model.onnx
$K compile tests/zoo/mlp/model.onnx --shape input=2x32 -o target/demo/mlp.kiln
$K run target/demo/mlp.kiln --check tests/zoo/mlp/test_data_set_0 --repeat 1000 -o target/demo/mlp-out.npz
$K eval tests/zoo/resnet/model.onnx --check tests/zoo/resnet/test_data_set_0
