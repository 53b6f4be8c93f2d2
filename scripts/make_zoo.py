"""Builds Kiln's test zoo: small real-world-shaped ONNX models with random weights, plus
reference outputs from onnxruntime, in the ONNX test-data layout:

    <out>/<name>/model.onnx
    <out>/<name>/test_data_set_0/input_K.pb, output_K.pb

The graphs mimic what `torch.onnx.export` (TorchScript exporter, opset 17) emits for
common architectures (node/value naming, Constant nodes, Shape→Gather→Unsqueeze→Concat
chains, exporter idioms for masks and activations), but are written directly with
`onnx.helper`, so no torch is needed. Everything is deterministic (fixed numpy seeds).

BatchNormalization running statistics are calibrated on the real activations (the graph is
built progressively and run through onnxruntime at each BN), so outputs have a realistic
spread rather than being dominated by mean 0 / var 1 placeholders.

Usage: python scripts/make_zoo.py [OUT_DIR=tests/zoo]
"""
import collections
import math
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # what torch writes for opset 17
F32_MIN = float(np.finfo(np.float32).min)


class G:
    """A graph under construction, with torch-exporter-style naming.

    Node names are `<scope>/<OpType>[_k]`, their outputs `<node name>_output_<i>`;
    parameters are named like module state-dict entries (`layer1.0.conv1.weight`).
    """

    def __init__(self, name, seed):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes = []
        self.inits = []
        self.inputs = []
        self.used = collections.Counter()
        self.calib = []  # feeds used to calibrate BatchNormalization statistics

    # ---- graph building -------------------------------------------------------------
    def input(self, name, dtype, shape):
        """Declares a graph input (`shape` entries may be strings: symbolic dims)."""
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def init(self, name, arr):
        """Adds an initializer and returns its name."""
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def _node_name(self, scope, op_type):
        base = f"{scope}/{op_type}"
        k = self.used[base]
        self.used[base] += 1
        return base if k == 0 else f"{base}_{k}"

    def op(self, op_type, inputs, scope="", n_out=1, **attrs):
        """Appends a node; returns its output name (or a list when `n_out > 1`)."""
        name = self._node_name(scope, op_type)
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, scope="", dtype=None):
        """A `Constant` node, as the exporter emits for Python scalars and small lists."""
        arr = np.array(value, dtype=dtype)
        name = self._node_name(scope, "Constant")
        out = f"{name}_output_0"
        self.nodes.append(
            helper.make_node(
                "Constant", [], [out], name=name, value=numpy_helper.from_array(arr)
            )
        )
        return out

    def randn(self, *shape, std=1.0):
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    # ---- running ----------------------------------------------------------------------
    def model(self, outputs, doc=""):
        """The ModelProto with the given graph outputs (names or ValueInfoProtos)."""
        outs = [
            o if isinstance(o, onnx.ValueInfoProto)
            else helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
            for o in outputs
        ]
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, outs, initializer=self.inits, doc_string=doc
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="kiln-make_zoo",
            producer_version="1",
        )
        m.ir_version = IR_VERSION
        return m

    def output(self, value, name, dtype, shape):
        """Renames `value` to the graph output `name` (as `output_names=` does in torch)."""
        for n in self.nodes:
            n.output[:] = [name if o == value else o for o in n.output]
            n.input[:] = [name if i == value else i for i in n.input]
        return helper.make_tensor_value_info(name, dtype, shape)

    def eval(self, name, feeds_list):
        """Runs the graph built so far and returns the value `name` for each feed."""
        sess = session(self.model([name]))
        return [sess.run(None, f)[0] for f in feeds_list]

    # ---- layers -----------------------------------------------------------------------
    def conv(self, x, scope, cin, cout, k, stride=1, group=1, bias=False):
        fan_in = cin // group * k * k
        w = self.init(f"{scope}.weight", self.randn(cout, cin // group, k, k,
                                                    std=math.sqrt(2.0 / fan_in)))
        ins = [x, w]
        if bias:
            ins.append(self.init(f"{scope}.bias", self.randn(cout, std=0.05)))
        p = k // 2
        return self.op(
            "Conv", ins, "/" + scope.replace(".", "/"),
            dilations=[1, 1], group=group, kernel_shape=[k, k], pads=[p, p, p, p],
            strides=[stride, stride],
        )

    def bn(self, x, scope, c):
        """BatchNormalization whose running stats come from the actual activations."""
        acts = np.concatenate(self.eval(x, self.calib), axis=0)
        mean = acts.mean(axis=(0, 2, 3))
        var = acts.var(axis=(0, 2, 3))
        # a little noise, as running averages never match a given batch exactly
        mean = mean + self.randn(c, std=0.05) * np.sqrt(var)
        var = var * self.rng.uniform(0.8, 1.25, c).astype(np.float32)
        ins = [
            x,
            self.init(f"{scope}.weight", self.rng.uniform(0.5, 1.5, c).astype(np.float32)),
            self.init(f"{scope}.bias", self.randn(c, std=0.2)),
            self.init(f"{scope}.running_mean", mean.astype(np.float32)),
            self.init(f"{scope}.running_var", var.astype(np.float32)),
        ]
        return self.op("BatchNormalization", ins, "/" + scope.replace(".", "/"),
                       epsilon=1e-5, momentum=0.9)

    def linear(self, x, scope, cin, cout, gemm, std=None):
        """torch.nn.Linear: Gemm(transB=1) for 2-D inputs, else MatMul + Add(bias, ·)."""
        std = std if std is not None else 1.0 / math.sqrt(cin)
        s = "/" + scope.replace(".", "/")
        b = self.init(f"{scope}.bias", self.randn(cout, std=0.05))
        if gemm:
            w = self.init(f"{scope}.weight", self.randn(cout, cin, std=std))
            return self.op("Gemm", [x, w, b], s, alpha=1.0, beta=1.0, transB=1)
        # the exporter pre-transposes the weight into an anonymous initializer
        w = self.init(f"onnx::MatMul_{len(self.inits)}", self.randn(cin, cout, std=std))
        mm = self.op("MatMul", [x, w], s)
        return self.op("Add", [b, mm], s)

    def layer_norm(self, x, scope, c, decomposed):
        """LayerNorm over the last axis: the opset-17 op, or the decomposed form."""
        s = "/" + scope.replace(".", "/")
        eps = 1e-12 if self.name == "bert" else 1e-5  # BERT's and GPT-2's config values
        gamma = self.init(f"{scope}.weight", 1.0 + self.randn(c, std=0.1))
        beta = self.init(f"{scope}.bias", self.randn(c, std=0.1))
        if not decomposed:
            return self.op("LayerNormalization", [x, gamma, beta], s, axis=-1, epsilon=eps)
        mean = self.op("ReduceMean", [x], s, axes=[-1], keepdims=1)
        d = self.op("Sub", [x, mean], s)
        sq = self.op("Pow", [d, self.const(2.0, s, np.float32)], s)
        var = self.op("ReduceMean", [sq], s, axes=[-1], keepdims=1)
        ve = self.op("Add", [var, self.const(eps, s, np.float32)], s)
        std = self.op("Sqrt", [ve], s)
        n = self.op("Div", [d, std], s)
        m = self.op("Mul", [n, gamma], s)
        return self.op("Add", [m, beta], s)

    def dim(self, x, i, s):
        """`x.size(i)` as a 1-D tensor: Shape → Gather(scalar index) → Unsqueeze."""
        shp = self.op("Shape", [x], s)
        g = self.op("Gather", [shp, self.const(i, s, np.int64)], s, axis=0)
        return self.op("Unsqueeze", [g, self.const([0], s, np.int64)], s)


def session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )


# ---- models -----------------------------------------------------------------------------
def mlp():
    """3-layer MLP, symbolic batch: Gemm / MatMul+Add / Gemm with Relu in between."""
    g = G("mlp", 1)
    x = g.input("input", TensorProto.FLOAT, ["batch", 32])
    h = g.op("Relu", [g.linear(x, "fc1", 32, 64, gemm=True)], "/relu")
    h = g.op("Relu", [g.linear(h, "fc2", 64, 64, gemm=False)], "/relu_1")
    y = g.linear(h, "fc3", 64, 10, gemm=True)
    out = g.output(y, "output", TensorProto.FLOAT, ["batch", 10])
    # set 0 at batch 2, set 1 at another batch size (the dim is symbolic)
    return g.model([out]), [{"input": g.randn(2, 32)}, {"input": g.randn(5, 32)}]


def resnet():
    """ResNet-style CNN (basic blocks) at 1x3x64x64 with calibrated BatchNorms."""
    g = G("resnet", 2)
    x = g.input("input", TensorProto.FLOAT, [1, 3, 64, 64])
    g.calib = [{"input": g.randn(1, 3, 64, 64)} for _ in range(4)]
    h = g.conv(x, "conv1", 3, 16, 7, stride=2)
    h = g.bn(h, "bn1", 16)
    h = g.op("Relu", [h], "/relu")
    h = g.op("MaxPool", [h], "/maxpool", ceil_mode=0, dilations=[1, 1],
             kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    cin = 16
    for i, cout in enumerate([16, 32, 64, 128]):
        stride = 1 if cout == cin else 2
        sc = f"layer{i + 1}.0"
        y = g.conv(h, f"{sc}.conv1", cin, cout, 3, stride)
        y = g.bn(y, f"{sc}.bn1", cout)
        y = g.op("Relu", [y], f"/{sc.replace('.', '/')}/relu")
        y = g.conv(y, f"{sc}.conv2", cout, cout, 3)
        y = g.bn(y, f"{sc}.bn2", cout)
        if stride != 1:
            idn = g.conv(h, f"{sc}.downsample.0", cin, cout, 1, stride)
            idn = g.bn(idn, f"{sc}.downsample.1", cout)
        else:
            idn = h
        y = g.op("Add", [y, idn], f"/{sc.replace('.', '/')}")
        h = g.op("Relu", [y], f"/{sc.replace('.', '/')}/relu_1")
        cin = cout
    h = g.op("GlobalAveragePool", [h], "/avgpool")
    h = g.op("Flatten", [h], "", axis=1)
    y = g.linear(h, "fc", 128, 10, gemm=True, std=0.3)
    out = g.output(y, "output", TensorProto.FLOAT, [1, 10])
    return g.model([out]), [{"input": g.randn(1, 3, 64, 64)}]


def mobilenet():
    """MobileNetV2-style: Conv+BN+Clip(0,6), inverted residuals with depthwise convs,
    one HardSwish, GlobalAveragePool, Gemm."""
    g = G("mobilenet", 3)
    x = g.input("input", TensorProto.FLOAT, [1, 3, 64, 64])
    g.calib = [{"input": g.randn(1, 3, 64, 64)} for _ in range(4)]
    # the exporter shares the Clip bounds as anonymous scalar initializers
    lo = g.init("onnx::Clip_lo", np.array(0.0, np.float32))
    hi = g.init("onnx::Clip_hi", np.array(6.0, np.float32))

    def cbr(h, scope, cin, cout, k, stride=1, group=1, act=True):
        h = g.conv(h, f"{scope}.0", cin, cout, k, stride, group)
        h = g.bn(h, f"{scope}.1", cout)
        if act:
            h = g.op("Clip", [h, lo, hi], "/" + scope.replace(".", "/") + "/2")
        return h

    h = cbr(x, "features.0", 3, 16, 3, stride=2)
    cin = 16
    idx = 1
    for t, c, s in [(1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1)]:
        sc = f"features.{idx}.conv"
        hid = cin * t
        y = h
        j = 0
        if t != 1:
            y = cbr(y, f"{sc}.{j}", cin, hid, 1)
            j += 1
        y = cbr(y, f"{sc}.{j}", hid, hid, 3, stride=s, group=hid)
        y = g.conv(y, f"{sc}.{j + 1}", hid, c, 1)
        y = g.bn(y, f"{sc}.{j + 2}", c)
        if s == 1 and cin == c:
            y = g.op("Add", [h, y], f"/features/features.{idx}")
        h = y
        cin = c
        idx += 1
    h = g.conv(h, f"features.{idx}.0", cin, 128, 1)
    h = g.bn(h, f"features.{idx}.1", 128)
    h = g.op("HardSwish", [h], f"/features/features.{idx}/2")
    h = g.op("GlobalAveragePool", [h], "/GlobalAveragePool")
    h = g.op("Flatten", [h], "", axis=1)
    y = g.linear(h, "classifier.1", 128, 10, gemm=True, std=0.3)
    out = g.output(y, "output", TensorProto.FLOAT, [1, 10])
    return g.model([out]), [{"input": g.randn(1, 3, 64, 64)}]


def split_heads(g, x, s, heads, hd):
    """`x.view(x.size()[:-1] + (heads, hd))` → Reshape with a Shape/Gather/Concat shape."""
    b = g.dim(x, 0, s)
    t = g.dim(x, 1, s)
    shape = g.op("Concat", [b, t, g.const([heads], s, np.int64),
                            g.const([hd], s, np.int64)], s, axis=0)
    return g.op("Reshape", [x, shape], s)


def merge_heads(g, x, s, hidden):
    """`x.permute(0, 2, 1, 3).reshape(b, t, hidden)`."""
    x = g.op("Transpose", [x], s, perm=[0, 2, 1, 3])
    b = g.dim(x, 0, s)
    t = g.dim(x, 1, s)
    shape = g.op("Concat", [b, t, g.const([hidden], s, np.int64)], s, axis=0)
    return g.op("Reshape", [x, shape], s)


def bert():
    """2-layer BERT-style encoder (hidden 64, 4 heads), symbolic batch/seq, padded mask."""
    g = G("bert", 4)
    H, NH, HD, FF, V, P = 64, 4, 16, 256, 256, 64
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = g.input("attention_mask", TensorProto.INT64, ["batch", "seq"])
    s = "/embeddings"
    we = g.init("embeddings.word_embeddings.weight", g.randn(V, H, std=0.5))
    pe = g.init("embeddings.position_embeddings.weight", g.randn(P, H, std=0.5))
    pos_buf = g.init("embeddings.position_ids", np.arange(P, dtype=np.int64)[None])
    seq = g.dim(ids, 1, s)
    pos = g.op("Slice", [pos_buf, g.const([0], s, np.int64), seq,
                         g.const([1], s, np.int64), g.const([1], s, np.int64)], s)
    e = g.op("Add", [g.op("Gather", [we, ids], s + "/word_embeddings"),
                     g.op("Gather", [pe, pos], s + "/position_embeddings")], s)
    h = g.layer_norm(e, "embeddings.LayerNorm", H, decomposed=False)
    # extended attention mask: (1 - mask[:, None, None, :].float()) * finfo.min
    m = g.op("Unsqueeze", [mask, g.const([1], "", np.int64)], "")
    m = g.op("Unsqueeze", [m, g.const([2], "", np.int64)], "")
    m = g.op("Cast", [m], "", to=TensorProto.FLOAT)
    m = g.op("Sub", [g.const(1.0, "", np.float32), m], "")
    ext = g.op("Mul", [m, g.const(F32_MIN, "", np.float32)], "")
    for li in range(2):
        ls = f"encoder.layer.{li}"
        s = "/" + ls.replace(".", "/") + "/attention/self"
        q = g.linear(h, f"{ls}.attention.self.query", H, H, gemm=False)
        k = g.linear(h, f"{ls}.attention.self.key", H, H, gemm=False)
        v = g.linear(h, f"{ls}.attention.self.value", H, H, gemm=False)
        q = g.op("Transpose", [split_heads(g, q, s, NH, HD)], s, perm=[0, 2, 1, 3])
        k = split_heads(g, k, s, NH, HD)
        if li == 0:
            k = g.op("Transpose", [k], s, perm=[0, 2, 3, 1])
        else:
            k = g.op("Transpose", [k], s, perm=[0, 2, 1, 3])
            k = g.op("Transpose", [k], s, perm=[0, 1, 3, 2])
        v = g.op("Transpose", [split_heads(g, v, s, NH, HD)], s, perm=[0, 2, 1, 3])
        sc = g.op("MatMul", [q, k], s)
        sc = g.op("Div", [sc, g.const(math.sqrt(HD), s, np.float32)], s)
        sc = g.op("Add", [sc, ext], s)
        p = g.op("Softmax", [sc], s, axis=-1)
        ctx = merge_heads(g, g.op("MatMul", [p, v], s), s, H)
        a = g.linear(ctx, f"{ls}.attention.output.dense", H, H, gemm=False)
        a = g.op("Add", [a, h], f"/{ls.replace('.', '/')}/attention/output")
        h = g.layer_norm(a, f"{ls}.attention.output.LayerNorm", H, decomposed=li == 1)
        s = f"/{ls.replace('.', '/')}/intermediate/intermediate_act_fn"
        f = g.linear(h, f"{ls}.intermediate.dense", H, FF, gemm=False)
        # GELU (erf): x * 0.5 * (1 + erf(x / sqrt(2)))
        t = g.op("Div", [f, g.const(math.sqrt(2.0), s, np.float32)], s)
        t = g.op("Erf", [t], s)
        t = g.op("Add", [t, g.const(1.0, s, np.float32)], s)
        t = g.op("Mul", [f, t], s)
        f = g.op("Mul", [t, g.const(0.5, s, np.float32)], s)
        f = g.linear(f, f"{ls}.output.dense", FF, H, gemm=False)
        f = g.op("Add", [f, h], f"/{ls.replace('.', '/')}/output")
        h = g.layer_norm(f, f"{ls}.output.LayerNorm", H, decomposed=li == 1)
    # pooler: tanh(dense(h[:, 0]))
    first = g.op("Gather", [h, g.const(0, "/pooler", np.int64)], "/pooler", axis=1)
    pooled = g.op("Tanh", [g.linear(first, "pooler.dense", H, H, gemm=True)], "/pooler")
    outs = [
        g.output(h, "last_hidden_state", TensorProto.FLOAT, ["batch", "seq", H]),
        g.output(pooled, "pooler_output", TensorProto.FLOAT, ["batch", H]),
    ]
    am = np.ones((1, 16), np.int64)
    am[:, 12:] = 0  # padded tail
    feeds = {"input_ids": g.rng.integers(0, V, (1, 16)).astype(np.int64),
             "attention_mask": am}
    # set 1: batch 2, seq 9, the second sequence padded
    am1 = np.ones((2, 9), np.int64)
    am1[1, 6:] = 0
    feeds1 = {"input_ids": g.rng.integers(0, V, (2, 9)).astype(np.int64),
              "attention_mask": am1}
    return g.model(outs), [feeds, feeds1]


def gpt():
    """2-layer GPT-2-style decoder (hidden 64, 4 heads, vocab 128), symbolic batch/seq.

    Layer 0 masks with Trilu + Where(mask, scores, finfo.min as a 0-d ConstantOfShape);
    layer 1 adds an additive causal mask built from Range/Less/Where/ConstantOfShape."""
    g = G("gpt", 5)
    H, NH, HD, FF, V, P = 64, 4, 16, 256, 128, 64
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "seq"])
    s = ""
    wte_w = g.randn(V, H, std=0.5)
    wte = g.init("transformer.wte.weight", wte_w)
    wpe = g.init("transformer.wpe.weight", g.randn(P, H, std=0.3))
    seq = g.dim(ids, 1, s)
    seq0 = g.op("Gather", [g.op("Shape", [ids], s), g.const(1, s, np.int64)], s, axis=0)
    pos = g.op("Range", [g.const(0, s, np.int64), seq0, g.const(1, s, np.int64)], s)
    pos = g.op("Unsqueeze", [pos, g.const([0], s, np.int64)], s)
    h = g.op("Add", [g.op("Gather", [wte, ids], "/transformer/wte"),
                     g.op("Gather", [wpe, pos], "/transformer/wpe")], "/transformer")
    # torch.tensor(finfo.min) → ConstantOfShape of an empty shape: a 0-d tensor
    min_s = g.op("ConstantOfShape", [g.const(np.zeros(0, np.int64), s)], s,
                 value=numpy_helper.from_array(np.array([F32_MIN], np.float32)))
    # layer 0 mask: tril(ones(seq, seq)).bool()
    sq = g.op("Concat", [seq, seq], s, axis=0)
    ones = g.op("ConstantOfShape", [sq], s,
                value=numpy_helper.from_array(np.array([1.0], np.float32)))
    tril = g.op("Trilu", [ones], s, upper=0)
    causal = g.op("Cast", [tril], s, to=TensorProto.BOOL)
    # layer 1 mask: full((seq, seq), min).masked_fill(arange < (arange + 1).view(seq, 1), 0)
    full = g.op("ConstantOfShape", [sq], s,
                value=numpy_helper.from_array(np.array([F32_MIN], np.float32)))
    rng_ = g.op("Range", [g.const(0, s, np.int64), seq0, g.const(1, s, np.int64)], s)
    r1 = g.op("Add", [rng_, g.const(1, s, np.int64)], s)
    r1 = g.op("Reshape", [r1, g.op("Concat", [seq, g.const([1], s, np.int64)], s, axis=0)],
              s)
    lt = g.op("Less", [rng_, r1], s)
    addmask = g.op("Where", [lt, g.const(0.0, s, np.float32), full], s)

    def conv1d(x, scope, cin, cout):
        """GPT-2 Conv1D: addmm on x.view(-1, cin), viewed back to (b, t, cout)."""
        sc = "/" + scope.replace(".", "/")
        b = g.dim(x, 0, sc)
        t = g.dim(x, 1, sc)
        x2 = g.op("Reshape", [x, g.const([-1, cin], sc, np.int64)], sc)
        w = g.init(f"{scope}.weight", g.randn(cin, cout, std=1.0 / math.sqrt(cin)))
        bias = g.init(f"{scope}.bias", g.randn(cout, std=0.05))
        y = g.op("Gemm", [x2, w, bias], sc, alpha=1.0, beta=1.0)
        shape = g.op("Concat", [b, t, g.const([cout], sc, np.int64)], sc, axis=0)
        return g.op("Reshape", [y, shape], sc)

    for li in range(2):
        ls = f"transformer.h.{li}"
        s = "/" + ls.replace(".", "/") + "/attn"
        x = g.layer_norm(h, f"{ls}.ln_1", H, decomposed=False)
        qkv = conv1d(x, f"{ls}.attn.c_attn", H, 3 * H)
        q, k, v = g.op("Split", [qkv, g.const([H, H, H], s, np.int64)], s, n_out=3, axis=2)
        q = g.op("Transpose", [split_heads(g, q, s, NH, HD)], s, perm=[0, 2, 1, 3])
        k = g.op("Transpose", [split_heads(g, k, s, NH, HD)], s, perm=[0, 2, 3, 1])
        v = g.op("Transpose", [split_heads(g, v, s, NH, HD)], s, perm=[0, 2, 1, 3])
        sc = g.op("MatMul", [q, k], s)
        sc = g.op("Div", [sc, g.const(math.sqrt(HD), s, np.float32)], s)
        if li == 0:
            sc = g.op("Where", [causal, sc, min_s], s)
        else:
            sc = g.op("Add", [sc, addmask], s)
        p = g.op("Softmax", [sc], s, axis=-1)
        ctx = merge_heads(g, g.op("MatMul", [p, v], s), s, H)
        a = conv1d(ctx, f"{ls}.attn.c_proj", H, H)
        h = g.op("Add", [a, h], f"/{ls.replace('.', '/')}")
        x = g.layer_norm(h, f"{ls}.ln_2", H, decomposed=False)
        f = conv1d(x, f"{ls}.mlp.c_fc", H, FF)
        # gelu_new: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        s = f"/{ls.replace('.', '/')}/mlp/act"
        c = g.op("Pow", [f, g.const(3.0, s, np.float32)], s)
        c = g.op("Mul", [g.const(0.044715, s, np.float32), c], s)
        c = g.op("Add", [f, c], s)
        c = g.op("Mul", [g.const(math.sqrt(2.0 / math.pi), s, np.float32), c], s)
        c = g.op("Tanh", [c], s)
        c = g.op("Add", [g.const(1.0, s, np.float32), c], s)
        f = g.op("Mul", [g.op("Mul", [g.const(0.5, s, np.float32), f], s), c], s)
        f = conv1d(f, f"{ls}.mlp.c_proj", FF, H)
        h = g.op("Add", [h, f], f"/{ls.replace('.', '/')}")
    h = g.layer_norm(h, "transformer.ln_f", H, decomposed=False)
    # tied lm_head: MatMul with the transposed token embedding
    wt = g.init("onnx::MatMul_lm_head", np.ascontiguousarray(wte_w.T))
    logits = g.op("MatMul", [h, wt], "/lm_head")
    out = g.output(logits, "logits", TensorProto.FLOAT, ["batch", "seq", V])
    feeds = {"input_ids": g.rng.integers(0, V, (2, 16)).astype(np.int64)}
    feeds1 = {"input_ids": g.rng.integers(0, V, (1, 5)).astype(np.int64)}
    return g.model([out]), [feeds, feeds1]


MODELS = [mlp, resnet, mobilenet, bert, gpt]


def check_masks(name, model, feeds, outputs):
    """Sanity-checks the attention masks: for `gpt`, changing the last token must not change
    earlier logits (causality); for `bert`, changing padded tokens must not change the
    hidden states of the real ones."""
    if name not in ("gpt", "bert"):
        return
    ids = feeds["input_ids"].copy()
    if name == "gpt":
        ids[:, -1] = (ids[:, -1] + 1) % 128
        keep = (slice(None), slice(0, -1))
    else:
        real = int(feeds["attention_mask"].sum())
        ids[:, real:] = (ids[:, real:] + 1) % 256
        keep = (slice(None), slice(0, real))
    changed = session(model).run(None, dict(feeds, input_ids=ids))[0]
    assert np.allclose(changed[keep], outputs[0][keep], atol=1e-5), f"{name}: mask leaks"
    assert not np.allclose(changed, outputs[0], atol=1e-5), f"{name}: check is vacuous"


def write(out_dir, name, model, feed_sets):
    """Checks the model, runs onnxruntime on each feed set, writes the model and the test
    data sets; returns the (shape-inferred) model and the outputs of set 0."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    onnx.save(model, os.path.join(d, "model.onnx"))
    sess = session(model)
    first = None
    for n, feeds in enumerate(feed_sets):
        outputs = sess.run(None, feeds)
        first = first if first is not None else outputs
        ds = os.path.join(d, f"test_data_set_{n}")
        os.makedirs(ds, exist_ok=True)
        for i, vi in enumerate(model.graph.input):
            t = numpy_helper.from_array(feeds[vi.name], vi.name)
            with open(os.path.join(ds, f"input_{i}.pb"), "wb") as f:
                f.write(t.SerializeToString())
        for i, (vi, arr) in enumerate(zip(model.graph.output, outputs)):
            assert np.isfinite(arr).all(), f"{name} set {n}: non-finite output"
            assert np.std(arr) > 1e-2, f"{name} set {n}: degenerate output"
            t = numpy_helper.from_array(arr, vi.name)
            with open(os.path.join(ds, f"output_{i}.pb"), "wb") as f:
                f.write(t.SerializeToString())
    return model, first


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "tests/zoo"
    total = 0
    for build in MODELS:
        name = build.__name__
        model, feed_sets = build()
        model, outputs = write(out_dir, name, model, feed_sets)
        check_masks(name, model, feed_sets[0], outputs)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        hist = collections.Counter(n.op_type for n in model.graph.node)
        size = sum(
            os.path.getsize(os.path.join(r, f))
            for r, _, fs in os.walk(os.path.join(out_dir, name)) for f in fs
        )
        total += size
        print(f"== {name}: {params} params, {len(model.graph.node)} nodes, {size} bytes")
        print("   ops: " + ", ".join(f"{k}×{v}" for k, v in sorted(hist.items())))
        for vi, o in zip(model.graph.output, outputs):
            std = float(np.std(o))
            print(f"   output {vi.name} {list(o.shape)}: std {std:.4g}, "
                  f"max|x| {float(np.abs(o).max()):.4g}")
            assert np.isfinite(o).all(), f"{name}: non-finite output"
            assert std > 1e-2, f"{name}: degenerate output (std {std})"
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
