"""MIL constexpr (compression) ops: weights stored compressed and decompressed at load.

Every input is a constant, so these run once, in NumPy, on the values the lowering passes
(iOS16 keeps them as op attributes, iOS18 as inputs; the lowering passes both by name).
iOS16: constexpr_affine_dequantize, constexpr_cast, constexpr_lut_to_dense and
constexpr_sparse_to_dense with bit-packed ``uint8`` indices/masks and an explicit ``shape``.
iOS18: constexpr_blockwise_shift_scale, and lut_to_dense / sparse_to_dense over typed sub-byte
tensors (``uint1``..``uint8``, unpacked by the loader) with per-block LUTs and vector
palettization, plus the sparse-to-sparse lut_to_sparse and sparse_blockwise_shift_scale
(two outputs: mask, nonzero data).  Bits are packed least significant first.
"""
from __future__ import annotations

import numpy as np

from mljax.errors import OpError
from mljax.mil.types import dtype_from_name
from mljax.ops._registry import register
from mljax.ops.quantization import per_axis

__all__ = [
    "constexpr_affine_dequantize", "constexpr_cast", "constexpr_lut_to_dense",
    "constexpr_sparse_to_dense", "constexpr_blockwise_shift_scale", "constexpr_lut_to_sparse",
    "constexpr_sparse_blockwise_shift_scale",
]


def _declared(ctx, i: int, fallback) -> np.dtype:
    """The declared dtype of output ``i`` (scalar inputs reach us without theirs)."""
    types = getattr(ctx, "output_types", ()) or ()
    if i < len(types) and getattr(types[i], "dtype", None) is not None:
        return types[i].dtype.numpy
    return np.dtype(fallback)


def _float_of(*arrays) -> np.dtype:
    for a in arrays:
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" or \
                getattr(a, "dtype", None) is not None and a.dtype.name in ("float16", "bfloat16"):
            return a.dtype
    return np.dtype(np.float32)


def _unpack_bits(packed, nbits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``nbits``-bit values packed LSB-first into ``packed`` bytes."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if packed.size * 8 < nbits * count:
        raise OpError(f"expected at least {-(-nbits * count // 8)} packed bytes for {count} "
                      f"{nbits}-bit values; found {packed.size}")
    bits = np.unpackbits(packed, bitorder="little")[: nbits * count].reshape(count, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(axis=1)


def _shape_of(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in np.atleast_1d(np.asarray(shape)))


# --- iOS16 ------------------------------------------------------------------------------
@register("constexpr_affine_dequantize", "iOS16")
def constexpr_affine_dequantize(*, quantized_data, zero_point, scale, axis, ctx=None):
    """``scale * (quantized_data - zero_point)`` with scalar or per-``axis`` scale/zero_point."""
    data = np.asarray(quantized_data)
    out = _declared(ctx, 0, _float_of(scale))
    op = "constexpr_affine_dequantize"
    zp = per_axis(zero_point, data.ndim, axis, op, np).astype(np.float32)
    sc = per_axis(scale, data.ndim, axis, op, np).astype(np.float32)
    return ((data.astype(np.float32) - zp) * sc).astype(out)


@register("constexpr_cast", "iOS16")
def constexpr_cast(*, source_val, output_dtype, ctx=None):
    """``source_val`` (fp16) cast to ``output_dtype`` (fp32); iOS18 only moves attrs to inputs."""
    try:
        target = dtype_from_name(str(output_dtype)).numpy
    except ValueError as e:
        raise OpError(f"constexpr_cast: {e}") from None
    return np.asarray(source_val).astype(target)


@register("constexpr_lut_to_dense", "iOS16")
def constexpr_lut_to_dense(*, indices, lut, shape, ctx=None):
    """``lut[i]`` for each ``log2(len(lut))``-bit index packed in the ``indices`` bytes."""
    lut = np.asarray(lut).ravel()
    nbits = int(np.log2(lut.size))
    if lut.size not in (2, 4, 16, 64, 256):
        raise OpError(f"constexpr_lut_to_dense: lut must have 2, 4, 16, 64 or 256 entries; "
                      f"found {lut.size}")
    dims = _shape_of(shape)
    idx = _unpack_bits(indices, nbits, int(np.prod(dims)))
    return lut[idx].reshape(dims).astype(_declared(ctx, 0, lut.dtype))


@register("constexpr_sparse_to_dense", "iOS16")
def constexpr_sparse_to_dense(*, nonzero_data, mask, shape, ctx=None):
    """Scatter ``nonzero_data`` to the set bits of the packed bit ``mask``; zeros elsewhere."""
    dims = _shape_of(shape)
    bits = _unpack_bits(mask, 1, int(np.prod(dims))).reshape(dims)
    return _fill(bits, nonzero_data, _declared(ctx, 0, np.asarray(nonzero_data).dtype))


def _fill(mask: np.ndarray, values, dtype) -> np.ndarray:
    values = np.asarray(values).ravel()
    where = mask != 0
    if int(where.sum()) != values.size:
        raise OpError(f"sparse_to_dense: mask has {int(where.sum())} set bits but nonzero_data "
                      f"has {values.size} values")
    out = np.zeros(mask.shape, dtype=dtype)
    out[where] = values.astype(dtype)
    return out


# --- iOS18 ------------------------------------------------------------------------------
def _repeat_blocks(param: np.ndarray, shape: tuple[int, ...], op: str) -> np.ndarray:
    """Expand a per-block ``param`` to ``shape`` (block size = shape / param.shape per dim)."""
    if param.ndim != len(shape):
        raise OpError(f"{op}: expected a rank-{len(shape)} parameter; found shape {param.shape}")
    for axis, (n, p) in enumerate(zip(shape, param.shape)):
        if p == 0 or n % p:
            raise OpError(f"{op}: dim {axis} of the data ({n}) must be a multiple of the "
                          f"parameter's ({p})")
        if n != p:
            param = np.repeat(param, n // p, axis=axis)
    return param


def _shift_scale(data, scale, offset, op: str) -> np.ndarray:
    data = np.asarray(data)
    scale = np.asarray(scale)
    v = data.astype(np.float32)
    if offset is not None:
        v = v - _repeat_blocks(np.asarray(offset).astype(np.float32), data.shape, op)
    return v * _repeat_blocks(scale.astype(np.float32), data.shape, op)


@register("constexpr_blockwise_shift_scale", "iOS18")
def constexpr_blockwise_shift_scale(*, data, scale, offset=None, ctx=None):
    """``scale * (data - offset)`` with one scale/offset per block of ``data``."""
    out = _declared(ctx, 0, _float_of(scale))
    return _shift_scale(data, scale, offset, "constexpr_blockwise_shift_scale").astype(out)


def _lut_lookup(indices, lut, vector_axis, op: str) -> np.ndarray:
    """Per-block (and, with VECTOR_SIZE > 1, vector) palettization, dense."""
    idx = np.asarray(indices).astype(np.int64)
    lut = np.asarray(lut)
    rank = idx.ndim
    if lut.ndim != rank + 2:
        raise OpError(f"{op}: lut must have rank(indices) + 2 = {rank + 2} dims; found {lut.shape}")
    palettes, vsize = lut.shape[-2:]
    # Per-element LUT: repeat each block's table over the block, then pick the entry.
    tables = lut.reshape(lut.shape[:rank] + (palettes * vsize,))
    tables = _repeat_blocks(tables, idx.shape + (palettes * vsize,), op)
    tables = tables.reshape(idx.shape + (palettes, vsize))
    picked = np.take_along_axis(tables, idx[..., None, None], axis=-2)[..., 0, :]
    if vsize == 1:
        return picked[..., 0]
    if vector_axis is None:
        raise OpError(f"{op}: vector_axis is required when the lut's vector size is {vsize} > 1")
    axis = int(vector_axis) % rank
    # Lay each picked vector out along vector_axis: that dim grows by vsize.
    picked = np.moveaxis(picked, -1, axis + 1)
    shape = list(idx.shape)
    shape[axis] *= vsize
    return picked.reshape(shape)


@register("constexpr_lut_to_dense", "iOS18")
def constexpr_lut_to_dense_iOS18(*, indices, lut, vector_axis=None, ctx=None):
    """iOS18: ``indices`` is a typed uint{1,2,3,4,6,8} tensor; ``lut`` is
    ``[*blocks, NUM_PALETTES, VECTOR_SIZE]`` with one table per block of ``indices``; vectors
    fill consecutive positions along ``vector_axis``."""
    lut = np.asarray(lut)
    out = _lut_lookup(indices, lut, vector_axis, "constexpr_lut_to_dense")
    return out.astype(_declared(ctx, 0, lut.dtype))


@register("constexpr_sparse_to_dense", "iOS18")
def constexpr_sparse_to_dense_iOS18(*, nonzero_data, mask, ctx=None):
    """iOS18: ``mask`` is an unpacked ``uint1`` tensor of the output's shape."""
    return _fill(np.asarray(mask), nonzero_data, _declared(ctx, 0, np.asarray(nonzero_data).dtype))


@register("constexpr_lut_to_sparse", "iOS18")
def constexpr_lut_to_sparse(*, indices_mask, indices_nonzero_data, lut, vector_axis=None, ctx=None):
    """Palettize only the nonzero entries; returns ``(mask, nonzero_data)``.

    With vector palettization the mask is repeated ``VECTOR_SIZE`` times along ``vector_axis``.
    """
    mask = np.asarray(indices_mask)
    lut = np.asarray(lut)
    indices = _fill(mask, indices_nonzero_data, np.int64)
    dense = _lut_lookup(indices, lut, vector_axis, "constexpr_lut_to_sparse")
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=int(vector_axis))
    values = dense[mask != 0]
    return (mask.astype(_declared(ctx, 0, mask.dtype)),
            values.astype(_declared(ctx, 1, lut.dtype)))


@register("constexpr_sparse_blockwise_shift_scale", "iOS18")
def constexpr_sparse_blockwise_shift_scale(*, data_mask, nonzero_data, scale, offset=None, ctx=None):
    """Block-wise ``scale * (data - offset)`` of the nonzero entries; returns ``(mask, nonzero)``."""
    mask = np.asarray(data_mask)
    dense = _fill(mask, nonzero_data, np.float32)
    values = _shift_scale(dense, scale, offset, "constexpr_sparse_blockwise_shift_scale")[mask != 0]
    return (mask.astype(_declared(ctx, 0, mask.dtype)),
            values.astype(_declared(ctx, 1, _float_of(scale))))
