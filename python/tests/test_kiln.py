"""The kiln Python package against onnxruntime on the zoo models, and bit-identity with the
Rust API (the `kiln run` command line) on the same artifact."""

import os
import subprocess
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import kiln

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ZOO = os.path.join(ROOT, "tests", "zoo")


def load_pb(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return onnx.numpy_helper.to_array(t)


def zoo_case(name):
    d = os.path.join(ZOO, name)
    model = os.path.join(d, "model.onnx")
    m = onnx.load(model)
    init = {i.name for i in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in init]
    data = os.path.join(d, "test_data_set_0")
    inputs = {n: load_pb(os.path.join(data, f"input_{k}.pb")) for k, n in enumerate(names)}
    return model, inputs


@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_matches_onnxruntime(name, tmp_path):
    model, inputs = zoo_case(name)
    art = kiln.compile(model, target="cpu", shapes={k: list(v.shape) for k, v in inputs.items()})
    path = str(tmp_path / "m.kiln")
    art.save(path)
    for sess in (kiln.load(art), kiln.load(path)):
        outs = sess.run(inputs)
        ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, inputs)
        assert len(outs) == len(ref)
        for a, b in zip(outs, ref):
            assert a.shape == b.shape and a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bit_identical_with_rust(tmp_path):
    model, inputs = zoo_case("mlp")
    (name, x), = inputs.items()
    art = kiln.compile(model, shapes={name: list(x.shape)})
    path = str(tmp_path / "mlp.kiln")
    art.save(path)
    ours = kiln.load(path).run([x])[0]
    np.save(tmp_path / "x.npy", x)
    exe = os.environ.get("KILN_BIN", os.path.join(ROOT, "target", "release", "kiln"))
    subprocess.run(
        [exe, "run", path, "--input", f"{name}={tmp_path / 'x.npy'}", "-o", str(tmp_path / "y.npz"),
         "--threads", "1"], check=True, capture_output=True)
    rust = np.load(tmp_path / "y.npz")
    (rust_y,) = list(rust.values())
    assert rust_y.tobytes() == ours.tobytes()


def test_threads_and_errors(tmp_path):
    model, inputs = zoo_case("mlp")
    (name, x), = inputs.items()
    sess = kiln.load(kiln.compile(model, shapes={name: list(x.shape)}))
    want = sess.run(inputs)[0]
    bad = []

    def work():
        for _ in range(200):
            if not np.array_equal(sess.run([x])[0], want):
                bad.append(1)

    ts = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not bad
    # non-contiguous input: copied, same answer
    xt = np.asfortranarray(x)
    assert np.array_equal(sess.run([xt])[0], want)
    with pytest.raises(kiln.KilnError):
        sess.run([x[:1]])
    with pytest.raises(ValueError):
        kiln.compile(model, target="gpu")


class DLPackOnly:
    """A foreign tensor type that only speaks DLPack (as a torch or JAX CPU tensor would)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_in_and_out():
    model, inputs = zoo_case("mlp")
    (name, x), = inputs.items()
    sess = kiln.load(kiln.compile(model, shapes={name: list(x.shape)}))
    want = sess.run([x])[0]
    # input through DLPack (zero-copy view), output exported through DLPack without a copy
    got = sess.run({name: DLPackOnly(x)})[0]
    assert np.array_equal(got, want)
    view = np.from_dlpack(got)
    assert np.shares_memory(view, got)


def test_compile_torch():
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    x = torch.randn(2, 8)
    art = kiln.compile_torch(m, (x,))
    y = kiln.load(art).run([x.numpy()])[0]
    np.testing.assert_allclose(y, m(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_data_dependent_output_shapes():
    """A Reshape whose shape is an input: the output shape is known only after running."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])
    s = helper.make_tensor_value_info("s", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "s"], ["y"])],
        "dyn", [x, s], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = kiln.load(kiln.compile(model.SerializeToString()))
    xv = np.arange(12, dtype=np.float32).reshape(2, 6) - 6
    for shape in ([3, 4], [12, 1], [-1, 6]):
        (out,) = sess.run({"x": xv, "s": np.array(shape, dtype=np.int64)})
        np.testing.assert_array_equal(out, np.maximum(xv, 0).reshape(shape))
