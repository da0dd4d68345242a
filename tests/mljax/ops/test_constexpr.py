"""constexpr (compression) ops against coremltools' own decompressors, doc examples and NumPy."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from mljax.errors import OpError
from mljax.mil.types import TensorType, dtype_from_name
from mljax.ops import constexpr as cx
from mljax.ops._registry import OpContext, lookup
from tests.helpers import assert_close

RNG = np.random.default_rng(5)


def _ctx(*dtypes):
    return OpContext("constexpr", "c", 18,
                     output_types=tuple(TensorType(dtype_from_name(d), None) for d in dtypes))


def _pack(values, nbits):
    """Pack unsigned ``nbits`` values LSB first (written independently of the op)."""
    out = bytearray(-(-len(values) * nbits // 8))
    pos = 0
    for v in values:
        for b in range(nbits):
            if (int(v) >> b) & 1:
                out[pos // 8] |= 1 << (pos % 8)
            pos += 1
    return np.frombuffer(bytes(out), np.uint8)


# --- iOS16 ------------------------------------------------------------------------------
@pytest.mark.parametrize("src", [np.int8, np.uint8])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("vector", [True, False])
@pytest.mark.parametrize("out", ["fp32", "fp16"])
def test_affine_dequantize(src, axis, vector, out):
    shape = (3, 4, 5)
    info = np.iinfo(src)
    q = RNG.integers(info.min, info.max, shape).astype(src)
    n = shape[axis] if vector else 1
    zp = RNG.integers(info.min, info.max, n).astype(src)
    scale = RNG.uniform(0.01, 1, n).astype(dtype_from_name(out).numpy)
    if not vector:
        zp, scale = zp[0].item(), scale[0].item()  # the lowering passes 0-d values as scalars
    bshape = [1, 1, 1]
    bshape[axis] = -1
    expected = (q.astype(np.float64) - np.reshape(zp, bshape if vector else ())) \
        * np.reshape(np.asarray(scale, np.float64), bshape if vector else ())
    res = cx.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=axis,
                                         ctx=_ctx(out))
    assert res.dtype == dtype_from_name(out).numpy
    assert_close(res, expected, dtype=res.dtype)


def test_cast():
    x = RNG.standard_normal((3, 2)).astype(np.float16)
    res = cx.constexpr_cast(source_val=x, output_dtype="fp32")
    assert res.dtype == np.float32
    np.testing.assert_array_equal(res, x.astype(np.float32))
    assert lookup("constexpr_cast", "iOS18").fn is cx.constexpr_cast


@pytest.mark.parametrize("nbits", [1, 2, 4, 6, 8])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 5)])
def test_lut_to_dense_iOS16(nbits, shape):
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import (
        constexpr_lut_to_dense as ref)
    lut = RNG.standard_normal(2 ** nbits).astype(np.float16)
    values = RNG.integers(0, 2 ** nbits, int(np.prod(shape)))
    packed = _pack(values, nbits)
    res = cx.constexpr_lut_to_dense(indices=packed, lut=lut, shape=np.array(shape, np.uint32))
    np.testing.assert_array_equal(res, lut[values].reshape(shape))
    np.testing.assert_array_equal(res, ref.decompress(lut, packed, np.array(shape, np.uint32)))


def test_lut_to_dense_iOS16_doc_example():
    # n_bits = 2, shape (5,): byte 0 = 0b01_10_11_00 -> i0=0, i1=3, i2=2, i3=1; byte 1 low bits -> i4=3
    lut = np.array([10, 20, 30, 40], np.int8)
    res = cx.constexpr_lut_to_dense(indices=np.array([0b01101100, 0b00000011], np.uint8), lut=lut,
                                    shape=np.array([5], np.uint32))
    np.testing.assert_array_equal(res, [10, 40, 30, 20, 40])


@pytest.mark.parametrize("shape", [(5,), (4, 6), (3, 3, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_sparse_to_dense_iOS16(shape, dtype):
    dense = RNG.standard_normal(shape) * 10
    dense[RNG.random(shape) < 0.5] = 0
    dense = dense.astype(dtype)
    bits = (dense != 0).ravel()
    res = cx.constexpr_sparse_to_dense(nonzero_data=dense[dense != 0], mask=_pack(bits, 1),
                                       shape=np.array(shape, np.uint32))
    assert res.dtype == dtype
    np.testing.assert_array_equal(res, dense)


def test_sparse_to_dense_count_mismatch():
    with pytest.raises(OpError, match="set bits"):
        cx.constexpr_sparse_to_dense(nonzero_data=np.ones(2, np.float32),
                                     mask=np.array([0b111], np.uint8), shape=np.array([3]))


# --- iOS18 ------------------------------------------------------------------------------
@pytest.mark.parametrize("src", ["int4", "uint4", "int8", "uint8", "fp16"])
@pytest.mark.parametrize("blocks", [(1, 1), (2, 1), (1, 3), (4, 6)])
@pytest.mark.parametrize("with_offset", [True, False])
def test_blockwise_shift_scale(src, blocks, with_offset):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_blockwise_shift_scale as ref)
    shape = (4, 6)
    np_src = dtype_from_name(src).numpy
    lo, hi = (-8, 8) if src == "int4" else (0, 16) if src == "uint4" else (-100, 100) \
        if src != "uint8" else (0, 255)
    data = RNG.integers(lo, hi, shape).astype(np_src)
    scale = RNG.uniform(0.1, 1, blocks).astype(np.float16)
    offset = RNG.integers(lo, hi, blocks).astype(np_src) if with_offset else None
    res = cx.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, ctx=_ctx("fp16"))
    assert res.dtype == np.float16
    # independent NumPy: expand each block's parameter by integer division of coordinates
    rows, cols = np.indices(shape)
    bi, bj = rows // (shape[0] // blocks[0]), cols // (shape[1] // blocks[1])
    off = 0 if offset is None else offset.astype(np.float64)[bi, bj]
    expected = scale.astype(np.float64)[bi, bj] * (data.astype(np.float64) - off)
    assert_close(res, expected, dtype=np.float16)
    assert_close(res, ref.decompress(data, scale, offset), dtype=np.float16)


def test_lut_to_dense_iOS18_doc_examples():
    # Case 1: two 2-bit LUTs over the first axis
    idx = np.array([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3]).reshape(6, 2).astype(ml_dtypes.uint2)
    lut = np.array([1, 5, 9, 13, 2, 10, 18, 26], np.float16).reshape(2, 1, 4, 1)
    res = cx.constexpr_lut_to_dense_iOS18(indices=idx, lut=lut)
    np.testing.assert_array_equal(res, [[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]])
    # Case 2: 1-bit vector palettization, centroids a = (0, 1, 2), b = (10, 11, 12)
    idx = np.array([[[0, 0], [1, 0]], [[1, 1], [0, 0]]], np.uint8)
    lut = np.array([0, 1, 2, 10, 11, 12], np.int8).reshape(1, 1, 1, 2, 3)
    a, b = [0, 1, 2], [10, 11, 12]
    res = cx.constexpr_lut_to_dense_iOS18(indices=idx, lut=lut, vector_axis=2)
    np.testing.assert_array_equal(res, [[a + a, b + a], [b + b, a + a]])
    res = cx.constexpr_lut_to_dense_iOS18(indices=idx, lut=lut, vector_axis=1)
    expected = np.array([[np.r_[a, b], np.r_[a, a]], [np.r_[b, a], np.r_[b, a]]]).transpose(0, 2, 1)
    np.testing.assert_array_equal(res, expected)


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("lut_blocks", [(1, 1, 1), (2, 1, 1), (1, 2, 3), (2, 4, 6)])
@pytest.mark.parametrize("vector", [(1, None), (2, 0), (3, 2), (2, -2)])
def test_lut_to_dense_iOS18_vs_coremltools(nbits, lut_blocks, vector):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_lut_to_dense as ref)
    vsize, vaxis = vector
    idx = RNG.integers(0, 2 ** nbits, (4, 8, 6)).astype(np.uint8)
    lut = RNG.standard_normal(lut_blocks + (2 ** nbits, vsize)).astype(np.float32)
    res = cx.constexpr_lut_to_dense_iOS18(indices=idx, lut=lut, vector_axis=vaxis)
    np.testing.assert_array_equal(res, ref.decompress(idx, lut, vaxis))


def test_sparse_to_dense_iOS18_and_lut_to_sparse():
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_lut_to_sparse as ref)
    # doc example: scalar and vector palettization of sparse 1-bit indices
    mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1], [0, 1, 1, 0, 1, 0],
                     [0, 0, 0, 1, 0, 0]], np.uint8)
    nz = np.array([0, 1, 1, 0, 1, 1, 0, 0, 1], np.uint8)
    lut = np.array([2.0, 3.0], np.float16).reshape(1, 1, 2, 1)
    m, v = cx.constexpr_lut_to_sparse(indices_mask=mask, indices_nonzero_data=nz, lut=lut)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_array_equal(v, [2, 3, 3, 2, 3, 3, 2, 2, 3])
    dense = cx.constexpr_sparse_to_dense_iOS18(nonzero_data=v, mask=m)
    expected = np.zeros(mask.shape, np.float16)
    expected[mask != 0] = [2, 3, 3, 2, 3, 3, 2, 2, 3]
    np.testing.assert_array_equal(dense, expected)
    vlut = np.array([[2.0, 2.0], [3.0, 3.0]], np.float16).reshape(1, 1, 2, 2)
    m, v = cx.constexpr_lut_to_sparse(indices_mask=mask, indices_nonzero_data=nz, lut=vlut,
                                      vector_axis=0)
    np.testing.assert_array_equal(m, np.repeat(mask, 2, axis=0))
    rm, rv = ref.decompress(mask, nz, vlut, 0)
    np.testing.assert_array_equal(m, rm)
    np.testing.assert_array_equal(v, rv)


def test_sparse_blockwise_shift_scale_doc_example():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]], np.uint8)
    nz = np.array([10, 11, 3, 4, 5, 6, 7, 8, 9], np.int8)
    scale = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
    offset = np.array([[1, 2, 3, 4]], np.int8)
    m, v = cx.constexpr_sparse_blockwise_shift_scale(data_mask=mask, nonzero_data=nz, scale=scale,
                                                     offset=offset, ctx=_ctx("uint1", "fp32"))
    np.testing.assert_array_equal(m, mask)
    cols = np.nonzero(mask)[1]
    assert_close(v, (nz - offset[0, cols]) * scale[0, cols])
    assert_close(v, [0.9, 1.8, 0.2, 0.4, 0.6, 0.9, 1.2, 0.7, 1.4])


# --- end to end -------------------------------------------------------------------------
def test_e2e_iOS16_constexpr():
    from coremltools.converters.mil.mil import Builder as mb, types
    from tests.helpers import run_mil, target

    q = RNG.integers(-128, 127, (3, 4)).astype(np.int8)
    zp = np.array([1, -2, 3], np.int8)
    scale = np.array([0.1, 0.2, 0.3], np.float32)
    lut = RNG.standard_normal(4).astype(np.float32)
    lut_idx = RNG.integers(0, 4, 12)
    dense = RNG.standard_normal((3, 4)).astype(np.float32)
    dense[RNG.random((3, 4)) < 0.5] = 0

    @mb.program(input_specs=[mb.TensorSpec((3, 4), types.fp32)], opset_version=target("iOS16"))
    def prog(x):
        a = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zp, scale=scale, axis=0)
        b = mb.constexpr_lut_to_dense(indices=_pack(lut_idx, 2), lut=lut,
                                      shape=np.array([3, 4], np.uint32))
        c = mb.constexpr_sparse_to_dense(nonzero_data=dense[dense != 0],
                                         mask=_pack((dense != 0).ravel(), 1),
                                         shape=np.array([3, 4], np.uint32))
        return mb.add(x=mb.add(x=mb.add(x=x, y=a), y=b), y=c, name="out")

    x = RNG.standard_normal((3, 4)).astype(np.float32)
    out = run_mil(prog, {"x": x}, opset="iOS16")["out"]
    expected = x + (q - zp[:, None]) * scale[:, None] + lut[lut_idx].reshape(3, 4) + dense
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_e2e_iOS18_constexpr():
    from coremltools.converters.mil.mil import Builder as mb, types
    from tests.helpers import run_mil, target

    data = RNG.integers(-8, 8, (4, 6)).astype(types.np_int4_dtype)
    scale = RNG.uniform(0.1, 1, (2, 3)).astype(np.float32)
    offset = RNG.integers(-8, 8, (2, 3)).astype(types.np_int4_dtype)
    idx = RNG.integers(0, 4, (4, 6)).astype(types.np_uint2_dtype)
    lut = RNG.standard_normal((2, 1, 4, 1)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((4, 6), types.fp32)], opset_version=target("iOS18"))
    def prog(x):
        a = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset)
        b = mb.constexpr_lut_to_dense(indices=idx, lut=lut)
        return mb.add(x=mb.add(x=x, y=a), y=b, name="out")

    x = RNG.standard_normal((4, 6)).astype(np.float32)
    out = run_mil(prog, {"x": x}, opset="iOS18")["out"]
    rows, cols = np.indices((4, 6))
    d = data.astype(np.float64)
    a = scale[rows // 2, cols // 2] * (d - offset.astype(np.float64)[rows // 2, cols // 2])
    b = lut[rows // 2, 0, idx.astype(int), 0]
    assert_close(out, x + a + b, rtol=1e-5, atol=1e-5)
