"""The op input table (mljax.mil.opspec): transcribed faithfully, obeyed by every op
implementation, enforced by the loader."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mljax
import mljax.ops  # noqa: F401 - registers every implementation
from mljax.errors import ModelFormatError
from mljax.mil.opspec import check_op_inputs, input_order, op_inputs
from mljax.ops._registry import registry

ROOT = Path(__file__).resolve().parents[2]

# Registered ops the table does not define, and why.
_NOT_IN_TABLE = {
    "write_state": "iOS18 state write that coremltools keeps outside its core opset",
    "coreml_update_state": "a coremltools dialect op (not core opset); programs written by coremltools contain it",
}
# Implementations whose positional order differs from MIL's, and why that is harmless.
_ORDER_EXCEPTIONS = {
    "quantize": "zero_point (optional) must follow scale (required) in Python; the lowering passes both by name",
    "dequantize": "zero_point (optional) must follow scale (required) in Python; the lowering passes both by name",
}


def _impl_inputs(spec):
    return [*spec.tensor_inputs, *([spec.variadic] if spec.variadic else []), *spec.static_inputs]


def _pairs():
    return [(op, opset, spec) for op, per in sorted(registry().items()) for opset, spec in sorted(per.items())]


def test_transcription_is_current():
    """The generated table is what the transcription script makes from coremltools' definitions."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "transcribe_op_specs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_implementation_has_a_table_entry():
    missing = [(op, opset) for op, opset, _ in _pairs() if op_inputs(op, opset) is None and op not in _NOT_IN_TABLE]
    assert not missing


def test_implementations_take_exactly_the_table_inputs():
    """No input a program may carry is ignored by an implementation, and none is invented."""
    bad = []
    for op, opset, spec in _pairs():
        table = op_inputs(op, opset)
        if table is None:
            continue
        if set(_impl_inputs(spec)) != {i.name for i in table}:
            bad.append((op, opset, sorted(set(_impl_inputs(spec)) ^ {i.name for i in table})))
    assert not bad


def test_tensor_inputs_in_mil_order():
    bad = []
    for op, opset, spec in _pairs():
        names = input_order(op, opset)
        if not names or op in _ORDER_EXCEPTIONS:
            continue
        mine = [n for n in (*spec.tensor_inputs, spec.variadic) if n]
        if [n for n in names if n in mine] != mine:
            bad.append((op, opset, mine, names))
    assert not bad


# Inputs MIL lets vary at run time that mljax needs before tracing: each sets an output's shape,
# and XLA compiles static shapes.  MLModel re-traces once per value when a model input feeds one
# (Stage.static_inputs); a value computed inside the program is an OpError naming the op.
_SHAPE_SETTING = {
    ("fill", "shape"), ("make_list", "init_length"), ("make_list", "elem_shape"),
    ("one_hot", "one_hot_vector_size"), ("pad", "pad"), ("random_bernoulli", "shape"),
    ("random_normal", "shape"), ("random_uniform", "shape"), ("range_1d", "start"), ("range_1d", "end"),
    ("range_1d", "step"), ("reshape", "shape"), ("reshape_like", "begins"), ("reshape_like", "ends"),
    ("reshape_like", "end_masks"), ("resize", "shape"), ("slice_by_size", "size"), ("tile", "reps"),
}


def test_constness_deviations_are_the_designed_ones():
    """An implementation may accept run-time values where MIL demands constants (constant float
    tensors are weights: trainable jit arguments), never the reverse, except for the inputs that
    set an output shape (``_SHAPE_SETTING``)."""
    bad = []
    for op, opset, spec in _pairs():
        for inp in op_inputs(op, opset) or ():
            if not inp.const and inp.name in spec.static_inputs and (op, inp.name) not in _SHAPE_SETTING:
                bad.append((op, opset, inp.name))
    assert not bad


def test_table_matches_hand_checked_facts():
    """A few entries checked by hand against coremltools' documentation of the ops."""
    conv = {i.name: i for i in op_inputs("conv", 17)}
    assert input_order("conv", 15) == ["x", "weight", "bias", "strides", "pad_type", "pad", "dilations", "groups"]
    assert conv["pad_type"].const and conv["pad_type"].optional and not conv["x"].optional
    assert not conv["bias"].const          # iOS17 lets conv's bias vary
    assert {i.name: i for i in op_inputs("conv", 15)}["bias"].const
    assert {i.name: i for i in op_inputs("softmax", 15)}["axis"].default == -1
    assert op_inputs("no_such_op", 17) is None and op_inputs("conv", 14) is None


def test_unknown_and_missing_inputs_are_format_errors():
    check_op_inputs("relu", 15, {"x": 1}, "op r")   # fine
    with pytest.raises(ModelFormatError, match=r"inputs \['alpha'\] that it does not take"):
        check_op_inputs("relu", 15, {"x": 1, "alpha": 2}, "op r")
    with pytest.raises(ModelFormatError, match=r"required inputs \['x'\]"):
        check_op_inputs("relu", 15, {}, "op r")


def test_loader_rejects_an_op_with_an_input_its_opset_lacks(tmp_path):
    """A program whose op carries an input the op does not take fails at load with a
    ModelFormatError naming the op (before: the input was silently ignored)."""
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.softmax(x=x, axis=-1, name="probs")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16)
    path = tmp_path / "m.mlpackage"
    model.save(str(path))
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    out = mljax.MLModel(str(path)).predict({"x": x})["probs"]
    np.testing.assert_allclose(out, np.exp(x) / np.exp(x).sum(-1, keepdims=True), rtol=1e-5)

    spec = model.get_spec()
    block = spec.mlProgram.functions["main"].block_specializations["CoreML6"]
    softmax = next(op for op in block.operations if op.type == "softmax")
    softmax.inputs["beta"].CopyFrom(softmax.inputs["axis"])     # an input softmax does not take
    bad = tmp_path / "bad.mlpackage"
    ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(str(bad))
    with pytest.raises(ModelFormatError, match=r"softmax \(iOS16\) has inputs \['beta'\] that it does not take"):
        mljax.MLModel(str(bad))
