"""Shared test helpers: build real models with coremltools and run them on mljax."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_TMP = Path(tempfile.mkdtemp(prefix="mljax-tests-"))
_COUNTER = [0]


def tmp_path_for(name: str) -> Path:
    _COUNTER[0] += 1
    return _TMP / f"{_COUNTER[0]:05d}-{name}"


def target(opset: str):
    import coremltools as ct
    return getattr(ct.target, opset)


def convert_mil(build_fn, *, opset: str = "iOS17", fp16: bool = False):
    """Convert a ``@mb.program`` (or a function returning one) into a saved .mlpackage path."""
    import coremltools as ct
    prog = build_fn() if callable(build_fn) and not hasattr(build_fn, "functions") else build_fn
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target(opset),
                       compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)
    path = tmp_path_for("model.mlpackage")
    model.save(str(path))
    return path


def run_mil(build_fn, inputs: dict, *, opset: str = "iOS17", fp16: bool = False,
            compute_precision="declared") -> dict:
    """Build a MIL program with coremltools, save it, load it in mljax and predict ``inputs``.

    ``build_fn`` is a ``@mb.program``-decorated program or a zero-argument function returning one.
    Returns mljax's outputs (dict name -> NumPy array).  Op tests compute in the declared types
    (``"declared"``: fp16 ops in fp16, as the op's semantics define them) unless told otherwise.
    """
    import mljax
    path = convert_mil(build_fn, opset=opset, fp16=fp16)
    model = mljax.MLModel(path, compute_precision=compute_precision)
    return model.predict(inputs)


def only(outputs: dict) -> np.ndarray:
    """The single output of a one-output model."""
    assert len(outputs) == 1, list(outputs)
    return next(iter(outputs.values()))


def assert_close(actual, expected, *, dtype=np.float32, rtol=None, atol=None):
    """Compare at per-dtype tolerances (fp16 looser)."""
    dt = np.dtype(dtype)
    if rtol is None:
        rtol = 2e-2 if dt == np.float16 else 1e-5 if dt.kind == "f" else 0
    if atol is None:
        atol = 2e-2 if dt == np.float16 else 1e-5 if dt.kind == "f" else 0
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol)


def accumulator_program():
    """An iOS18 stateful program: ``out = acc + x`` and the state ``acc`` becomes ``out`` (fp16)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb, types

    @mb.program(input_specs=[mb.StateTensorSpec((3,), dtype=types.fp16), mb.TensorSpec((3,), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(acc, x):
        y = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=y)
        return mb.identity(x=y, name="out")
    return prog


def tanh_projection_program(proj: np.ndarray):
    """An iOS17 feature extractor ``emb = tanh(x @ proj)`` for a 1-D input of ``proj.shape[0]`` values."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb, types

    @mb.program(input_specs=[mb.TensorSpec(shape=(proj.shape[0],), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def features(x):
        return mb.tanh(x=mb.matmul(x=x, y=proj), name="emb")
    return features


def convert_torch_twins(net, example, folder: Path) -> dict:
    """A torch module converted by coremltools to an fp32 ML program (iOS16) and a NeuralNetwork:
    ``{"mlprogram": path, "neuralnetwork": path}`` under ``folder`` (input ``x``, output ``y``)."""
    import coremltools as ct
    import torch
    traced = torch.jit.trace(net, example)
    out = {}
    for kind, name, extra in (("mlprogram", "m.mlpackage", {"minimum_deployment_target": ct.target.iOS16,
                                                            "compute_precision": ct.precision.FLOAT32}),
                              ("neuralnetwork", "m.mlmodel", {})):
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=tuple(example.shape))],
                        outputs=[ct.TensorType(name="y")], convert_to=kind, **extra)
        out[kind] = Path(folder) / name
        ml.save(str(out[kind]))
    return out
