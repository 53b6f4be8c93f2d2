"""Kiln: compile ONNX models to fast CPU artifacts and run them on numpy arrays.

    import kiln
    art = kiln.compile("model.onnx", target="cpu", shapes={"x": [2, 32]})
    sess = kiln.load(art)            # or kiln.load("model.kiln")
    outs = sess.run({"x": x})        # list of numpy arrays, in output order
"""

import numpy as _np

from ._native import Artifact, KilnError, compile
from ._native import Session as _Session

__all__ = ["Artifact", "KilnError", "Session", "compile", "compile_torch", "load"]


class Session:
    """A loaded model. `run` takes a dict name -> array (or a list in input order) and returns
    the outputs as a list of numpy arrays; contiguous inputs of the model's dtype are read in
    place (no copy). Thread-safe; the GIL is released while the model runs."""

    def __init__(self, artifact, threads=1):
        self._s = _Session(artifact, threads)
        self.input_names = self._s.input_names
        self.output_names = self._s.output_names
        self._run = self._s.run_arrays

    def run(self, inputs):
        """Runs the model. Inputs: numpy arrays, or any CPU tensor implementing the DLPack
        protocol (`__dlpack__`, e.g. torch tensors), taken without a copy when contiguous.
        Outputs are numpy arrays, which implement DLPack too (`torch.from_dlpack(out)`
        shares their memory)."""
        if isinstance(inputs, dict):
            try:
                inputs = [inputs[n] for n in self.input_names]
            except KeyError as e:
                raise ValueError(f"missing input {e}; the model takes {self.input_names}") from None
        return self._run([_np.ascontiguousarray(_as_numpy(x)) for x in inputs])


def _as_numpy(x):
    """A numpy view of `x`: numpy arrays as they are, DLPack producers through
    `numpy.from_dlpack` (zero-copy), anything else through `numpy.asarray`."""
    if isinstance(x, _np.ndarray):
        return x
    if hasattr(x, "__dlpack__"):
        return _np.from_dlpack(x)
    return _np.asarray(x)


def load(artifact, threads=1):
    """A Session for an `Artifact` or an artifact file path."""
    return Session(artifact, threads)


def compile_torch(module, example_inputs, target="cpu", opset=17, **kwargs):
    """Exports a torch.nn.Module with torch.onnx.export (inputs named input_0, ...) and
    compiles it; extra keyword arguments go to `compile`."""
    import io

    import torch  # noqa: F401  (ImportError if torch is missing)

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    buf = io.BytesIO()
    names = [f"input_{i}" for i in range(len(example_inputs))]
    torch.onnx.export(module, tuple(example_inputs), buf, input_names=names, opset_version=opset)
    return compile(buf.getvalue(), target=target, **kwargs)
