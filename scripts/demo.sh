#!/usr/bin/env bash
# The main job on the bundled example model: set up (first time), build, run the model and
# check the result against onnxruntime's reference outputs stored beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin kiln
MODEL=${1:-tests/zoo/resnet}
./target/release/kiln inspect "$MODEL/model.onnx"
./target/release/kiln eval "$MODEL/model.onnx" --check "$MODEL/test_data_set_0" -o target/demo-out.npz
