"""Rank-N layers (Core ML spec 4+): elementwise math, comparisons, reductions, matmul,
normalization, random, cumulative and sorting layers, as calls of the ML-program op functions
(:mod:`mljax.ops`).

Values that are NumPy constants (``getShape`` results, small ``loadConstantND`` data) stay
NumPy through the elementwise layers and reductions, so they may feed layers that need static
shapes; everything else goes through the MIL ops.
"""
from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np

from mljax.errors import ModelFormatError
from mljax.neuralnetwork._base import layer, static_value, xp
from mljax.neuralnetwork.layers_core import embed, static_or
from mljax.neuralnetwork.weights import decode_weights
from mljax.ops import activation as act_ops
from mljax.ops import elementwise_binary as bin_ops
from mljax.ops import elementwise_unary as un_ops
from mljax.ops import linear as linear_ops
from mljax.ops import normalization as norm_ops
from mljax.ops import random as random_ops
from mljax.ops import reduction as reduce_ops
from mljax.ops import tensor_operation as tensor_ops


def _f(x):
    """Booleans as the 1.0 / 0.0 floats NeuralNetwork blobs hold."""
    return xp(x).asarray(x).astype(np.float32)


# --- elementwise unary ------------------------------------------------------------------------
# layer -> (NumPy function for constant inputs, MIL op; asinh / acosh have no MIL op)
_UNARY = {
    "ceil": (np.ceil, un_ops.ceil), "floor": (np.floor, un_ops.floor), "sign": (np.sign, un_ops.sign),
    "round": (np.round, un_ops.round), "exp2": (np.exp2, un_ops.exp2), "sin": (np.sin, un_ops.sin),
    "cos": (np.cos, un_ops.cos), "tan": (np.tan, un_ops.tan), "asin": (np.arcsin, un_ops.asin),
    "acos": (np.arccos, un_ops.acos), "atan": (np.arctan, un_ops.atan), "sinh": (np.sinh, un_ops.sinh),
    "cosh": (np.cosh, un_ops.cosh), "tanh": (np.tanh, un_ops.tanh), "asinh": (np.arcsinh, jnp.arcsinh),
    "acosh": (np.arccosh, jnp.arccosh), "atanh": (np.arctanh, un_ops.atanh),
}


def _register_unary(kind: str, np_fn, op) -> None:
    def fn(p, w, xs, ctx):
        return static_or(np_fn, op, xs[0])(xs[0])
    fn.__doc__ = f"Elementwise ``{op.__name__}``."
    layer(kind)(fn)


for _kind, (_np_fn, _op) in _UNARY.items():
    _register_unary(_kind, _np_fn, _op)


@layer("erf")
def erf(p, w, xs, ctx):
    return un_ops.erf(xs[0])


_GELU_MODES = {0: "EXACT", 1: "TANH_APPROXIMATION", 2: "SIGMOID_APPROXIMATION"}


@layer("gelu")
def gelu(p, w, xs, ctx):
    """MIL ``gelu``: EXACT (erf), TANH_APPROXIMATION or SIGMOID_APPROXIMATION."""
    return act_ops.gelu(xs[0], mode=_GELU_MODES.get(int(p.mode), int(p.mode)))


@layer("clip")
def clip(p, w, xs, ctx):
    x = xs[0]
    if xp(x) is np:
        return np.minimum(np.maximum(x, p.minVal), p.maxVal)
    return un_ops.clip(x, alpha=p.minVal, beta=p.maxVal)


@layer("clampedReLU")
def clamped_relu(p, w, xs, ctx):
    """MIL ``clamped_relu``: ``min(beta, x)`` for x >= 0, ``min(beta, alpha * x)`` otherwise."""
    return act_ops.clamped_relu(xs[0], alpha=p.alpha, beta=p.beta)


# --- comparisons, logic, broadcastable arithmetic -----------------------------------------------
_COMPARE = {"equal": (np.equal, bin_ops.equal), "notEqual": (np.not_equal, bin_ops.not_equal),
            "lessThan": (np.less, bin_ops.less), "lessEqual": (np.less_equal, bin_ops.less_equal),
            "greaterThan": (np.greater, bin_ops.greater),
            "greaterEqual": (np.greater_equal, bin_ops.greater_equal)}


def _register_compare(kind: str, np_fn, op) -> None:
    def fn(p, w, xs, ctx):
        other = xs[1] if len(xs) > 1 else np.float32(p.alpha)
        return _f(static_or(np_fn, op, xs[0], other)(xs[0], other))
    fn.__doc__ = f"MIL ``{op.__name__}(x1, x2)`` (or against ``alpha``) as 1.0 / 0.0."
    layer(kind)(fn)


for _kind, (_np_fn, _op) in _COMPARE.items():
    _register_compare(_kind, _np_fn, _op)

_LOGICAL = {"logicalAnd": (np.logical_and, bin_ops.logical_and),
            "logicalOr": (np.logical_or, bin_ops.logical_or),
            "logicalXor": (np.logical_xor, bin_ops.logical_xor)}


def _register_logical(kind: str, np_fn, op) -> None:
    def fn(p, w, xs, ctx):
        return _f(static_or(np_fn, op, *xs)(xs[0] != 0, xs[1] != 0))
    fn.__doc__ = f"MIL ``{op.__name__}`` of the inputs' truth values, as 1.0 / 0.0."
    layer(kind)(fn)


for _kind, (_np_fn, _op) in _LOGICAL.items():
    _register_logical(_kind, _np_fn, _op)


@layer("logicalNot")
def logical_not(p, w, xs, ctx):
    return _f(xs[0] == 0)


_BINARY = {"addBroadcastable": (np.add, bin_ops.add), "subtractBroadcastable": (np.subtract, bin_ops.sub),
           "multiplyBroadcastable": (np.multiply, bin_ops.mul),
           "divideBroadcastable": (np.divide, bin_ops.real_div),
           "floorDivBroadcastable": (np.floor_divide, bin_ops.floor_div),
           "modBroadcastable": (np.mod, bin_ops.mod), "maxBroadcastable": (np.maximum, bin_ops.maximum),
           "minBroadcastable": (np.minimum, bin_ops.minimum), "powBroadcastable": (np.power, bin_ops.pow)}


def _register_binary(kind: str, np_fn, op) -> None:
    def fn(p, w, xs, ctx):
        f = static_or(np_fn, op, *xs)
        out = xs[0]
        for x in xs[1:]:
            out = f(out, x)
        return out
    fn.__doc__ = f"MIL ``{op.__name__}`` with NumPy broadcasting."
    layer(kind)(fn)


for _kind, (_np_fn, _op) in _BINARY.items():
    _register_binary(_kind, _np_fn, _op)


@layer("whereBroadcastable")
def where_broadcastable(p, w, xs, ctx):
    if xp(*xs) is np:
        return np.where(xs[0] != 0, xs[1], xs[2])
    from mljax.ops.control_flow import select
    return select(jnp.asarray(xs[0]) != 0, xs[1], xs[2])


# --- reductions -----------------------------------------------------------------------------
def _reduce_axes(p, x):
    if p.reduceAll or not len(p.axes):
        return tuple(range(x.ndim))
    return tuple(int(a) % x.ndim for a in p.axes)


# layer -> (NumPy function for constant inputs (sum/prod/max/min of shapes), MIL op)
_REDUCE = {
    "reduceSum": (np.sum, reduce_ops.reduce_sum), "reduceMean": (np.mean, reduce_ops.reduce_mean),
    "reduceProd": (np.prod, reduce_ops.reduce_prod), "reduceMax": (np.max, reduce_ops.reduce_max),
    "reduceMin": (np.min, reduce_ops.reduce_min), "reduceL1": (None, reduce_ops.reduce_l1_norm),
    "reduceL2": (None, reduce_ops.reduce_l2_norm), "reduceSumSquare": (None, reduce_ops.reduce_sum_square),
    "reduceLogSum": (None, reduce_ops.reduce_log_sum), "reduceLogSumExp": (None, reduce_ops.reduce_log_sum_exp),
}


def _register_reduce(kind: str, np_fn, op) -> None:
    def fn(p, w, xs, ctx):
        x = xs[0]
        axes, keep = _reduce_axes(p, x), bool(p.keepDims)
        if np_fn is not None and xp(x) is np:
            y = np.asarray(np_fn(x, axis=axes, keepdims=keep))
        else:
            y = op(x, axes=list(axes), keep_dims=keep)
        return y.reshape((1,)) if y.ndim == 0 else y     # NeuralNetwork blobs have rank >= 1
    fn.__doc__ = f"MIL ``{op.__name__}`` over ``axes`` (all with reduceAll), keepDims as given."
    layer(kind)(fn)


for _kind, (_np_fn, _op) in _REDUCE.items():
    _register_reduce(_kind, _np_fn, _op)


def _arg(p, xs, op):
    x = xs[0]
    axis = int(p.axis) % x.ndim
    return op(x, axis=axis, keep_dims=not p.removeDim or x.ndim == 1).astype(jnp.int32)


@layer("argMax")
def arg_max(p, w, xs, ctx):
    return _arg(p, xs, reduce_ops.reduce_argmax)


@layer("argMin")
def arg_min(p, w, xs, ctx):
    return _arg(p, xs, reduce_ops.reduce_argmin)


@layer("topK")
def top_k(p, w, xs, ctx):
    """Values and indices of the K largest (smallest with useBottomK) along ``axis``."""
    k = int(static_value(xs[1], ctx, "K").reshape(-1)[0]) if len(xs) > 1 else int(p.K)
    return tensor_ops.topk(xs[0], k=k, axis=int(p.axis), ascending=bool(p.useBottomK))


@layer("argSort")
def arg_sort(p, w, xs, ctx):
    return tensor_ops.argsort(xs[0], axis=int(p.axis), ascending=not p.descending).astype(jnp.int32)


@layer("cumSum")
def cum_sum(p, w, xs, ctx):
    """Cumulative sum along ``axis`` (second input overrides it); exclusive / reverse options."""
    axis = int(static_value(xs[1], ctx, "axis").reshape(-1)[0]) if len(xs) > 1 else int(p.axis)
    return tensor_ops.cumsum(xs[0], axis=axis, exclusive=bool(p.excludeFinalSum), reverse=bool(p.reverse))


# --- matmul, embedding, normalization -------------------------------------------------------
def _bmm_weights(p, lyr):
    if len(lyr.input) > 1:
        return {}
    rows, cols = p.weightMatrixFirstDimension, p.weightMatrixSecondDimension
    return {"weight": decode_weights(p.weights, (cols, rows), where="batchedMatmul weights"),
            "bias": decode_weights(p.bias, (cols,), where="batchedMatmul bias") if p.hasBias else None}


@layer("batchedMatmul", weights=_bmm_weights)
def batched_matmul(p, w, xs, ctx):
    """MIL ``matmul`` with broadcasting (two inputs) or MIL ``linear``: ``a @ W + bias`` (W stored
    as ``[X2, X1]``).

    With one input Core ML ignores transposeA / transposeB (coremltools writes an explicit
    transpose layer before it and stores W already transposed).
    """
    a = xs[0]
    if len(xs) == 1:
        return linear_ops.linear(a, w["weight"], w.get("bias"))
    b = xs[1]
    # Core ML keeps rank max(2, rank a, rank b): 1-D operands are not squeezed back.
    a = a[None, :] if a.ndim == 1 else a
    b = b[:, None] if b.ndim == 1 else b
    return linear_ops.matmul(a, b, transpose_x=bool(p.transposeA), transpose_y=bool(p.transposeB))


def _embedding_nd_weights(p, _):
    return {"weight": decode_weights(p.weights, (p.embeddingSize, p.vocabSize), where="embeddingND weights"),
            "bias": decode_weights(p.bias, (p.embeddingSize,), where="embeddingND bias") if p.hasBias else None}


@layer("embeddingND", weights=_embedding_nd_weights)
def embedding_nd(p, w, xs, ctx):
    """Indices ``[.., 1]`` -> ``[.., embeddingSize]`` (weights stored ``[embeddingSize, vocab]``)."""
    idx = jnp.asarray(xs[0])
    idx = idx.reshape(idx.shape[:-1]) if idx.ndim >= 2 and idx.shape[-1] == 1 else idx
    return embed(idx, w["weight"], w.get("bias"), p.vocabSize)


def _layer_norm_weights(p, _):
    shape = tuple(int(s) for s in p.normalizedShape)
    return {"gamma": decode_weights(p.gamma, shape, where="layerNormalization gamma"),
            "beta": decode_weights(p.beta, shape, where="layerNormalization beta")}


@layer("layerNormalization", weights=_layer_norm_weights)
def layer_normalization(p, w, xs, ctx):
    """MIL ``layer_norm`` over the trailing ``len(normalizedShape)`` axes."""
    x = xs[0]
    axes = list(range(x.ndim - len(p.normalizedShape), x.ndim))
    return norm_ops.layer_norm(x, w.get("gamma"), w.get("beta"), axes=axes, epsilon=p.eps)


# --- random -----------------------------------------------------------------------------------
def _random_ctx(ctx):
    """What the MIL random ops read of their context: the name salts a ``seed < 0`` key, which is
    the per-prediction call key (fresh values each call, as ML programs draw them)."""
    return SimpleNamespace(name=ctx.name, rng=None, output_types=())


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
#: NeuralNetwork random layers' kinds (a seed < 0 needs a fresh key per prediction).
RANDOM_LAYERS = frozenset([f"random{d}{k}" for d in ("Normal", "Uniform", "Bernoulli")
                           for k in ("Like", "Static", "Dynamic")] + ["categoricalDistribution"])


def _draw(dist: str, p, shape, ctx):
    rctx = _random_ctx(ctx)
    if dist == "Normal":
        return random_ops.random_normal(shape=shape, mean=p.mean, stddev=p.stdDev, seed=p.seed, ctx=rctx)
    if dist == "Uniform":
        return random_ops.random_uniform(shape=shape, low=p.minVal, high=p.maxVal, seed=p.seed, ctx=rctx)
    return random_ops.random_bernoulli(shape=shape, prob=p.prob, seed=p.seed, ctx=rctx)


def _register_random(dist: str) -> None:
    for kind in ("Like", "Static", "Dynamic"):
        def fn(p, w, xs, ctx, kind=kind):
            return _draw(dist, p, _shape_from(p, xs, ctx, kind), ctx)
        fn.__doc__ = (f"MIL ``random_{dist.lower()}``; the output shape comes from the layer ({kind}); "
                      "a seed < 0 draws fresh values per prediction.")
        layer(f"random{dist}{kind}")(fn)


for _dist in ("Normal", "Uniform", "Bernoulli"):
    _register_random(_dist)


@layer("categoricalDistribution")
def categorical_distribution(p, w, xs, ctx):
    """MIL ``random_categorical``: ``numSamples`` class indices per row of logits (or probabilities)
    along the last axis."""
    x = xs[0]
    temp = p.temperature or 1.0
    logits = x / temp if p.isLogits else jnp.log(x + (p.eps or 1e-10))
    return random_ops.random_categorical(jnp.asarray(logits, jnp.float32), mode="logits",
                                         size=int(p.numSamples), seed=p.seed, ctx=_random_ctx(ctx))


# --- triangular masks -----------------------------------------------------------------------
@layer("matrixBandPart")
def matrix_band_part(p, w, xs, ctx):
    return tensor_ops.band_part(xs[0], lower=int(p.numLower), upper=int(p.numUpper))


@layer("lowerTriangular")
def lower_triangular(p, w, xs, ctx):
    return jnp.tril(xs[0], int(p.k))


@layer("upperTriangular")
def upper_triangular(p, w, xs, ctx):
    return jnp.triu(xs[0], int(p.k))
