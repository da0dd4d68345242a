"""MIL quantization ops (iOS17): quantize, dequantize (affine, per-tensor or per-axis).

``scale`` and ``zero_point`` are scalars, or vectors along ``axis`` of the input.  Quantize
rounds half to even (``np.round``) and saturates to the output integer range.
"""
from __future__ import annotations

import jax.numpy as jnp

from mljax.errors import OpError
from mljax.ops._registry import register

__all__ = ["quantize", "dequantize"]

_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def per_axis(param, rank: int, axis, op: str, xp=jnp):
    """A scalar or a vector along ``axis``, reshaped to broadcast against a rank-``rank`` tensor."""
    param = xp.asarray(param)
    if param.ndim == 0 or param.ndim == rank:
        return param
    if param.ndim != 1:
        raise OpError(f"{op}: scale/zero_point must be a scalar or a vector; found shape {param.shape}")
    if axis is None:
        raise OpError(f"{op}: a vector scale/zero_point needs 'axis'; found none")
    axis = int(axis)
    if not -rank <= axis < rank:
        raise OpError(f"{op}: axis must be in [{-rank}, {rank}); found {axis}")
    shape = [1] * rank
    shape[axis % rank] = param.shape[0]
    return param.reshape(shape)


@register("quantize", "iOS17")
def quantize(input, scale, zero_point=None, *, axis=None, output_dtype):
    """``clip(round(input / scale) + zero_point)`` as ``output_dtype`` (``int8`` or ``uint8``).

    (MIL lists ``zero_point`` before ``scale``; both are passed by name.)
    """
    if output_dtype not in _INT_RANGES:
        raise OpError(f"quantize: output_dtype must be 'int8' or 'uint8'; found {output_dtype!r}")
    x = jnp.asarray(input)
    rank = x.ndim
    q = jnp.round(x.astype(jnp.float32) / per_axis(scale, rank, axis, "quantize").astype(jnp.float32))
    if zero_point is not None:
        q = q + per_axis(zero_point, rank, axis, "quantize").astype(jnp.float32)
    low, high = _INT_RANGES[output_dtype]
    return jnp.clip(q, low, high).astype(output_dtype)


@register("dequantize", "iOS17")
def dequantize(input, scale, zero_point=None, *, axis=None):
    """``scale * (input - zero_point)`` in ``scale``'s dtype."""
    x = jnp.asarray(input)
    scale = jnp.asarray(scale)
    out_dtype = scale.dtype if jnp.issubdtype(scale.dtype, jnp.floating) else jnp.float32
    v = x.astype(jnp.float32)
    if zero_point is not None:
        v = v - per_axis(zero_point, x.ndim, axis, "dequantize").astype(jnp.float32)
    v = v * per_axis(scale, x.ndim, axis, "dequantize").astype(jnp.float32)
    return v.astype(out_dtype)
