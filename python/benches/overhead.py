"""Per-call overhead of kiln.Session.run from Python on a tiny model (one Add of 16 floats,
tests/data/add16.onnx), beside onnxruntime's InferenceSession.run on the same model.

    PYTHONPATH=<kiln package> .venv/bin/python python/benches/overhead.py
"""

import os
import timeit

import numpy as np
import onnxruntime as ort

import kiln

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "add16.onnx")
N = 20000

a = np.ones(16, np.float32)
b = np.full(16, 2.0, np.float32)
sess = kiln.load(kiln.compile(MODEL))
feed = {"a": a, "b": b}
assert np.array_equal(sess.run(feed)[0], a + b)
so = ort.SessionOptions()
so.intra_op_num_threads = 1
o = ort.InferenceSession(MODEL, so, providers=["CPUExecutionProvider"])


def best(f):
    return min(timeit.repeat(f, number=N, repeat=5)) / N * 1e6


print(f"add16 per-call time from Python, best of 5 x {N} calls:")
print(f"  kiln Session.run(dict)      {best(lambda: sess.run(feed)):6.2f} us")
print(f"  kiln Session.run([a, b])    {best(lambda: sess.run([a, b])):6.2f} us")
print(f"  onnxruntime run(None, dict) {best(lambda: o.run(None, feed)):6.2f} us")
