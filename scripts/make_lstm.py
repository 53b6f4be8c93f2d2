"""Writes an unrolled LSTM as ONNX (what tracing a `torch.nn.LSTMCell` loop exports): one
input `seq` of shape [steps + 1, hidden] (the initial state, then one row per step), the
weights shared by every step, each step's `h` concatenated as the output.

    python scripts/make_lstm.py OUT.onnx [STEPS [HIDDEN]]   (default 16 steps, hidden 512)
    python scripts/make_lstm.py --op OUT.onnx [STEPS [HIDDEN]]

`--op` writes one ONNX `LSTM` node instead (what `torch.nn.LSTM` exports: X
[steps, 1, hidden], the same weights in ONNX's iofc gate order), which Kiln unrolls.

Used to compare `kiln compile -O0` / `-O2` artifacts with onnxruntime on the same model
(docs/eqsat.md, "Session 16"): at `-O2` the steps' input projections share their weight
and become one product (`merge-shared-weight`).
"""
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

args = sys.argv[1:]
as_op = args[0] == "--op"
if as_op:
    args = args[1:]
out = args[0]
steps = int(args[1]) if len(args) > 1 else 16
hidden = int(args[2]) if len(args) > 2 else 512
rng = np.random.default_rng(0)
inits = []



def save(graph):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, out)
    print("wrote", out)


if as_op:
    w = rng.uniform(-0.05, 0.05, (1, 4 * hidden, hidden)).astype(np.float32)
    r = rng.uniform(-0.05, 0.05, (1, 4 * hidden, hidden)).astype(np.float32)
    b = rng.uniform(-0.05, 0.05, (1, 8 * hidden)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(w, "W"), (r, "R"), (b, "B")]]
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], hidden_size=hidden)
    graph = helper.make_graph(
        [node],
        "lstm_op",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [steps, 1, hidden])],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [steps, 1, 1, hidden]),
            helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, 1, hidden]),
            helper.make_tensor_value_info("Y_c", TensorProto.FLOAT, [1, 1, hidden]),
        ],
        inits,
    )
    save(graph)
    sys.exit(0)


def const(name, arr):
    inits.append(numpy_helper.from_array(arr, name))
    return name


def ints(name, v):
    return const(name, np.array(v, dtype=np.int64))


g4 = 4 * hidden
w_ih = const("w_ih", rng.uniform(-0.05, 0.05, (hidden, g4)).astype(np.float32))
w_hh = const("w_hh", rng.uniform(-0.05, 0.05, (hidden, g4)).astype(np.float32))
b_ih = const("b_ih", rng.uniform(-0.05, 0.05, (g4,)).astype(np.float32))
b_hh = const("b_hh", rng.uniform(-0.05, 0.05, (g4,)).astype(np.float32))
ints("ax0", [0])
ints("ax1", [1])
for i in range(steps + 2):
    ints(f"r{i}", [i])
for i in range(5):
    ints(f"gb{i}", [i * hidden])
nodes = []


def node(op, ins, name, **attrs):
    nodes.append(helper.make_node(op, ins, [name], name=f"{name}_op", **attrs))
    return name


h = node("Slice", ["seq", "r0", "r1", "ax0"], "h0")
c = h
hs = []
for t in range(1, steps + 1):
    x = node("Slice", ["seq", f"r{t}", f"r{t + 1}", "ax0"], f"x{t}")
    xp = node("Add", [node("MatMul", [x, w_ih], f"xw{t}"), b_ih], f"xp{t}")
    hp = node("Add", [node("MatMul", [h, w_hh], f"hw{t}"), b_hh], f"hp{t}")
    pre = node("Add", [xp, hp], f"pre{t}")
    gates = [
        node("Slice", [pre, f"gb{i}", f"gb{i + 1}", "ax1"], f"s{t}_{i}") for i in range(4)
    ]
    i_g = node("Sigmoid", [gates[0]], f"i{t}")
    f_g = node("Sigmoid", [gates[1]], f"f{t}")
    g_g = node("Tanh", [gates[2]], f"g{t}")
    o_g = node("Sigmoid", [gates[3]], f"o{t}")
    c = node("Add", [node("Mul", [f_g, c], f"fc{t}"), node("Mul", [i_g, g_g], f"ig{t}")], f"c{t}")
    h = node("Mul", [o_g, node("Tanh", [c], f"tc{t}")], f"h{t}")
    hs.append(h)
node("Concat", hs, "hs", axis=0)
graph = helper.make_graph(
    nodes,
    "lstm",
    [helper.make_tensor_value_info("seq", TensorProto.FLOAT, [steps + 1, hidden])],
    [helper.make_tensor_value_info("hs", TensorProto.FLOAT, [steps, hidden])],
    inits,
)
save(graph)
