"""RNN / GRU / LSTM layers against onnxruntime, unrolled into their time steps and compiled:
without and with per-batch `sequence_lens` given at run time (step masks), every direction (onnxruntime has no batch-first layout; the
ONNX node tests check that one)."""

import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_check import assert_matches_onnxruntime

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def layer_model(path, cell, direction, layout, seq, batch, inp, hidden, lens, rng):
    nd = 2 if direction == "bidirectional" else 1
    g = GATES[cell]
    w = rng.uniform(-0.5, 0.5, (nd, g * hidden, inp)).astype(np.float32)
    r = rng.uniform(-0.5, 0.5, (nd, g * hidden, hidden)).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, (nd, 2 * g * hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(w, "W"), (r, "R"), (b, "B")]]
    x_shape = [batch, seq, inp] if layout else [seq, batch, inp]
    ins = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    node_in = ["X", "W", "R", "B"]
    if lens:
        ins.append(helper.make_tensor_value_info("L", TensorProto.INT32, [batch]))
        node_in.append("L")
    outs = ["Y", "Y_h"] + (["Y_c"] if cell == "LSTM" else [])
    attrs = dict(hidden_size=hidden, direction=direction, layout=layout)
    if cell == "GRU":
        attrs["linear_before_reset"] = 1
    node = helper.make_node(cell, node_in, outs, **attrs)
    graph = helper.make_graph(
        [node], "layer", ins,
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    onnx.save(m, path)


@pytest.mark.parametrize("cell", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("lens", [False, True])
def test_recurrent_layers_match_onnxruntime(cell, direction, lens, tmp_path):
    rng = np.random.default_rng(zlib.crc32(f"{cell} {direction} {lens}".encode()))
    layout = 0
    seq, batch, inp, hidden = 5, 3, 4, 6
    path = str(tmp_path / "m.onnx")
    layer_model(path, cell, direction, layout, seq, batch, inp, hidden, lens, rng)
    x = rng.standard_normal((batch, seq, inp) if layout else (seq, batch, inp)).astype(np.float32)
    feeds = {"X": x}
    if lens:
        feeds["L"] = np.array([5, 2, 4], dtype=np.int32)
    assert_matches_onnxruntime(path, feeds)
