"""Shared check of the layer tests: a model compiled by kiln for the CPU gives onnxruntime's
outputs on the same feeds."""

import numpy as np
import onnxruntime as ort

import kiln


def assert_matches_onnxruntime(path, feeds, rtol=1e-4, atol=1e-5):
    """Runs `path` with onnxruntime and with kiln (compiled for the CPU) on `feeds` and
    compares every output (non-finite values must be equal)."""
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)
    ours = kiln.load(kiln.compile(path, target="cpu")).run(feeds)
    assert len(ours) == len(ref)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape
        np.testing.assert_allclose(a, r, rtol=rtol, atol=atol)
