"""quantize / dequantize (iOS17) against NumPy references."""
from __future__ import annotations

import numpy as np
import pytest

from mljax.errors import OpError
from mljax.ops.quantization import dequantize, quantize
from tests.helpers import assert_close

RNG = np.random.default_rng(4)
RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _params(shape, axis, out_dtype, with_zp):
    n = 1 if axis is None else shape[axis]
    scale = RNG.uniform(0.01, 0.1, n).astype(np.float32)
    zp = RNG.integers(*RANGES[out_dtype], n).astype(out_dtype) if with_zp else None
    if axis is None:
        scale = scale[0]
        zp = None if zp is None else zp[0]
    return scale, zp


def _bshape(p, shape, axis):
    if axis is None or np.ndim(p) == 0:
        return np.asarray(p)
    b = [1] * len(shape)
    b[axis] = -1
    return np.asarray(p).reshape(b)


@pytest.mark.parametrize("out_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("with_zp", [True, False])
@pytest.mark.parametrize("in_dtype", [np.float32, np.float16])
def test_quantize(out_dtype, axis, with_zp, in_dtype):
    shape = (3, 4, 5)
    x = RNG.uniform(-8, 8, shape).astype(in_dtype)
    scale, zp = _params(shape, axis, out_dtype, with_zp)
    q = x.astype(np.float64) / _bshape(scale, shape, axis).astype(np.float64)
    q = np.rint(q) + (0 if zp is None else _bshape(zp, shape, axis).astype(np.float64))
    expected = np.clip(q, *RANGES[out_dtype]).astype(out_dtype)
    out = np.asarray(quantize(x, scale, zp, axis=axis, output_dtype=out_dtype))
    assert out.dtype == np.dtype(out_dtype)
    # fp16 inputs may round differently exactly at .5 boundaries after fp32 division
    assert np.max(np.abs(out.astype(int) - expected.astype(int))) <= (1 if in_dtype == np.float16 else 0)


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0], np.float32)
    np.testing.assert_array_equal(quantize(x, np.float32(1.0), output_dtype="int8"),
                                  [0, 2, 2, 0, -2, 127, -128])
    np.testing.assert_array_equal(quantize(x, np.float32(1.0), np.uint8(10), output_dtype="uint8"),
                                  [10, 12, 12, 10, 8, 255, 0])


@pytest.mark.parametrize("in_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("axis", [None, 0, 2])
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_zp", [True, False])
def test_dequantize(in_dtype, axis, scale_dtype, with_zp):
    shape = (3, 4, 5)
    x = RNG.integers(*RANGES[in_dtype], shape).astype(in_dtype)
    scale, zp = _params(shape, axis, in_dtype, with_zp)
    scale = np.asarray(scale).astype(scale_dtype)
    expected = (x.astype(np.float64) - (0 if zp is None else _bshape(zp, shape, axis).astype(np.float64))) \
        * _bshape(scale, shape, axis).astype(np.float64)
    out = np.asarray(dequantize(x, scale, zp, axis=axis))
    assert out.dtype == scale_dtype
    assert_close(out, expected, dtype=scale_dtype)


def test_errors():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(OpError, match="output_dtype"):
        quantize(x, np.float32(1), output_dtype="int16")
    with pytest.raises(OpError, match="axis"):
        quantize(x, np.ones(3, np.float32), output_dtype="int8")


def test_e2e_quantize_dequantize():
    from coremltools.converters.mil.mil import Builder as mb, types
    from tests.helpers import run_mil, target

    x = RNG.uniform(-3, 3, (2, 3)).astype(np.float32)
    scale = np.array([0.02, 0.05, 0.1], np.float32)
    zp = np.array([3, -2, 0], np.int8)

    @mb.program(input_specs=[mb.TensorSpec((2, 3), types.fp32)], opset_version=target("iOS17"))
    def prog(x):
        q = mb.quantize(input=x, scale=scale, zero_point=zp, axis=1, output_dtype="int8", name="q")
        return mb.dequantize(input=q, scale=scale, zero_point=zp, axis=1, name="dq")

    out = run_mil(prog, {"x": x}, opset="iOS17")
    expected_q = np.clip(np.rint(x / scale) + zp, -128, 127)
    assert_close(out["dq"], (expected_q - zp) * scale)
