"""MIL reduction ops (coremltools ``defs/iOS15/reduction.py``, ``defs/iOS17/reduction.py``).

``axes=None`` reduces over every axis; ``keep_dims`` keeps reduced axes with length 1.
Results keep ``x``'s dtype (int32 results of mean/norms are truncated towards zero, as
MIL's ``astype``).  iOS17 delta: ``reduce_argmax``/``reduce_argmin`` take
``output_dtype`` ("int32" or "uint16").
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mljax.errors import OpError
from mljax.ops._batching import folding_batch
from mljax.ops._elementwise_util import normalize_axes, normalize_axis
from mljax.ops._registry import register

__all__ = [
    "reduce_sum", "reduce_mean", "reduce_prod", "reduce_max", "reduce_min", "reduce_l1_norm",
    "reduce_l2_norm", "reduce_log_sum", "reduce_log_sum_exp", "reduce_sum_square",
    "reduce_argmax", "reduce_argmin", "reduce_argmax_ios17", "reduce_argmin_ios17", "spatial_pool_by_product",
]


def _float_of(x):
    """``x`` as a float array: int32 is reduced in fp32, floats in their own dtype."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _sum_square(x, axis, keepdims):
    return jnp.sum(x * x, axis=axis, keepdims=keepdims)


def _l2_norm(x, axis, keepdims):
    return jnp.sqrt(_sum_square(_float_of(x), axis, keepdims))


def _log_sum(x, axis, keepdims):
    return jnp.log(jnp.sum(_float_of(x), axis=axis, keepdims=keepdims))


def _log_sum_exp(x, axis, keepdims):
    return jax.nn.logsumexp(_float_of(x), axis=axis, keepdims=keepdims)


def _l1_norm(x, axis, keepdims):
    return jnp.sum(jnp.abs(x), axis=axis, keepdims=keepdims)


_REDUCTIONS = {
    "reduce_sum": (jnp.sum, "Sum."),
    "reduce_mean": (jnp.mean, "Mean (int32: truncated towards zero)."),
    "reduce_prod": (jnp.prod, "Product."),
    "reduce_max": (jnp.max, "Maximum."),
    "reduce_min": (jnp.min, "Minimum."),
    "reduce_l1_norm": (_l1_norm, "Sum of absolute values."),
    "reduce_l2_norm": (_l2_norm, "Square root of the sum of squares."),
    "reduce_log_sum": (_log_sum, "Natural log of the sum."),
    "reduce_log_sum_exp": (_log_sum_exp, "``log(sum(exp(x)))``, shifted by the max for stability."),
    "reduce_sum_square": (_sum_square, "Sum of squares."),
}


def _pool_by_product(x, mean: bool):
    n, h, w, c = x.shape
    row = jnp.full((n, 1, h * w), 1.0 / (h * w) if mean else 1.0, x.dtype)
    y = lax.dot_general(row, x.reshape(n, h * w, c), (((2,), (1,)), ((0,), (0,))))
    return y.reshape(n, 1, 1, c)


def _folded_pool(mean: bool):
    pool = functools.partial(_pool_by_product, mean=mean)
    return folding_batch(pool, pool)       # a list predict's samples fold into the images axis


_POOLS_BY_PRODUCT = {mean: _folded_pool(mean) for mean in (True, False)}


def spatial_pool_by_product(x, *, mean: bool = True):
    """The sum (``mean``: the mean) of a channel-last ``x [N, H, W, C]`` over ``H, W``, as
    ``[N, 1, 1, C]``: a product by a constant row.  For a network's global pool before its
    classifier (the graph layer's hint ``pool_by_product``): as a reduction, XLA's YNNPACK
    reduction fusion took it together with the matrix products and activation before it
    (EfficientNet-B0's last layers: 3 ms instead of 0.6 ms).

    One product per image, ``[1, H*W]`` by ``[H*W, C]``, with the image as the product's batch
    axis; a list predict's samples fold into that axis (:func:`mljax.ops._batching.folding_batch`).
    As one product of the row by ``[H*W, N*C]``, a vmapped ``x`` had its sample axis ahead of
    ``H*W`` and XLA transposed the activations to reach that form: 0.37 ms of MobileNetV3-Small's
    20 ms at 32 samples (Intel Xeon, profiled); the model 0.97x the time."""
    return _POOLS_BY_PRODUCT[bool(mean)](x)


def _make_reduction(name: str, fn, doc: str):
    def reduce(x, axes, keep_dims):
        axis = normalize_axes(axes, jnp.ndim(x))
        out = fn(x, axis=axis, keepdims=bool(keep_dims))
        return jnp.asarray(out).astype(jnp.result_type(x))

    if name in ("reduce_sum", "reduce_mean"):
        def op(x, *, axes=None, keep_dims=False, ctx=None):
            if (ctx is not None and ctx.hints.get("pool_by_product") and jnp.ndim(x) == 4 and keep_dims
                    and normalize_axes(axes, 4) == (1, 2) and jnp.issubdtype(jnp.result_type(x), jnp.floating)):
                return spatial_pool_by_product(x, mean=name == "reduce_mean")
            return reduce(x, axes, keep_dims)
    else:
        def op(x, *, axes=None, keep_dims=False):
            return reduce(x, axes, keep_dims)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"{doc} Over ``axes`` (None = all axes)."
    return register(name)(op)


reduce_sum, reduce_mean, reduce_prod, reduce_max, reduce_min, reduce_l1_norm, reduce_l2_norm, \
    reduce_log_sum, reduce_log_sum_exp, reduce_sum_square = (
        _make_reduction(name, fn, doc) for name, (fn, doc) in _REDUCTIONS.items())


def _arg(fn, x, axis, keep_dims, output_dtype):
    if jnp.ndim(x) == 0:
        raise OpError("reduce_arg*: x must have rank >= 1; found a scalar")
    axis = normalize_axis(axis, jnp.ndim(x))
    out = fn(x, axis=axis, keepdims=bool(keep_dims))
    return out.astype(output_dtype)


@register("reduce_argmax")
def reduce_argmax(x, *, axis=-1, keep_dims=False):
    """Index (int32) of the first maximum along ``axis``."""
    return _arg(jnp.argmax, x, axis, keep_dims, jnp.int32)


@register("reduce_argmin")
def reduce_argmin(x, *, axis=-1, keep_dims=False):
    """Index (int32) of the first minimum along ``axis``."""
    return _arg(jnp.argmin, x, axis, keep_dims, jnp.int32)


_ARG_DTYPES = {"int32": jnp.int32, "uint16": jnp.uint16}


def _arg_dtype(output_dtype: str):
    key = str(output_dtype).lower()
    if key not in _ARG_DTYPES:
        raise OpError(f"output_dtype must be one of {sorted(_ARG_DTYPES)}; found {output_dtype!r}")
    return _ARG_DTYPES[key]


@register("reduce_argmax", 17)
def reduce_argmax_ios17(x, *, axis=-1, keep_dims=False, output_dtype="int32"):
    """Index of the first maximum along ``axis``; iOS17 adds ``output_dtype`` (int32/uint16)."""
    return _arg(jnp.argmax, x, axis, keep_dims, _arg_dtype(output_dtype))


@register("reduce_argmin", 17)
def reduce_argmin_ios17(x, *, axis=-1, keep_dims=False, output_dtype="int32"):
    """Index of the first minimum along ``axis``; iOS17 adds ``output_dtype`` (int32/uint16)."""
    return _arg(jnp.argmin, x, axis, keep_dims, _arg_dtype(output_dtype))
