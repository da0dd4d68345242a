"""MIL normalization ops (coremltools ``defs/iOS15/normalization.py``, ``defs/iOS17/normalization.py``).

Outputs keep ``x``'s dtype.  The iOS17 versions only let the parameters (mean, variance,
gamma, beta, epsilon, ...) have a float dtype other than ``x``'s; they are cast to ``x``'s
dtype in every opset, so one implementation serves iOS15-iOS18.  Statistics use
``jnp.mean``, which accumulates fp16 in fp32 and rounds the result back to fp16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mljax.errors import OpError
from mljax.ops._elementwise_util import channel_param, like, normalize_axes
from mljax.ops._registry import register

__all__ = ["batch_norm", "instance_norm", "l2_norm", "layer_norm", "local_response_norm"]


def _require_rank(x, minimum: int, op: str, what: str) -> None:
    if jnp.ndim(x) < minimum:
        raise OpError(f"{op}: x must have rank >= {minimum} ({what}); found shape {tuple(jnp.shape(x))}")


def _scale_shift(y, x, gamma, beta, axis: int = 1, op: str = ""):
    if gamma is not None:
        y = y * channel_param(gamma, x, axis, f"{op} gamma")
    if beta is not None:
        y = y + channel_param(beta, x, axis, f"{op} beta")
    return y


@register("batch_norm")
def batch_norm(x, mean, variance, gamma=None, beta=None, *, epsilon=1e-5):
    """``gamma * (x - mean) / sqrt(variance + epsilon) + beta`` per channel (axis 1).

    MIL restricts ``x`` to rank 3-5; rank 2 (``[N, C]``) works too.  ``1/sqrt(variance +
    epsilon)`` is formed in at least fp32 and then rounded to ``x``'s dtype, so an fp16
    epsilon below fp16's normal range is not lost.
    """
    _require_rank(x, 2, "batch_norm", "[N, C, *D]")
    wide = jnp.promote_types(jnp.result_type(x), jnp.float32)
    inv_std = jax.lax.rsqrt(jnp.asarray(variance).astype(wide) + epsilon)
    y = (x - channel_param(mean, x, 1, "batch_norm mean")) * channel_param(inv_std, x, 1)
    return _scale_shift(y, x, gamma, beta, 1, "batch_norm")


def _normalize(x, axes: tuple[int, ...], epsilon):
    """``(x - mean) / sqrt(var + epsilon)`` over ``axes`` (population variance)."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=axes, keepdims=True)
    return centered * jax.lax.rsqrt(var + like(epsilon, x))


@register("instance_norm")
def instance_norm(x, gamma=None, beta=None, *, epsilon=1e-5):
    """Normalize each (batch, channel) over the spatial axes 2.., then scale/shift per channel.

    MIL restricts ``x`` to rank 3-4; any rank >= 3 works here.
    """
    _require_rank(x, 3, "instance_norm", "[N, C, *D]")
    y = _normalize(x, tuple(range(2, jnp.ndim(x))), epsilon)
    return _scale_shift(y, x, gamma, beta, 1, "instance_norm")


@register("l2_norm")
def l2_norm(x, *, epsilon=1e-6):
    """``x / sqrt(sum(x**2) + epsilon)`` over the last three axes; leading axes are batch."""
    _require_rank(x, 3, "l2_norm", "[*B, D1, D2, D3]")
    axes = tuple(range(jnp.ndim(x) - 3, jnp.ndim(x)))
    square_sum = jnp.sum(x * x, axis=axes, keepdims=True)
    return x * jax.lax.rsqrt(square_sum + like(epsilon, x))


@register("layer_norm")
def layer_norm(x, gamma=None, beta=None, *, axes=None, epsilon=1e-5):
    """``gamma * (x - E[x]) / sqrt(Var[x] + epsilon) + beta`` over ``axes`` (None = all).

    ``gamma``/``beta`` have the shape of ``x`` restricted to ``axes`` (in axis order).
    """
    rank = jnp.ndim(x)
    axes = normalize_axes(axes, rank)
    y = _normalize(x, axes, epsilon)
    param_shape = [jnp.shape(x)[i] if i in axes else 1 for i in range(rank)]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is None:
            continue
        p = jnp.asarray(like(p, x))
        if p.size != _prod(param_shape):
            raise OpError(f"layer_norm: {name} must have shape {[jnp.shape(x)[i] for i in axes]} "
                          f"(x's shape on axes {list(axes)}); found {tuple(p.shape)}")
        p = p.reshape(param_shape)
        y = y * p if name == "gamma" else y + p
    return y


@register("local_response_norm")
def local_response_norm(x, *, size, alpha=1e-4, beta=0.75, k=1.0):
    """``x / (k + alpha / size * sum_window(x**2)) ** beta`` across channels.

    As Core ML's LRN layer, the channel axis is -3 (``[*B, C, H, W]``; for a rank-3 input
    the first axis), which matches coremltools' reference values.  The window for channel
    ``c`` is ``[c - size // 2, c + (size - 1) // 2]`` (PyTorch's; the same for odd sizes).
    """
    _require_rank(x, 3, "local_response_norm", "[*B, C, H, W]")
    size = int(size)
    rank = jnp.ndim(x)
    window = [1] * rank
    window[rank - 3] = size
    padding = [(0, 0)] * rank
    padding[rank - 3] = (size // 2, (size - 1) // 2)
    square = x * x
    zero = jnp.zeros((), square.dtype)
    window_sum = jax.lax.reduce_window(square, zero, jax.lax.add, tuple(window),
                                       (1,) * rank, padding)
    denom = like(k, x) + (like(alpha, x) / size) * window_sum
    return x / denom ** like(beta, x)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
