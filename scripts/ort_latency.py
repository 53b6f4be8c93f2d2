"""Mean onnxruntime latency (CPU, given threads) of a zoo model on its stored inputs, for
side-by-side comparison with `kiln run --repeat N` on the same machine.

Usage: python scripts/ort_latency.py tests/zoo/bert [RUNS] [THREADS]
"""
import glob
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def main():
    d = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(os.path.join(d, "model.onnx"), so, providers=["CPUExecutionProvider"])
    files = sorted(glob.glob(os.path.join(d, "test_data_set_0", "input_*.pb")))
    feeds = {}
    for i, f in zip(s.get_inputs(), files):
        t = onnx.TensorProto()
        t.ParseFromString(open(f, "rb").read())
        feeds[i.name] = numpy_helper.to_array(t)
    for _ in range(20):
        s.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(runs):
        s.run(None, feeds)
    dt = (time.perf_counter() - t0) / runs
    print(f"onnxruntime {ort.__version__} {d}: mean latency over {runs} runs: {dt * 1e3:.3f} ms ({threads} thread)")


if __name__ == "__main__":
    main()
