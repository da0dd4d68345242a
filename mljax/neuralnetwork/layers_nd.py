"""Rank-N layers (Core ML spec 4+): elementwise math, comparisons, reductions, matmul,
normalization, random, cumulative and sorting layers.

Values that are NumPy constants (``getShape`` results, small ``loadConstantND`` data) stay
NumPy through the elementwise layers, so they may feed layers that need static shapes.
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.errors import ModelFormatError
from mljax.neuralnetwork._base import layer, static_value, xp
from mljax.neuralnetwork.weights import decode_weights

_HIGHEST = lax.Precision.HIGHEST


def _f(x):
    """Booleans as the 1.0 / 0.0 floats NeuralNetwork blobs hold."""
    return xp(x).asarray(x).astype(np.float32)


# --- elementwise unary ------------------------------------------------------------------------
_UNARY = {
    "ceil": "ceil", "floor": "floor", "sign": "sign", "round": "round", "exp2": "exp2",
    "sin": "sin", "cos": "cos", "tan": "tan", "asin": "arcsin", "acos": "arccos", "atan": "arctan",
    "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "asinh": "arcsinh", "acosh": "arccosh",
    "atanh": "arctanh",
}


def _register_unary(kind: str, fname: str) -> None:
    def fn(p, w, xs, ctx):
        return getattr(xp(xs[0]), fname)(xs[0])
    fn.__doc__ = f"Elementwise ``{fname}``."
    layer(kind)(fn)


for _kind, _fname in _UNARY.items():
    _register_unary(_kind, _fname)


@layer("erf")
def erf(p, w, xs, ctx):
    return jax.scipy.special.erf(xs[0])


@layer("gelu")
def gelu(p, w, xs, ctx):
    """EXACT (erf), TANH_APPROXIMATION or SIGMOID_APPROXIMATION (``x * sigmoid(1.702 x)``)."""
    x = xs[0]
    if p.mode == 2:
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=p.mode == 1)


@layer("clip")
def clip(p, w, xs, ctx):
    return xp(xs[0]).minimum(xp(xs[0]).maximum(xs[0], p.minVal), p.maxVal)


@layer("clampedReLU")
def clamped_relu(p, w, xs, ctx):
    """``min(beta, x)`` for x >= 0, ``min(beta, alpha * x)`` otherwise."""
    x = xs[0]
    return jnp.minimum(p.beta, jnp.where(x >= 0, x, p.alpha * x))


# --- comparisons, logic, broadcastable arithmetic -----------------------------------------------
_COMPARE = {"equal": "equal", "notEqual": "not_equal", "lessThan": "less", "lessEqual": "less_equal",
            "greaterThan": "greater", "greaterEqual": "greater_equal"}


def _register_compare(kind: str, fname: str) -> None:
    def fn(p, w, xs, ctx):
        other = xs[1] if len(xs) > 1 else np.float32(p.alpha)
        return _f(getattr(xp(xs[0], other), fname)(xs[0], other))
    fn.__doc__ = f"``{fname}(x1, x2)`` (or against ``alpha``) as 1.0 / 0.0."
    layer(kind)(fn)


for _kind, _fname in _COMPARE.items():
    _register_compare(_kind, _fname)


@layer("logicalAnd")
def logical_and(p, w, xs, ctx):
    return _f(xp(*xs).logical_and(xs[0] != 0, xs[1] != 0))


@layer("logicalOr")
def logical_or(p, w, xs, ctx):
    return _f(xp(*xs).logical_or(xs[0] != 0, xs[1] != 0))


@layer("logicalXor")
def logical_xor(p, w, xs, ctx):
    return _f(xp(*xs).logical_xor(xs[0] != 0, xs[1] != 0))


@layer("logicalNot")
def logical_not(p, w, xs, ctx):
    return _f(xs[0] == 0)


_BINARY = {"addBroadcastable": "add", "subtractBroadcastable": "subtract",
           "multiplyBroadcastable": "multiply", "divideBroadcastable": "divide",
           "floorDivBroadcastable": "floor_divide", "modBroadcastable": "mod",
           "maxBroadcastable": "maximum", "minBroadcastable": "minimum", "powBroadcastable": "power"}


def _register_binary(kind: str, fname: str) -> None:
    def fn(p, w, xs, ctx):
        m = xp(*xs)
        out = xs[0]
        for x in xs[1:]:
            out = getattr(m, fname)(out, x)
        return out
    fn.__doc__ = f"``{fname}`` with NumPy broadcasting."
    layer(kind)(fn)


for _kind, _fname in _BINARY.items():
    _register_binary(_kind, _fname)


@layer("whereBroadcastable")
def where_broadcastable(p, w, xs, ctx):
    return xp(*xs).where(xs[0] != 0, xs[1], xs[2])


# --- reductions -----------------------------------------------------------------------------
def _reduce_axes(p, x):
    if p.reduceAll or not len(p.axes):
        return tuple(range(x.ndim))
    return tuple(int(a) % x.ndim for a in p.axes)


_REDUCE = {
    "reduceSum": lambda m, x, a, k: m.sum(x, axis=a, keepdims=k),
    "reduceMean": lambda m, x, a, k: m.mean(x, axis=a, keepdims=k),
    "reduceProd": lambda m, x, a, k: m.prod(x, axis=a, keepdims=k),
    "reduceMax": lambda m, x, a, k: m.max(x, axis=a, keepdims=k),
    "reduceMin": lambda m, x, a, k: m.min(x, axis=a, keepdims=k),
    "reduceL1": lambda m, x, a, k: m.sum(m.abs(x), axis=a, keepdims=k),
    "reduceL2": lambda m, x, a, k: m.sqrt(m.sum(x * x, axis=a, keepdims=k)),
    "reduceSumSquare": lambda m, x, a, k: m.sum(x * x, axis=a, keepdims=k),
    "reduceLogSum": lambda m, x, a, k: m.log(m.sum(x, axis=a, keepdims=k)),
    "reduceLogSumExp": lambda m, x, a, k: jax.scipy.special.logsumexp(x, axis=a, keepdims=k),
}


def _register_reduce(kind: str, op) -> None:
    def fn(p, w, xs, ctx):
        x = xs[0]
        y = op(xp(x) if kind != "reduceLogSumExp" else jnp, x, _reduce_axes(p, x), bool(p.keepDims))
        return y.reshape((1,)) if y.ndim == 0 else y     # NeuralNetwork blobs have rank >= 1
    fn.__doc__ = f"``{kind}`` over ``axes`` (all with reduceAll), keepDims as given."
    layer(kind)(fn)


for _kind, _op in _REDUCE.items():
    _register_reduce(_kind, _op)


def _arg(p, xs, f):
    x = xs[0]
    axis = int(p.axis) % x.ndim
    y = f(x, axis=axis, keepdims=not p.removeDim or x.ndim == 1)
    return y.astype(jnp.int32)


@layer("argMax")
def arg_max(p, w, xs, ctx):
    return _arg(p, xs, jnp.argmax)


@layer("argMin")
def arg_min(p, w, xs, ctx):
    return _arg(p, xs, jnp.argmin)


@layer("topK")
def top_k(p, w, xs, ctx):
    """Values and indices of the K largest (smallest with useBottomK) along ``axis``."""
    x = xs[0]
    k = int(static_value(xs[1], ctx, "K").reshape(-1)[0]) if len(xs) > 1 else int(p.K)
    axis = int(p.axis) % x.ndim
    moved = jnp.moveaxis(x, axis, -1)
    vals, idx = lax.top_k(-moved if p.useBottomK else moved, k)
    vals = -vals if p.useBottomK else vals
    return jnp.moveaxis(vals, -1, axis), jnp.moveaxis(idx, -1, axis)


@layer("argSort")
def arg_sort(p, w, xs, ctx):
    x = xs[0]
    idx = jnp.argsort(-x if p.descending else x, axis=int(p.axis), stable=True)
    return idx.astype(jnp.int32)


@layer("cumSum")
def cum_sum(p, w, xs, ctx):
    """Cumulative sum along ``axis`` (second input overrides it); exclusive / reverse options."""
    x = xs[0]
    axis = int(static_value(xs[1], ctx, "axis").reshape(-1)[0]) if len(xs) > 1 else int(p.axis)
    axis %= x.ndim
    if p.reverse:
        x = jnp.flip(x, axis)
    y = jnp.cumsum(x, axis=axis)
    if p.excludeFinalSum:
        y = y - x
    return jnp.flip(y, axis) if p.reverse else y


# --- matmul, embedding, normalization -------------------------------------------------------
def _bmm_weights(p, lyr):
    if len(lyr.input) > 1:
        return {}
    rows, cols = p.weightMatrixFirstDimension, p.weightMatrixSecondDimension
    return {"weight": decode_weights(p.weights, (cols, rows), where="batchedMatmul weights"),
            "bias": decode_weights(p.bias, (cols,), where="batchedMatmul bias") if p.hasBias else None}


@layer("batchedMatmul", weights=_bmm_weights)
def batched_matmul(p, w, xs, ctx):
    """``a @ b`` with broadcasting (two inputs) or ``a @ W + bias`` (W stored as ``[X2, X1]``)."""
    a = xs[0]
    if p.transposeA and a.ndim >= 2:
        a = jnp.swapaxes(a, -1, -2)
    if len(xs) == 1:
        y = jnp.matmul(a, w["weight"].T, precision=_HIGHEST)
        return y + w["bias"] if "bias" in w else y
    b = xs[1]
    if p.transposeB and b.ndim >= 2:
        b = jnp.swapaxes(b, -1, -2)
    squeeze_a, squeeze_b = a.ndim == 1, b.ndim == 1
    a = a[None, :] if squeeze_a else a
    b = b[:, None] if squeeze_b else b
    y = jnp.matmul(a, b, precision=_HIGHEST)
    # Core ML keeps rank max(2, rank a, rank b): 1-D operands are not squeezed back.
    return y


def _embedding_nd_weights(p, _):
    return {"weight": decode_weights(p.weights, (p.embeddingSize, p.vocabSize), where="embeddingND weights"),
            "bias": decode_weights(p.bias, (p.embeddingSize,), where="embeddingND bias") if p.hasBias else None}


@layer("embeddingND", weights=_embedding_nd_weights)
def embedding_nd(p, w, xs, ctx):
    """Indices ``[.., 1]`` -> ``[.., embeddingSize]`` (weights stored ``[embeddingSize, vocab]``)."""
    x = xs[0]
    idx = jnp.clip(jnp.asarray(x).astype(jnp.int32), 0, p.vocabSize - 1)
    idx = idx.reshape(idx.shape[:-1]) if idx.ndim >= 2 and idx.shape[-1] == 1 else idx
    y = jnp.take(w["weight"].T, idx, axis=0)
    return y + w["bias"] if "bias" in w else y


def _layer_norm_weights(p, _):
    shape = tuple(int(s) for s in p.normalizedShape)
    return {"gamma": decode_weights(p.gamma, shape, where="layerNormalization gamma"),
            "beta": decode_weights(p.beta, shape, where="layerNormalization beta")}


@layer("layerNormalization", weights=_layer_norm_weights)
def layer_normalization(p, w, xs, ctx):
    x = xs[0]
    axes = tuple(range(x.ndim - len(p.normalizedShape), x.ndim))
    mean = jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) / jnp.sqrt(var + p.eps)
    if "gamma" in w:
        y = y * w["gamma"]
    return y + w["beta"] if "beta" in w else y


# --- random -----------------------------------------------------------------------------------
def _key(p, ctx):
    seed = int(p.seed)
    if seed < 0:   # "random" seed: stable per layer name, so a prediction is reproducible
        seed = zlib.crc32(ctx.name.encode())
    return jax.random.PRNGKey(seed)


def _shape_from(p, xs, ctx, kind: str):
    if kind == "Like":
        return tuple(xs[0].shape)
    if kind == "Static":
        shape = tuple(int(s) for s in p.outputShape)
    else:
        shape = tuple(int(s) for s in static_value(xs[0], ctx, "the output shape").reshape(-1))
    if any(d < 0 for d in shape) or int(np.prod([float(d) for d in shape])) > _MAX_RANDOM:
        raise ModelFormatError(f"NeuralNetwork layer {ctx.name!r}: output shape {shape}; expected sizes >= 0 "
                               f"and at most {_MAX_RANDOM:,} values")
    return shape


_MAX_RANDOM = 1 << 31


def _register_random(dist: str) -> None:
    for kind in ("Like", "Static", "Dynamic"):
        def fn(p, w, xs, ctx, kind=kind):
            shape, key = _shape_from(p, xs, ctx, kind), _key(p, ctx)
            if dist == "Normal":
                return p.mean + p.stdDev * jax.random.normal(key, shape)
            if dist == "Uniform":
                return jax.random.uniform(key, shape, minval=p.minVal, maxval=p.maxVal)
            return (jax.random.uniform(key, shape) < p.prob).astype(jnp.float32)
        fn.__doc__ = f"Random {dist.lower()} values; the output shape comes from the layer ({kind})."
        layer(f"random{dist}{kind}")(fn)


for _dist in ("Normal", "Uniform", "Bernoulli"):
    _register_random(_dist)


@layer("categoricalDistribution")
def categorical_distribution(p, w, xs, ctx):
    """``numSamples`` class indices per row of logits (or probabilities) along the last axis."""
    x = xs[0]
    temp = p.temperature or 1.0
    logits = x / temp if p.isLogits else jnp.log(x + (p.eps or 1e-10))
    samples = jax.random.categorical(_key(p, ctx), logits, axis=-1,
                                     shape=(int(p.numSamples),) + tuple(x.shape[:-1]))
    return jnp.moveaxis(samples, 0, -1).astype(jnp.float32)


# --- triangular masks -----------------------------------------------------------------------
def _band(x, lower: int, upper: int):
    m, n = x.shape[-2:]
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return jnp.where(keep, x, 0)


@layer("matrixBandPart")
def matrix_band_part(p, w, xs, ctx):
    return _band(xs[0], int(p.numLower), int(p.numUpper))


@layer("lowerTriangular")
def lower_triangular(p, w, xs, ctx):
    return jnp.tril(xs[0], int(p.k))


@layer("upperTriangular")
def upper_triangular(p, w, xs, ctx):
    return jnp.triu(xs[0], int(p.k))
