"""MIL pool family: ``avg_pool``, ``max_pool``, ``l2_pool`` over 1-3 channel-first spatial dims.

``max_pool`` and ``avg_pool`` also run on channel-last ``[N, *D, C]`` values of the graph layer's
channel-last regions (the hint ``channels_last``, :func:`mljax.optimize.passes.channels_last_regions`).

Padding follows :func:`mljax.ops.conv._spatial_pads` (``valid`` / ``same`` / ``same_lower`` /
``custom``).  ``ceil_mode`` uses coremltools' output-size rule, which differs from PyTorch's
only when a window would start past the input with no padding at all.
"""
from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.errors import OpError
from mljax.ops._registry import register
from mljax.ops.conv import _accumulate_dtype, _ints, _spatial_pads

__all__ = ["avg_pool", "max_pool", "l2_pool"]


def _out_size(size: int, before: int, after: int, k: int, s: int, ceil_mode: bool) -> int:
    total = before + after
    if not ceil_mode:
        return (size + total - k) // s + 1
    out = (size + total - k + s - 1) // s + 1
    # The last window must start inside the input or its leading padding.
    if total > 0 and (out - 1) * s >= size + total / 2:
        out -= 1
    return out


def _spatial(x, channels_last: bool = False) -> tuple:
    return tuple(x.shape[1:-1] if channels_last else x.shape[2:])


def _window(x, kernel_sizes, strides, pad_type, pad, ceil_mode, channels_last=False):
    """Per-dim kernel, strides, explicit pads and the extra trailing pad ``ceil_mode`` needs."""
    n = x.ndim - 2
    if not 1 <= n <= 3:
        raise OpError(f"expected 1 to 3 spatial dimensions (x of rank 3 to 5), found {n}")
    kernel = _ints(kernel_sizes, n, 1, "kernel_sizes")
    strides = _ints(strides, n, 1, "strides")
    spatial = _spatial(x, channels_last)
    pads = _spatial_pads(pad_type, pad, spatial, kernel, strides)
    extra = []
    for size, (b, a), k, s in zip(spatial, pads, kernel, strides):
        out = _out_size(size, b, a, k, s, bool(ceil_mode))
        if out <= 0:
            raise OpError(f"kernel {k} with padding ({b}, {a}) does not fit an input of size "
                          f"{size}")
        extra.append(max(0, (out - 1) * s + k - (size + b + a)))
    return kernel, strides, pads, extra


# Windows of at most this many cells reduce as an elementwise tree over strided slices of the
# padded input, which XLA:CPU fuses into one loop; its reduce_window is a generic windowed loop,
# 4x slower for a 2x2/2 max pool at (32, 32, 64, 64) (1.2 ms vs 4.6 ms, one thread).  Large
# windows (global pooling) keep reduce_window: one slice per cell would not pay.
_SLICED_MAX_CELLS = 16


def window_reduction(x, init, op, kernel, strides, pads, extra, channels_last=False):
    """``op``-reduce each window of ``x [N, C, *D]`` (or ``[N, *D, C]``, ``channels_last``), padded
    with ``init``; ``extra`` trailing cells."""
    def full(spatial, fill):      # per-axis values: the spatial ones, ``fill`` for N and C
        return (fill,) + tuple(spatial) + (fill,) if channels_last else (fill, fill) + tuple(spatial)
    padding = full(tuple((b, a + e) for (b, a), e in zip(pads, extra)), (0, 0))
    if math.prod(kernel) > _SLICED_MAX_CELLS:
        return lax.reduce_window(x, init, op, full(kernel, 1), full(strides, 1), padding)
    x = lax.pad(x, jnp.asarray(init, x.dtype), [(lo, hi, 0) for lo, hi in padding])
    outs = [(size - k) // s + 1 for size, k, s in zip(_spatial(x, channels_last), kernel, strides)]
    acc = None
    for offsets in itertools.product(*(range(k) for k in kernel)):
        ends = tuple(o + (n - 1) * s + 1 for o, n, s in zip(offsets, outs, strides))
        limit = ((x.shape[0],) + ends + (x.shape[-1],)) if channels_last else x.shape[:2] + ends
        part = lax.slice(x, full(offsets, 0), limit, full(strides, 1))
        acc = part if acc is None else op(acc, part)
    return acc


def _window_sum(x, kernel, strides, pads, extra, channels_last=False):
    acc = _accumulate_dtype(x.dtype) or x.dtype
    # a NumPy init value keeps reduce_window differentiable under jit (a jnp one does not)
    return window_reduction(x.astype(acc), np.array(0, acc), lax.add, kernel, strides, pads, extra, channels_last)


def _hint(ctx) -> bool:
    return bool(ctx is not None and ctx.hints.get("channels_last"))


@register("avg_pool")
def avg_pool(x, *, kernel_sizes, strides=None, pad_type="valid", pad=None,
             exclude_padding_from_average=False, ceil_mode=False, ctx=None):
    """Average pooling; fp16 sums are accumulated in fp32.

    Padded zeros count in the denominator unless ``exclude_padding_from_average``; the extra
    trailing cells that ``ceil_mode`` adds never count (PyTorch's ``count_include_pad`` rule).
    """
    return average_pool(x, kernel_sizes=kernel_sizes, strides=strides, pad_type=pad_type, pad=pad,
                        exclude_padding_from_average=exclude_padding_from_average, ceil_mode=ceil_mode,
                        channels_last=_hint(ctx))


def average_pool(x, *, kernel_sizes, strides=None, pad_type="valid", pad=None,
                 exclude_padding_from_average=False, ceil_mode=False, channels_last=False):
    """``avg_pool`` of a channel-first ``x``, or of a channel-last one (``channels_last``)."""
    x = jnp.asarray(x)
    kernel, strides, pads, extra = _window(x, kernel_sizes, strides, pad_type, pad, ceil_mode, channels_last)
    total = _window_sum(x, kernel, strides, pads, extra, channels_last)
    spatial = _spatial(x, channels_last)
    if exclude_padding_from_average:
        ones = np.ones((1, 1) + spatial, np.float32)
        count = _window_sum(ones, kernel, strides, pads, extra)
    else:
        padded = tuple(s + b + a for s, (b, a) in zip(spatial, pads))
        ones = np.ones((1, 1) + padded, np.float32)
        count = _window_sum(ones, kernel, strides, [(0, 0)] * len(kernel), extra)
    if channels_last:                   # [1, 1, *D'] counts -> [1, *D', 1]
        count = count.reshape((1,) + count.shape[2:] + (1,))
    # Windows entirely in the ceil_mode overhang have no cells; avoid 0/0.
    return (total / jnp.maximum(count, 1).astype(total.dtype)).astype(x.dtype)


@register("max_pool")
def max_pool(x, *, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False, ctx=None):
    """Max pooling; padding never wins (it is -inf)."""
    return maximum_pool(x, kernel_sizes=kernel_sizes, strides=strides, pad_type=pad_type, pad=pad,
                        ceil_mode=ceil_mode, channels_last=_hint(ctx))


def maximum_pool(x, *, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False,
                 channels_last=False):
    """``max_pool`` of a channel-first ``x``, or of a channel-last one (``channels_last``)."""
    x = jnp.asarray(x)
    kernel, strides, pads, extra = _window(x, kernel_sizes, strides, pad_type, pad, ceil_mode, channels_last)
    init = np.array(-np.inf, x.dtype)
    return window_reduction(x, init, lax.max, kernel, strides, pads, extra, channels_last)


@register("l2_pool")
def l2_pool(x, *, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    """L2 pooling ``sqrt(sum(x**2))`` over each window (MIL allows 1-D and 2-D only)."""
    x = jnp.asarray(x)
    if x.ndim - 2 > 2:
        raise OpError(f"l2_pool supports 1 or 2 spatial dimensions, found {x.ndim - 2}")
    kernel, strides, pads, extra = _window(x, kernel_sizes, strides, pad_type, pad, ceil_mode)
    total = _window_sum(jnp.square(x.astype(_accumulate_dtype(x.dtype) or x.dtype)),
                        kernel, strides, pads, extra)
    return jnp.sqrt(total).astype(x.dtype)

