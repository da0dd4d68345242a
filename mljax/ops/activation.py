"""MIL activation ops (coremltools ``defs/iOS15/activation.py``, ``defs/iOS17/activation.py``).

Every op computes in ``x``'s dtype.  The iOS17 versions only let ``alpha``/``beta`` have a
dtype other than ``x``'s; parameters are cast to ``x``'s dtype in every opset, so one
implementation serves iOS15-iOS18.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mljax.errors import OpError
from mljax.ops._elementwise_util import channel_param, like, normalize_axis
from mljax.ops._registry import register

__all__ = [
    "clamped_relu", "elu", "gelu", "leaky_relu", "linear_activation", "prelu", "relu", "relu6",
    "scaled_tanh", "sigmoid", "sigmoid_hard", "silu", "softplus", "softplus_parametric",
    "softmax", "softsign", "thresholded_relu",
]

_GELU_MODES = ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")


@register("clamped_relu")
def clamped_relu(x, *, alpha, beta):
    """``min(beta, x)`` for ``x >= 0``, else ``min(beta, alpha * x)``."""
    alpha, beta = like(alpha, x), like(beta, x)
    return jnp.minimum(jnp.where(x >= 0, x, alpha * x), beta)


@register("elu")
def elu(x, *, alpha):
    """``x`` for ``x > 0``, else ``alpha * (exp(x) - 1)``."""
    # expm1 of min(x, 0): the branch not taken stays finite, so gradients are not NaN for large x
    return jnp.where(x > 0, x, like(alpha, x) * jnp.expm1(jnp.minimum(x, 0)))


@register("gelu")
def gelu(x, *, mode="EXACT"):
    """Gaussian error linear unit; ``mode`` is EXACT, TANH_APPROXIMATION or SIGMOID_APPROXIMATION."""
    if mode == "EXACT":
        return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))
    if mode == "TANH_APPROXIMATION":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1 + jnp.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * jax.nn.sigmoid(1.702 * x)
    raise OpError(f"gelu mode must be one of {_GELU_MODES}; found {mode!r}")


@register("leaky_relu")
def leaky_relu(x, *, alpha):
    """``x`` for ``x >= 0``, else ``alpha * x``."""
    return jnp.where(x >= 0, x, like(alpha, x) * x)


@register("linear_activation")
def linear_activation(x, *, alpha, beta):
    """``alpha * x + beta``."""
    return like(alpha, x) * x + like(beta, x)


@register("prelu")
def prelu(x, alpha):
    """Per-channel leaky relu: ``x`` if ``x > 0`` else ``alpha[c] * x`` with ``c`` on axis 1.

    MIL restricts ``x`` to rank 3-5; any rank >= 2 works here.
    """
    _check_rank(x, 2, "prelu")
    return jnp.where(x > 0, x, channel_param(alpha, x, 1, "prelu alpha") * x)


@register("relu")
def relu(x):
    """``max(x, 0)``."""
    return jnp.maximum(x, jnp.zeros((), jnp.result_type(x)))


@register("relu6")
def relu6(x):
    """``min(max(x, 0), 6)``."""
    return jnp.clip(x, 0, 6).astype(jnp.result_type(x))


@register("scaled_tanh")
def scaled_tanh(x, *, alpha, beta):
    """``alpha * tanh(beta * x)``."""
    return like(alpha, x) * jnp.tanh(like(beta, x) * x)


@register("sigmoid")
def sigmoid(x):
    """``1 / (1 + exp(-x))``."""
    return jax.nn.sigmoid(x)


@register("sigmoid_hard")
def sigmoid_hard(x, *, alpha, beta):
    """``min(max(alpha * x + beta, 0), 1)``."""
    y = like(alpha, x) * x + like(beta, x)
    return jnp.clip(y, 0, 1).astype(jnp.result_type(x))


@register("silu")
def silu(x):
    """``x * sigmoid(x)`` (swish)."""
    return x * jax.nn.sigmoid(x)


@register("softplus")
def softplus(x):
    """``log(1 + exp(x))``, computed without overflow."""
    return jax.nn.softplus(x)


@register("softplus_parametric")
def softplus_parametric(x, alpha, beta):
    """``alpha[c] * log(1 + exp(beta[c] * x))`` with ``c`` on axis 1 (MIL: rank >= 3)."""
    _check_rank(x, 2, "softplus_parametric")
    a = channel_param(alpha, x, 1, "softplus_parametric alpha")
    b = channel_param(beta, x, 1, "softplus_parametric beta")
    return a * jax.nn.softplus(b * x)


@register("softmax")
def softmax(x, *, axis=-1):
    """``exp(x) / sum(exp(x), axis)``, shifted by the max for stability."""
    return jax.nn.softmax(x, axis=normalize_axis(axis, jnp.ndim(x)))


@register("softsign")
def softsign(x):
    """``x / (1 + |x|)``."""
    return x / (1 + jnp.abs(x))


@register("thresholded_relu")
def thresholded_relu(x, *, alpha):
    """``x`` where ``x >= alpha``, else 0."""
    return jnp.where(x >= like(alpha, x), x, jnp.zeros((), jnp.result_type(x)))


def _check_rank(x, minimum: int, op: str) -> None:
    if jnp.ndim(x) < minimum:
        raise OpError(f"{op}: x must have rank >= {minimum} (channels on axis 1); "
                      f"found shape {tuple(jnp.shape(x))}")
