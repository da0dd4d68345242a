"""WeightParams -> NumPy arrays: float32, float16, raw bytes, linear / lookup-table quantized."""
from __future__ import annotations

import numpy as np

from mljax.errors import ModelFormatError

__all__ = ["decode_weights", "has_weights"]


def has_weights(wp) -> bool:
    """Whether a WeightParams message holds any values."""
    return bool(len(wp.floatValue) or wp.float16Value or wp.rawValue or wp.int8RawValue)


def _unpack_bits(raw: bytes, count: int, nbits: int) -> np.ndarray:
    """Unsigned ``nbits`` integers packed most significant bit first (coremltools' layout)."""
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))[: count * nbits]
    if bits.size < count * nbits:
        raise ModelFormatError(f"quantized weights hold {bits.size} bits; expected {count * nbits}")
    powers = (1 << np.arange(nbits - 1, -1, -1)).astype(np.int64)
    return (bits.reshape(count, nbits).astype(np.int64) * powers).sum(axis=1)


def _per_channel(values, shape, axis: int) -> np.ndarray:
    """A scale/bias of one value or one per channel of ``axis``, broadcastable to ``shape``."""
    v = np.asarray(values, np.float32)
    if v.size <= 1 or len(shape) == 0:
        return v.reshape(()) if v.size else np.float32(0)
    bshape = [1] * len(shape)
    bshape[axis] = v.size
    return v.reshape(bshape)


def _dequantize(wp, shape, axis: int, where: str) -> np.ndarray:
    q = wp.quantization
    count = int(np.prod(shape))
    if wp.int8RawValue:
        ints = np.frombuffer(wp.int8RawValue, np.int8)[:count].astype(np.float32).reshape(shape)
        lin = q.linearQuantization
        return ints * _per_channel(lin.scale or [1.0], shape, axis)
    nbits = int(q.numberOfBits) or 8
    ints = (np.frombuffer(wp.rawValue, np.uint8)[:count].astype(np.int64) if nbits == 8
            else _unpack_bits(wp.rawValue, count, nbits)).reshape(shape)
    kind = q.WhichOneof("QuantizationType")
    if kind == "linearQuantization":
        lin = q.linearQuantization
        scale = _per_channel(lin.scale or [1.0], shape, axis)
        bias = _per_channel(lin.bias or [0.0], shape, axis)
        return (ints.astype(np.float32) * scale + bias).astype(np.float32)
    if kind == "lookupTableQuantization":
        lut = np.asarray(q.lookupTableQuantization.floatValue, np.float32)
        if lut.size < (1 << nbits) and ints.size and ints.max() >= lut.size:
            raise ModelFormatError(f"{where}: lookup table has {lut.size} entries; index {ints.max()} used")
        return lut[ints]
    raise ModelFormatError(f"{where}: quantized weights without linear or lookup-table parameters")


def decode_weights(wp, shape=None, *, axis: int = 0, where: str = "weights") -> np.ndarray | None:
    """The values of a WeightParams as a float32 array of ``shape`` (None when empty).

    ``axis`` is the channel axis of per-channel quantization (1 for deconvolution kernels).
    """
    if not has_weights(wp):
        return None
    if len(wp.floatValue):
        arr = np.asarray(wp.floatValue, np.float32)
    elif wp.float16Value:
        arr = np.frombuffer(wp.float16Value, "<f2").astype(np.float32)
    elif wp.HasField("quantization") or wp.int8RawValue:
        if shape is None:
            raise ModelFormatError(f"{where}: quantized weights need a known shape")
        return _dequantize(wp, tuple(int(s) for s in shape), axis, where)
    else:
        arr = np.frombuffer(wp.rawValue, "<f4").astype(np.float32)
    if shape is None:
        return arr
    shape = tuple(int(s) for s in shape)
    if arr.size != int(np.prod(shape)):
        raise ModelFormatError(f"{where}: expected {int(np.prod(shape))} values for shape {shape}; "
                               f"found {arr.size}")
    return arr.reshape(shape)
