#!/usr/bin/env bash
# The main job on the bundled example model: set up (first time), build, compile the model to
# a CPU artifact, run the artifact and check its outputs against onnxruntime's reference
# outputs stored beside the model. Then the same for the ResNet-style CNN, and a side-by-side
# latency comparison with onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin kiln
K=./target/release/kiln
mkdir -p target/demo
$K inspect tests/zoo/mlp/model.onnx
$K compile tests/zoo/mlp/model.onnx --shape input=2x32 -o target/demo/mlp.kiln
$K run target/demo/mlp.kiln --check tests/zoo/mlp/test_data_set_0 --repeat 1000 -o target/demo/mlp-out.npz
$K compile tests/zoo/resnet/model.onnx -o target/demo/resnet.kiln
$K run target/demo/resnet.kiln --check tests/zoo/resnet/test_data_set_0 --repeat 200
$K bench tests/zoo/resnet/model.onnx --threads 1 --runs 100
