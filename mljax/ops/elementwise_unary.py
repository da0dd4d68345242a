"""MIL elementwise unary ops (coremltools ``defs/iOS15/elementwise_unary.py`` + iOS17 deltas).

All ops keep ``x``'s dtype.  iOS17 deltas: ``cast`` accepts int8/uint8/int16/uint16,
``clip`` requires ``alpha < beta``, and ``inverse``/``log``/``rsqrt`` accept an
``epsilon`` of another float dtype (cast to ``x``'s dtype in every opset here).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mljax.errors import OpError
from mljax.mil.types import dtype_from_name
from mljax.ops._elementwise_util import jax_dtype_of, like
from mljax.ops._registry import register

__all__ = [
    "abs", "acos", "asin", "atan", "atanh", "ceil", "clip", "clip_ios17", "cos", "cosh", "erf",
    "exp", "exp2", "floor", "inverse", "log", "logical_not", "round", "rsqrt", "sign", "sin",
    "sinh", "sqrt", "square", "tan", "tanh", "threshold", "cast", "cast_ios17",
]


def _simple(name: str, fn, doc: str):
    """Register a one-input op ``name`` computing ``fn(x)``."""
    def op(x):
        return fn(x)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc
    return register(name)(op)


abs = _simple("abs", jnp.abs, "``|x|`` (fp16, fp32, int32).")
acos = _simple("acos", jnp.arccos, "Inverse cosine; NaN outside [-1, 1].")
asin = _simple("asin", jnp.arcsin, "Inverse sine; NaN outside [-1, 1].")
atan = _simple("atan", jnp.arctan, "Inverse tangent.")
atanh = _simple("atanh", jnp.arctanh, "Inverse hyperbolic tangent; +-inf at +-1.")
ceil = _simple("ceil", jnp.ceil, "Round towards +inf.")
cos = _simple("cos", jnp.cos, "Cosine.")
cosh = _simple("cosh", jnp.cosh, "Hyperbolic cosine.")
erf = _simple("erf", jax.lax.erf, "Gauss error function.")
exp = _simple("exp", jnp.exp, "``e ** x``.")
floor = _simple("floor", jnp.floor, "Round towards -inf.")
sign = _simple("sign", jnp.sign, "-1, 0 or 1 (fp16, fp32, int32).")
sin = _simple("sin", jnp.sin, "Sine.")
sinh = _simple("sinh", jnp.sinh, "Hyperbolic sine.")
sqrt = _simple("sqrt", jnp.sqrt, "Square root; NaN for negative inputs.")
tan = _simple("tan", jnp.tan, "Tangent.")
tanh = _simple("tanh", jnp.tanh, "Hyperbolic tangent.")
# MIL: "0.5 is rounded to 0" -- round half to even, as NumPy.
round = _simple("round", jnp.round, "Round to nearest, ties to even (0.5 -> 0, 1.5 -> 2).")


@register("square")
def square(x):
    """``x * x`` (fp16, fp32, int32)."""
    return x * x


@register("exp2")
def exp2(x):
    """``2 ** x``; for int32 ``x`` the result is truncated to int32 (negative x -> 0)."""
    if jnp.issubdtype(jnp.result_type(x), jnp.integer):
        return jnp.exp2(jnp.asarray(x).astype(jnp.float32)).astype(jnp.result_type(x))
    return jnp.exp2(x)


@register("logical_not")
def logical_not(x):
    """Boolean NOT (non-zero numbers count as true)."""
    return jnp.logical_not(x)


@register("clip")
def clip(x, *, alpha, beta):
    """``min(max(x, alpha), beta)``; iOS15 does not check ``alpha < beta``."""
    return jnp.minimum(jnp.maximum(x, like(alpha, x)), like(beta, x))


@register("clip", 17)
def clip_ios17(x, *, alpha, beta):
    """``min(max(x, alpha), beta)``; iOS17 requires ``alpha < beta``."""
    if not alpha < beta:
        raise OpError(f"clip: alpha must be smaller than beta; found alpha={alpha}, beta={beta}")
    return clip(x, alpha=alpha, beta=beta)


@register("threshold")
def threshold(x, *, alpha):
    """``max(x, alpha)`` (fp16, fp32, int32)."""
    return jnp.maximum(x, like(alpha, x))


@register("inverse")
def inverse(x, *, epsilon=1e-4):
    """``1 / (x + epsilon)``."""
    return 1 / (x + like(epsilon, x))


@register("log")
def log(x, *, epsilon=1e-45):
    """``log(x + epsilon)``.

    The default epsilon is subnormal in fp32 (and 0 in fp16); XLA flushes subnormals, so
    ``log(0)`` is ``-inf`` here where NumPy gives about -103.3.
    """
    return jnp.log(x + like(epsilon, x))


@register("rsqrt")
def rsqrt(x, *, epsilon=1e-12):
    """``1 / sqrt(x + epsilon)``."""
    return jax.lax.rsqrt(x + like(epsilon, x))


_CAST_IOS15 = ("int32", "fp16", "fp32", "bool")
_CAST_IOS17 = _CAST_IOS15 + ("int8", "uint8", "int16", "uint16")


def _cast(x, dtype: str, allowed: tuple[str, ...], opset: str, ctx):
    if dtype not in allowed:
        raise OpError(f"cast ({opset}): dtype must be one of {allowed}; found {dtype!r}")
    target = dtype_from_name(dtype)
    if ctx is not None:
        target = ctx.compute_dtype(target)
    # float -> int truncates towards zero (NumPy astype); anything -> bool is ``x != 0``.
    return jnp.asarray(x).astype(jax_dtype_of(target.numpy))


@register("cast")
def cast(x, *, dtype, ctx=None):
    """``x`` converted to ``dtype`` (int32, fp16, fp32, bool); float -> int truncates."""
    return _cast(x, dtype, _CAST_IOS15, "iOS15", ctx)


@register("cast", 17)
def cast_ios17(x, *, dtype, ctx=None):
    """iOS17 ``cast``: also int8, uint8, int16 and uint16."""
    return _cast(x, dtype, _CAST_IOS17, "iOS17", ctx)
