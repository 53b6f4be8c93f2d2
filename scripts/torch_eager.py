#!/usr/bin/env python3
"""PyTorch eager baseline for the zoo models on a GPU: runs an ONNX model op by op with torch
operations on CUDA (a small ONNX -> torch interpreter covering the zoo's ops; weights and
float tensors on the GPU, shape arithmetic on the CPU as eager PyTorch code does it), checks
the outputs against the test data, and times end-to-end runs the way `gpu_zoo` times Kiln:
inputs uploaded from host memory, outputs downloaded, median and minimum of RUNS runs after
20 warm-ups.

    python3 scripts/torch_eager.py ZOO_DIR [RUNS] [MODEL...]

ZOO_DIR holds MODEL/model.onnx (or MODEL.onnx beside MODEL/) and MODEL/input_K.pb,
output_K.pb.
"""
import os
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

DEV = torch.device("cuda")


def attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def to_dev(x, like):
    return x.to(like.device) if isinstance(x, torch.Tensor) and x.device != like.device else x


def same_dev(*xs):
    dev = next((x.device for x in xs if x.device.type == "cuda"), None)
    return [x.to(dev) if dev is not None and x.device != dev else x for x in xs]


TYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64}


def run_node(n, ins):
    a = attrs(n)
    op = n.op_type
    if op in ("Add", "Sub", "Mul", "Div", "Pow", "Less", "Equal", "Greater"):
        x, y = same_dev(*ins)
        f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div, "Pow": torch.pow,
             "Less": torch.lt, "Equal": torch.eq, "Greater": torch.gt}[op]
        if op == "Div" and not x.is_floating_point():
            return [torch.div(x, y, rounding_mode="trunc")]
        return [f(x, y)]
    if op == "Where":
        c, x, y = same_dev(*ins)
        return [torch.where(c, x, y)]
    if op in ("Relu", "Tanh", "Erf", "Sqrt", "Sigmoid", "Neg", "Exp"):
        f = {"Relu": torch.relu, "Tanh": torch.tanh, "Erf": torch.erf, "Sqrt": torch.sqrt,
             "Sigmoid": torch.sigmoid, "Neg": torch.neg, "Exp": torch.exp}[op]
        return [f(ins[0])]
    if op == "HardSwish":
        return [F.hardswish(ins[0])]
    if op == "Clip":
        lo = ins[1].item() if len(ins) > 1 and ins[1] is not None else a.get("min")
        hi = ins[2].item() if len(ins) > 2 and ins[2] is not None else a.get("max")
        return [torch.clamp(ins[0], lo, hi)]
    if op == "Cast":
        return [ins[0].to(TYPES[a["to"]])]
    if op == "MatMul":
        x, y = same_dev(*ins)
        return [torch.matmul(x, y)]
    if op == "Gemm":
        x, w = ins[0], ins[1]
        if a.get("transA", 0):
            x = x.t()
        if a.get("transB", 0):
            w = w.t()
        y = a.get("alpha", 1.0) * (x @ w)
        if len(ins) > 2 and ins[2] is not None:
            y = y + a.get("beta", 1.0) * ins[2]
        return [y]
    if op == "Conv":
        pads = a.get("pads", [0, 0, 0, 0])
        x = ins[0]
        if pads[0] != pads[2] or pads[1] != pads[3]:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            pads = [0, 0, 0, 0]
        return [F.conv2d(x, ins[1], ins[2] if len(ins) > 2 else None, a.get("strides", [1, 1]),
                         (pads[0], pads[1]), a.get("dilations", [1, 1]), a.get("group", 1))]
    if op == "BatchNormalization":
        x, s, b, m, v = ins
        return [F.batch_norm(x, m, v, s, b, False, 0.0, a.get("epsilon", 1e-5))]
    if op == "MaxPool":
        p = a.get("pads", [0, 0, 0, 0])
        return [F.max_pool2d(ins[0], a["kernel_shape"], a.get("strides", a["kernel_shape"]), (p[0], p[1]))]
    if op == "GlobalAveragePool":
        return [ins[0].mean(dim=(2, 3), keepdim=True)]
    if op == "Flatten":
        ax = a.get("axis", 1)
        return [ins[0].reshape(int(np.prod(ins[0].shape[:ax])), -1)]
    if op == "Shape":
        s = torch.tensor(list(ins[0].shape), dtype=torch.int64)
        return [s[a.get("start", 0):a.get("end", None)]]
    if op == "Constant":
        return [to_torch(numpy_helper.to_array(a["value"]))]
    if op == "ConstantOfShape":
        v = numpy_helper.to_array(a["value"]) if "value" in a else np.zeros(1, np.float32)
        t = torch.full(ins[0].reshape(-1).tolist(), v.item(), dtype=torch.from_numpy(v).dtype)
        return [t.to(DEV) if t.is_floating_point() else t]
    if op == "Range":
        return [torch.arange(ins[0].item(), ins[1].item(), ins[2].item(), dtype=ins[0].dtype)]
    if op == "Gather":
        ax = a.get("axis", 0)
        data, idx = ins
        idx = to_dev(idx, data)
        idx = torch.where(idx < 0, idx + data.shape[ax], idx)
        if idx.dim() == 0:
            return [data.select(ax, int(idx))]
        return [torch.index_select(data, ax, idx.reshape(-1)).reshape(
            data.shape[:ax] + idx.shape + data.shape[ax + 1:])]
    if op == "Unsqueeze":
        axes = ins[1].reshape(-1).tolist() if len(ins) > 1 else a["axes"]
        y = ins[0]
        for ax in sorted(ax % (y.dim() + len(axes)) for ax in axes):
            y = y.unsqueeze(ax)
        return [y]
    if op == "Squeeze":
        axes = ins[1].reshape(-1).tolist() if len(ins) > 1 else a.get("axes")
        return [ins[0].squeeze(tuple(axes)) if axes else ins[0].squeeze()]
    if op == "Concat":
        xs = same_dev(*ins)
        return [torch.cat(xs, dim=a["axis"])]
    if op == "Reshape":
        shape = ins[1].reshape(-1).tolist()
        shape = [ins[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return [ins[0].reshape(shape)]
    if op == "Transpose":
        perm = a.get("perm", list(range(ins[0].dim()))[::-1])
        return [ins[0].permute(perm)]
    if op == "Slice":
        x = ins[0]
        starts, ends = ins[1].reshape(-1).tolist(), ins[2].reshape(-1).tolist()
        axes = ins[3].reshape(-1).tolist() if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = ins[4].reshape(-1).tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        idx = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps):
            n_ = x.shape[ax]
            s = max(min(s + n_ if s < 0 else s, n_), 0)
            e = max(min(e + n_ if e < 0 else e, n_), 0)
            idx[ax] = slice(s, e, st)
        return [x[tuple(idx)]]
    if op == "Split":
        ax = a.get("axis", 0)
        sizes = ins[1].reshape(-1).tolist() if len(ins) > 1 and ins[1] is not None else a.get("split")
        if sizes is None:
            sizes = ins[0].shape[ax] // len(n.output)
        return list(torch.split(ins[0], sizes, dim=ax))
    if op == "Softmax":
        return [torch.softmax(ins[0], dim=a.get("axis", -1))]
    if op == "ReduceMean":
        axes = ins[1].reshape(-1).tolist() if len(ins) > 1 else a.get("axes")
        return [ins[0].mean(dim=tuple(axes), keepdim=bool(a.get("keepdims", 1)))]
    if op == "LayerNormalization":
        ax = a.get("axis", -1) % ins[0].dim()
        return [F.layer_norm(ins[0], ins[0].shape[ax:], ins[1], ins[2] if len(ins) > 2 else None,
                             a.get("epsilon", 1e-5))]
    if op == "Trilu":
        k = ins[1].item() if len(ins) > 1 else 0
        return [torch.triu(ins[0], k) if a.get("upper", 1) else torch.tril(ins[0], k)]
    raise NotImplementedError(op)


def to_torch(arr):
    t = torch.from_numpy(np.array(arr))
    return t.to(DEV) if t.is_floating_point() else t


class Eager:
    def __init__(self, path):
        m = onnx.load(path)
        self.g = m.graph
        self.consts = {i.name: to_torch(numpy_helper.to_array(i)) for i in self.g.initializer}
        self.inputs = [i.name for i in self.g.input if i.name not in self.consts]

    @torch.no_grad()
    def __call__(self, feeds):
        env = dict(self.consts)
        env.update(feeds)
        for n in self.g.node:
            outs = run_node(n, [env[x] if x else None for x in n.input])
            for name, v in zip(n.output, outs):
                env[name] = v
        return [env[o.name] for o in self.g.output]


def main():
    zoo = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    models = sys.argv[3:] or ["mlp", "resnet", "mobilenet", "bert", "gpt"]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    print("| model | max rel. error | torch eager p50 ms | min ms |")
    print("|---|---|---|---|")
    for name in models:
        d = os.path.join(zoo, name)
        path = os.path.join(d, "model.onnx")
        if not os.path.exists(path):
            path = os.path.join(zoo, name + ".onnx")
        model = Eager(path)
        ins = [numpy_helper.to_array(onnx.load_tensor(os.path.join(d, f"input_{k}.pb")))
               for k in range(len(model.inputs))]
        want = []
        k = 0
        while os.path.exists(os.path.join(d, f"output_{k}.pb")):
            want.append(numpy_helper.to_array(onnx.load_tensor(os.path.join(d, f"output_{k}.pb"))))
            k += 1

        def run():
            feeds = {n: to_torch(x) for n, x in zip(model.inputs, ins)}
            return [o.cpu().numpy() for o in model(feeds)]

        got = run()
        err = max(float(np.max(np.abs(g.astype(np.float64) - w) / np.maximum(np.abs(w), 1.0)))
                  for g, w in zip(got, want))
        for _ in range(20):
            run()
        torch.cuda.synchronize()
        t = []
        for _ in range(runs):
            s = time.perf_counter()
            run()
            t.append((time.perf_counter() - s) * 1e3)
        t.sort()
        print(f"| {name} | {err:.2e} | {t[len(t) // 2]:.4f} | {t[0]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
