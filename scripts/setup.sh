#!/usr/bin/env bash
# Installs everything Kiln needs on a fresh Debian 12 machine. Idempotent: a second run only
# checks and returns in seconds.
#   - apt: LLVM/MLIR 22 (headers, libraries, tools) and the C libraries they link against
#   - .venv: onnx, onnxruntime, numpy (test oracles) and nvidia-cuda-nvcc (ptxas)
#   - .data/node: the ONNX backend node tests, written out by the onnx wheel
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(llvm-22-dev libmlir-22-dev mlir-22-tools libclang-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
          libxml2-dev libffi-dev libedit-dev libncurses-dev python3-venv pkg-config
          libopenmpi-dev openmpi-bin)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
test -x /usr/lib/llvm-22/bin/llvm-config || { echo "setup: LLVM 22 not found under /usr/lib/llvm-22" >&2; exit 1; }

PY_REQS="onnx==1.23.2 onnxruntime==1.32.0 numpy nvidia-cuda-nvcc maturin pytest"
if [ ! -f .venv/.kiln-ok ] || [ "$(cat .venv/.kiln-ok)" != "$PY_REQS" ]; then
  echo "setup: creating .venv ($PY_REQS)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check $PY_REQS
  echo "$PY_REQS" > .venv/.kiln-ok
fi

if [ ! -f .data/node/COMPLETE ]; then
  echo "setup: writing ONNX backend node tests to .data/node"
  rm -rf .data/node
  .venv/bin/python scripts/gen_node_tests.py .data/node >/dev/null 2>&1
fi
command -v cargo >/dev/null || { echo "setup: cargo not found (install Rust with rustup)" >&2; exit 1; }
echo "setup: ok"
