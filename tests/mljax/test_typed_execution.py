"""Typed execution: what ``compute_precision`` computes in, checked against NumPy references."""
import numpy as np
import pytest

import mljax
from mljax.errors import InputError
from mljax.lower import resolve_compute_precision
from helpers import convert_mil

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

W = (np.arange(48, dtype=np.float32).reshape(6, 8) - 20) / 7.3
B = np.linspace(-1, 1, 6).astype(np.float32)


def _program():
    @mb.program(input_specs=[mb.TensorSpec((2, 8), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        h = mb.linear(x=x, weight=W, bias=B)
        return mb.softmax(x=mb.mul(x=h, y=np.float32(3.1)), axis=-1, name="p")
    return prog


@pytest.fixture(scope="module")
def fp16_path():
    return convert_mil(_program, fp16=True)


def _reference(x, dtype):
    """The program computed by NumPy with fp16-rounded weights, every intermediate in ``dtype``."""
    w, b = W.astype(np.float16).astype(dtype), B.astype(np.float16).astype(dtype)
    h = (x.astype(np.float16).astype(dtype) @ w.T + b).astype(dtype)
    h = (h * dtype(np.float16(3.1))).astype(dtype)
    e = np.exp((h - h.max(-1, keepdims=True)).astype(np.float32)).astype(dtype)
    return (e / e.sum(-1, keepdims=True, dtype=np.float32).astype(dtype)).astype(dtype)


def test_resolution_by_platform():
    assert resolve_compute_precision(None, "cpu") == "float32"
    assert resolve_compute_precision("auto", "cpu") == "float32"
    assert resolve_compute_precision("auto", "gpu") == "declared"
    assert resolve_compute_precision("float16", "cpu") == "declared"
    assert resolve_compute_precision("float32", "gpu") == "float32"
    with pytest.raises(InputError, match="compute_precision must be one of"):
        resolve_compute_precision("half")


def test_unknown_precision_is_rejected_at_construction(fp16_path):
    with pytest.raises(InputError, match="found 'bf32'"):
        mljax.MLModel(fp16_path, compute_precision="bf32")


def test_auto_on_cpu_computes_fp16_programs_in_fp32(fp16_path):
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    auto, fp32, declared = (mljax.MLModel(fp16_path, compute_precision=c) for c in (None, "float32", "declared"))
    assert {str(w.dtype) for w in auto.weights.values()} == {"float32"}
    assert {str(w.dtype) for w in declared.weights.values()} == {"float16"}
    got_auto, got_fp32, got_declared = (m.predict({"x": x})["p"] for m in (auto, fp32, declared))
    # the declared output dtype is kept in every mode
    assert got_auto.dtype == got_fp32.dtype == got_declared.dtype
    np.testing.assert_array_equal(got_auto, got_fp32)
    # auto = fp32 arithmetic on fp16-rounded weights; declared = fp16 arithmetic
    ref32, ref16 = _reference(x, np.float32), _reference(x, np.float16)
    np.testing.assert_allclose(got_auto.astype(np.float32), ref32.astype(got_auto.dtype).astype(np.float32),
                               atol=1e-3)
    np.testing.assert_allclose(got_declared.astype(np.float32), ref16.astype(np.float32), atol=4e-3)
    # the two modes really differ (fp16 intermediate rounding), and auto is the closer to fp32
    exact = _reference(x, np.float64)
    assert np.abs(got_auto - exact).max() < np.abs(got_declared.astype(np.float64) - exact).max()


@pytest.mark.parametrize("precision", ["auto", "declared"])
def test_float32_values_of_float16_inputs_are_rounded_to_float16(precision):
    """MLModel leaves the rounding of float32 values for a float16 input to the compiled function
    (NumPy's conversion is slow); the values are still rounded first: sin(1000 x) shows any
    difference, and feeding the rounded values gives the same outputs, single and listed."""
    @mb.program(input_specs=[mb.TensorSpec((64,), dtype=types.fp16)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.sin(x=mb.mul(x=x, y=np.float16(1000.0)), name="y")
    m = mljax.MLModel(convert_mil(prog, fp16=True), compute_precision=precision)
    assert m.input_description["x"].dtype == np.float16
    x = np.random.default_rng(1).uniform(-1, 1, 64).astype(np.float32)
    x16 = x.astype(np.float16)
    assert np.abs(x16.astype(np.float32) - x).max() > 1e-5          # rounding matters here
    got, rounded = m.predict({"x": x})["y"], m.predict({"x": x16})["y"]
    np.testing.assert_array_equal(got, rounded)
    for out in m.predict([{"x": x}, {"x": x}]):
        np.testing.assert_array_equal(out["y"], rounded)
    if precision == "auto":       # fp32 arithmetic on the rounded input
        ref = np.sin(x16.astype(np.float64) * 1000.0)
    else:                         # the product rounded to fp16 too
        ref = np.sin((x16 * np.float16(1000.0)).astype(np.float64))
    unrounded = np.sin(x.astype(np.float64) * 1000.0)
    assert np.abs(got.astype(np.float64) - ref).max() < 2e-3 < 0.05 < np.abs(unrounded - ref).max()
