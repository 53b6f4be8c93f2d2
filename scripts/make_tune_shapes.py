"""Single-kernel ONNX models with the MatMul shapes of BERT-base (sequence 128) and the
Conv shapes of ResNet-50 (224×224, batch 1), for the autotuning benchmark
(scripts/tune_bench.sh). Weights are random constants (so Kiln packs them at compile time,
as in a real model); each model is `y = op(x, W) (+ bias, relu)`.

Usage: python scripts/make_tune_shapes.py OUT_DIR
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# name: (M, K, N) of x[M,K] · W[K,N] + b, as in BERT-base's encoder at sequence 128.
MATMULS = {
    "bert_qkv": (128, 768, 768),
    "bert_ffn_up": (128, 768, 3072),
    "bert_ffn_down": (128, 3072, 768),
}
# name: (C, H, W, M, k, stride) of ResNet-50 convs (+ bias + relu), batch 1.
CONVS = {
    "r50_conv1_7x7s2": (3, 224, 224, 64, 7, 2),
    "r50_l1_3x3": (64, 56, 56, 64, 3, 1),
    "r50_l1_1x1_up": (64, 56, 56, 256, 1, 1),
    "r50_l2_3x3": (128, 28, 28, 128, 3, 1),
    "r50_l3_3x3": (256, 14, 14, 256, 3, 1),
    "r50_l4_3x3": (512, 7, 7, 512, 3, 1),
    "r50_l4_1x1_down": (2048, 7, 7, 512, 1, 1),
}


def save(out, name, nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, name, inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    onnx.save(m, os.path.join(d, "model.onnx"))


def main(out):
    rng = np.random.default_rng(0)
    for name, (m, k, n) in MATMULS.items():
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32) * 0.1
        save(
            out,
            name,
            [
                helper.make_node("MatMul", ["x", "w"], ["t"]),
                helper.make_node("Add", ["t", "b"], ["u"]),
                helper.make_node("Relu", ["u"], ["y"]),
            ],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
        )
    for name, (c, h, wd, mo, k, s) in CONVS.items():
        w = (rng.standard_normal((mo, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        b = rng.standard_normal(mo).astype(np.float32) * 0.1
        p = k // 2
        oh, ow = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
        save(
            out,
            name,
            [
                helper.make_node(
                    "Conv", ["x", "w", "b"], ["t"], kernel_shape=[k, k], strides=[s, s], pads=[p] * 4
                ),
                helper.make_node("Relu", ["t"], ["y"]),
            ],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, wd])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, mo, oh, ow])],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/tune_shapes")
