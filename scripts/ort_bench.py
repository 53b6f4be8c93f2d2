"""onnxruntime worker for `kiln bench` (the kiln binary embeds this file and runs it).

Usage: python ort_bench.py MODEL.onnx INPUTS.npz THREADS OUTDIR

Loads the model on the CPU provider with intra_op_num_threads=THREADS,
inter_op_num_threads=1 and sequential execution, feeds it the inputs of INPUTS.npz (keys are
the model's input names), runs it once, writes the outputs to OUTDIR/output_K.npy and prints
one JSON line {"ready": ...}. Then it serves requests on stdin, one per line, answering each
with one JSON line:

  run K   -> {"times": [s, ...]}   K timed runs, seconds per run (time.perf_counter around
                                   each sess.run, so Python binding overhead is included)
  mem     -> {"peak_rss_growth_kib": N, "exact": bool}
  quit    -> exits

Memory: before creating the session (after importing onnxruntime and numpy and reading the
inputs) the worker resets its peak RSS (writes 5 to /proc/self/clear_refs) and records VmRSS;
"mem" reports VmHWM minus that baseline: the peak resident growth of session creation plus
every run so far. If the reset is not permitted, the baseline is the earlier VmHWM and the
figure is a lower bound ("exact": false).

Errors are reported as {"error": "..."} and exit status 1.
"""
import json
import os
import re
import sys
import time


def status_kib(key):
    with open("/proc/self/status") as f:
        m = re.search(key + r":\s+(\d+)\s+kB", f.read())
    return int(m.group(1)) if m else None


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return status_kib("VmRSS"), True
    except OSError:
        return status_kib("VmHWM"), False


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    if len(sys.argv) != 5:
        say({"error": "usage: ort_bench.py MODEL.onnx INPUTS.npz THREADS OUTDIR"})
        return 1
    model, inputs, threads, outdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        say({"error": f"cannot import onnxruntime/numpy with {sys.executable}: {e}"})
        return 1
    with np.load(inputs) as z:
        arrays = {k: z[k] for k in z.files}
    base, exact = reset_peak()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            if i.name not in arrays:
                raise ValueError(f"no array for input '{i.name}' in {inputs}")
            feeds[i.name] = arrays[i.name]
        outs = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - reported to kiln as one line
        say({"error": f"onnxruntime: {e}"})
        return 1
    for k, o in enumerate(outs):
        np.save(os.path.join(outdir, f"output_{k}.npy"), np.ascontiguousarray(o))
    say({"ready": True, "version": ort.__version__, "outputs": [o.name for o in sess.get_outputs()]})
    run = sess.run
    clock = time.perf_counter
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run" and len(cmd) == 2:
            times = []
            for _ in range(int(cmd[1])):
                t0 = clock()
                run(None, feeds)
                times.append(clock() - t0)
            say({"times": times})
        elif cmd[0] == "mem":
            hwm = status_kib("VmHWM")
            growth = None if hwm is None or base is None else max(hwm - base, 0)
            say({"peak_rss_growth_kib": growth, "exact": exact})
        elif cmd[0] == "quit":
            return 0
        else:
            say({"error": f"unknown request '{line.strip()}'"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
