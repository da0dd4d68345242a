"""The classic NeuralNetwork layers: dense, convolution, normalization, activations, pooling, shapes.

Legacy layers see the last three axes as ``[C, H, W]``; leading axes (``[Seq, Batch]`` in the
rank-5 layout, anything in rank-N networks) are batch-like.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.neuralnetwork._base import as_rank5, fail, flat_lead, from_rank5, layer, xp
from mljax.neuralnetwork.weights import decode_weights
from mljax.ops.conv import _dense_or_grouped
from mljax.ops.pool import window_reduction

_HIGHEST = lax.Precision.HIGHEST


# --- activations ----------------------------------------------------------------------------
def _per_channel(v, x):
    """A per-channel (axis -3) parameter vector broadcastable against ``x``."""
    v = jnp.asarray(v).reshape(-1)
    if v.size == 1:
        return v.reshape(())
    return v.reshape((-1, 1, 1)) if x.ndim >= 3 else v


def activation_weights(p) -> dict:
    kind = p.WhichOneof("NonlinearityType")
    if kind == "PReLU":
        return {"alpha": decode_weights(p.PReLU.alpha, where="PReLU alpha")}
    if kind == "parametricSoftplus":
        return {"alpha": decode_weights(p.parametricSoftplus.alpha, where="softplus alpha"),
                "beta": decode_weights(p.parametricSoftplus.beta, where="softplus beta")}
    return {}


def apply_activation(p, x, w=None):
    """One ``ActivationParams`` nonlinearity applied to ``x``."""
    kind = p.WhichOneof("NonlinearityType")
    a = getattr(p, kind) if kind else None
    if kind in (None, "linear"):
        return x if a is None else a.alpha * x + a.beta
    if kind == "ReLU":
        return jnp.maximum(x, 0)
    if kind == "leakyReLU":
        return jnp.where(x >= 0, x, a.alpha * x)
    if kind == "thresholdedReLU":
        return jnp.where(x > a.alpha, x, 0)
    if kind == "PReLU":
        return jnp.where(x >= 0, x, _per_channel(w["alpha"], x) * x)
    if kind == "tanh":
        return jnp.tanh(x)
    if kind == "scaledTanh":
        return a.alpha * jnp.tanh(a.beta * x)
    if kind == "sigmoid":
        return jax.nn.sigmoid(x)
    if kind == "sigmoidHard":
        return jnp.clip(a.alpha * x + a.beta, 0, 1)
    if kind == "ELU":
        return jnp.where(x > 0, x, a.alpha * jnp.expm1(jnp.minimum(x, 0)))
    if kind == "softsign":
        return x / (1 + jnp.abs(x))
    if kind == "softplus":
        return jax.nn.softplus(x)
    if kind == "parametricSoftplus":
        return _per_channel(w["alpha"], x) * jax.nn.softplus(_per_channel(w["beta"], x) * x)
    raise NotImplementedError(kind)


@layer("activation", weights=lambda p, _: activation_weights(p))
def activation(p, w, xs, ctx):
    return apply_activation(p, xs[0], w)


# --- dense --------------------------------------------------------------------------------
def _ip_weights(p, _):
    shape = (p.outputChannels, p.inputChannels)
    return {"weight": decode_weights(p.weights, shape, where="innerProduct weights"),
            "bias": decode_weights(p.bias, (p.outputChannels,), where="innerProduct bias")
            if p.hasBias else None}


@layer("innerProduct", weights=_ip_weights)
def inner_product(p, w, xs, ctx):
    """Rank 1-3: a product over the last axis; rank 4/5: ``[x1(,x2), C*H*W] -> [.., C_out, 1, 1]``."""
    x, wt = xs[0], w["weight"]
    r = x.ndim
    lead = x.shape[:-1] if r <= 3 else x.shape[: r - 3]
    flat = x if r <= 3 else x.reshape(lead + (-1,))
    if flat.shape[-1] != wt.shape[1]:
        fail(ctx, f"expected {wt.shape[1]} input channels; found input shape {tuple(x.shape)}")
    y = jnp.matmul(flat, wt.T, precision=_HIGHEST)
    if "bias" in w:
        y = y + w["bias"]
    return y if r <= 3 else y.reshape(lead + (wt.shape[0], 1, 1))


def _embedding_weights(p, _):
    return {"weight": decode_weights(p.weights, (p.outputChannels, p.inputDim), where="embedding weights"),
            "bias": decode_weights(p.bias, (p.outputChannels,), where="embedding bias") if p.hasBias else None}


@layer("embedding", weights=_embedding_weights)
def embedding(p, w, xs, ctx):
    """Indices ``[.., 1, 1, 1]`` -> vectors ``[.., C_out, 1, 1]`` (weights are ``[C_out, vocab]``)."""
    x = xs[0]
    idx = x.reshape(x.shape[:-3]) if x.ndim >= 4 else x.reshape(x.shape[:-1]) if x.ndim > 1 else x
    idx = jnp.clip(jnp.asarray(idx).astype(jnp.int32), 0, p.inputDim - 1)
    y = jnp.take(w["weight"].T, idx, axis=0)
    if "bias" in w:
        y = y + w["bias"]
    return y.reshape(idx.shape + (p.outputChannels, 1, 1)) if x.ndim >= 4 else y


# --- convolution --------------------------------------------------------------------------
def _conv_weights(p, layer_msg):
    if len(layer_msg.input) > 1:
        return {}
    kh, kw = (list(p.kernelSize) + [3, 3])[:2]
    groups = p.nGroups or 1
    if p.isDeconvolution:
        shape, axis = (p.kernelChannels, p.outputChannels // groups, kh, kw), 1
    else:
        shape, axis = (p.outputChannels, p.kernelChannels, kh, kw), 0
    return {"weight": decode_weights(p.weights, shape, axis=axis, where="convolution weights"),
            "bias": decode_weights(p.bias, (p.outputChannels,), where="convolution bias") if p.hasBias else None}


def same_pads(size: int, k: int, s: int, d: int, top_left_heavy: bool) -> tuple[int, int]:
    """SAME padding: output ``ceil(size / s)``; the odd pixel goes to the end unless TOP_LEFT_HEAVY."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    small = total // 2
    return (total - small, small) if top_left_heavy else (small, total - small)


def _border(amounts) -> list[tuple[int, int]]:
    edges = [(int(e.startEdgeSize), int(e.endEdgeSize)) for e in amounts.borderAmounts]
    return (edges + [(0, 0), (0, 0)])[:2]


def _conv_geometry(p):
    k = [int(v) for v in (list(p.kernelSize) or [3, 3])]
    s = [int(v) for v in (list(p.stride) or [1, 1])]
    d = [int(v) for v in (list(p.dilationFactor) or [1, 1])]
    return k, s, d


def _crop_or_pad(y, axis: int, start: int, size: int):
    """``y[start:start+size]`` along ``axis``, zero-padded at the end when too short."""
    avail = y.shape[axis] - start
    y = lax.slice_in_dim(y, start, start + min(size, avail), axis=axis)
    if size > avail:
        pads = [(0, 0)] * y.ndim
        pads[axis] = (0, size - avail)
        y = jnp.pad(y, pads)
    return y


@layer("convolution", weights=_conv_weights)
def convolution(p, w, xs, ctx):
    """2-D convolution / transposed convolution over ``[.., C, H, W]`` (grouped, dilated)."""
    x = xs[0]
    wt = w["weight"] if "weight" in w else xs[1]
    xb, lead = flat_lead(x, 3)
    k, s, d = _conv_geometry(p)
    groups = int(p.nGroups or 1)
    if p.isDeconvolution:
        y = _deconv(p, xb, wt, k, s, d, groups)
    else:
        if p.WhichOneof("ConvolutionPaddingType") == "same":
            tl = p.same.asymmetryMode == 1
            pads = [same_pads(xb.shape[2 + i], k[i], s[i], d[i], tl) for i in range(2)]
        else:
            pads = _border(p.valid.paddingAmounts)
        # the MIL conv's path choice (depthwise taps, GEMMs, Winograd or XLA's convolution)
        y = _dense_or_grouped(xb, wt.astype(xb.dtype), tuple(s), pads, tuple(d), groups).astype(xb.dtype)
    if "bias" in w:
        y = y + w["bias"].reshape(-1, 1, 1)
    return y.reshape(lead + tuple(y.shape[1:]))


def _deconv(p, xb, wt, k, s, d, groups):
    cin = wt.shape[0]
    # [C_in, C_out/g, kh, kw] -> [C_out, C_in/g, kh, kw], spatially flipped: a transposed
    # convolution is a stride-1 convolution of the stride-dilated input.
    kern = wt.reshape((groups, cin // groups) + tuple(wt.shape[1:])).transpose(0, 2, 1, 3, 4)
    kern = kern.reshape((-1, cin // groups) + tuple(wt.shape[2:]))[:, :, ::-1, ::-1]
    full_pad = [(d[i] * (k[i] - 1),) * 2 for i in range(2)]
    y = lax.conv_general_dilated(xb, kern.astype(xb.dtype), (1, 1), full_pad, lhs_dilation=s,
                                 rhs_dilation=d, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                 feature_group_count=groups, precision=_HIGHEST)
    out_shape = [int(v) for v in p.outputShape]
    for i in range(2):
        full, size_in = y.shape[2 + i], xb.shape[2 + i]
        if p.WhichOneof("ConvolutionPaddingType") == "same":
            size = out_shape[i] if out_shape else size_in * s[i]
            total = max(full - size, 0)
            start = total - total // 2 if p.same.asymmetryMode == 1 else total // 2
        else:
            p0, p1 = _border(p.valid.paddingAmounts)[i]
            start, size = p0, (out_shape[i] if out_shape else full - p0 - p1)
        y = _crop_or_pad(y, 2 + i, start, size)
    return y


# --- normalization ------------------------------------------------------------------------
def _bn_weights(p, _):
    c = (p.channels,)
    out = {"gamma": decode_weights(p.gamma, c, where="batchnorm gamma"),
           "beta": decode_weights(p.beta, c, where="batchnorm beta")}
    if not p.computeMeanVar:
        out["mean"] = decode_weights(p.mean, c, where="batchnorm mean")
        out["variance"] = decode_weights(p.variance, c, where="batchnorm variance")
    return out


@layer("batchnorm", weights=_bn_weights)
def batchnorm(p, w, xs, ctx):
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` over channel axis -3.

    With ``computeMeanVar`` the statistics come from the input: per instance over H, W
    (``instanceNormalization``), else over every axis but C.
    """
    x = xs[0]
    ch = lambda v: v.reshape((-1, 1, 1)) if x.ndim >= 3 else v  # noqa: E731
    if p.computeMeanVar:
        axes = (-2, -1) if p.instanceNormalization else tuple(a for a in range(x.ndim) if a != x.ndim - 3)
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    else:
        mean, var = ch(w["mean"]), ch(w["variance"])
    return ch(w["gamma"]) * (x - mean) / jnp.sqrt(var + p.epsilon) + ch(w["beta"])


# --- pooling ------------------------------------------------------------------------------
def _pool_pads(p, h: int, wdt: int, k, s):
    """(pads used, pads that count as padding for averages) per spatial axis."""
    mode = p.WhichOneof("PoolingPaddingType")
    sizes = (h, wdt)
    if mode == "same":
        pads = [same_pads(sizes[i], k[i], s[i], 1, p.same.asymmetryMode == 1) for i in range(2)]
        return pads, pads
    if mode == "includeLastPixel":
        amounts = (list(p.includeLastPixel.paddingAmounts) + [0, 0])[:2]
        pads, counted = [], []
        for i in range(2):
            pad = int(amounts[i])
            out = -(-(sizes[i] + 2 * pad - k[i]) // s[i]) + 1
            if pad and (out - 1) * s[i] >= sizes[i] + pad:
                out -= 1
            end = max((out - 1) * s[i] + k[i] - sizes[i] - pad, 0)
            pads.append((pad, end))
            counted.append((pad, min(pad, end)))
        return pads, counted
    pads = _border(p.valid.paddingAmounts)
    return pads, pads


@layer("pooling")
def pooling(p, w, xs, ctx):
    """MAX / AVERAGE / L2 pooling over H, W; ``globalPooling`` reduces them to 1 x 1."""
    x = xs[0]
    kind = p.type
    if p.globalPooling:
        if kind == 0:
            return jnp.max(x, axis=(-2, -1), keepdims=True)
        if kind == 1:
            return jnp.mean(x, axis=(-2, -1), keepdims=True)
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    k = [int(v) for v in (list(p.kernelSize) or [3, 3])]
    s = [int(v) for v in (list(p.stride) or [1, 1])]
    pads, counted = _pool_pads(p, x.shape[-2], x.shape[-1], k, s)
    xb, lead = flat_lead(x, 3)

    def window_reduce(v, init, op):   # the MIL pool ops' windowed reduction (strided slices when small)
        y = window_reduction(v, np.array(init, v.dtype), op, tuple(k), tuple(s), pads, [0, 0])
        return y.reshape(lead + tuple(y.shape[1:]))
    if kind == 0:
        return window_reduce(xb, -np.inf, lax.max)
    if kind == 2:
        return jnp.sqrt(window_reduce(jnp.square(xb), 0.0, lax.add))
    total = window_reduce(xb, 0.0, lax.add)
    ones = np.ones(x.shape[-2:], np.float32)
    if not p.avgPoolExcludePadding:
        ones = np.pad(ones, counted, constant_values=1.0)
        rest = [(a - c0, b - c1) for (a, b), (c0, c1) in zip(pads, counted)]
    else:
        rest = pads
    count = lax.reduce_window(ones, 0.0, lax.add, tuple(k), tuple(s), tuple(rest))
    return total / jnp.maximum(count, 1.0).astype(x.dtype)


# --- softmax, elementwise -------------------------------------------------------------------
@layer("softmax")
def softmax(p, w, xs, ctx):
    """Softmax over the channel axis (-3; the last axis for inputs of rank < 3)."""
    x = xs[0]
    return jax.nn.softmax(x, axis=-3 if x.ndim >= 3 else -1)


@layer("softmaxND")
def softmax_nd(p, w, xs, ctx):
    return jax.nn.softmax(xs[0], axis=int(p.axis))


def _fold(op, xs):
    out = xs[0]
    for x in xs[1:]:
        out = op(out, x)
    return out


@layer("add")
def add(p, w, xs, ctx):
    """Sum of the inputs (broadcast), or ``x + alpha`` with one input."""
    return xs[0] + p.alpha if len(xs) == 1 else _fold(lambda a, b: a + b, xs)


@layer("multiply")
def multiply(p, w, xs, ctx):
    """Product of the inputs (broadcast), or ``x * alpha`` with one input."""
    return xs[0] * p.alpha if len(xs) == 1 else _fold(lambda a, b: a * b, xs)


@layer("average")
def average(p, w, xs, ctx):
    return _fold(lambda a, b: a + b, xs) / len(xs)


@layer("max")
def maximum(p, w, xs, ctx):
    return _fold(jnp.maximum, xs)


@layer("min")
def minimum(p, w, xs, ctx):
    return _fold(jnp.minimum, xs)


_UNARY = {
    0: lambda x, p: jnp.sqrt(x),
    1: lambda x, p: 1 / jnp.sqrt(x + p.epsilon),
    2: lambda x, p: 1 / (x + p.epsilon),
    3: lambda x, p: jnp.power(x, p.alpha),
    4: lambda x, p: jnp.exp(x),
    5: lambda x, p: jnp.log(x + p.epsilon),
    6: lambda x, p: jnp.abs(x),
    7: lambda x, p: jnp.maximum(x, p.alpha),
}


@layer("unary")
def unary(p, w, xs, ctx):
    """``f(scale * x + shift)``; SQRT, RSQRT/INVERSE/LOG with epsilon, POWER/THRESHOLD with alpha.

    An unset (0) scale means 1, as coremltools always writes it.
    """
    scale = p.scale if p.scale != 0 else 1.0
    return _UNARY[p.type](xs[0] * scale + p.shift, p)


# --- concat, shapes -------------------------------------------------------------------------
@layer("concat")
def concat(p, w, xs, ctx):
    """Concatenate along C (-3), or along Seq (-5) with ``sequenceConcat``."""
    nd = xs[0].ndim
    axis = (-5 if nd >= 5 else 0) if p.sequenceConcat else (-3 if nd >= 3 else -1)
    return xp(*xs).concatenate(xs, axis=axis)


@layer("flatten")
def flatten(p, w, xs, ctx):
    """``[.., C, H, W] -> [.., C*H*W, 1, 1]`` in CHANNEL_FIRST (C, H, W) or CHANNEL_LAST (H, W, C) order."""
    x = xs[0]
    if x.ndim < 3:
        return x
    if p.mode == 1:
        x = jnp.moveaxis(x, -3, -1)
    return x.reshape(tuple(x.shape[:-3]) + (-1, 1, 1))


@layer("reshape")
def reshape(p, w, xs, ctx):
    """Reshape the ``[C, H, W]`` (3 targets) or ``[Seq, C, H, W]`` (4 targets) part; Batch is kept."""
    x = as_rank5(xs[0])
    target = [int(v) for v in p.targetShape]
    if len(target) not in (3, 4):
        fail(ctx, f"expected a targetShape of 3 or 4 values; found {target}")
    x = jnp.moveaxis(x, 1, 0)                                  # [B, S, C, H, W]
    if len(target) == 3:
        target = [x.shape[1]] + target
    if p.mode == 1:                                            # CHANNEL_LAST: reshape as [S, H, W, C]
        x = jnp.moveaxis(x, 2, 4).reshape((x.shape[0], target[0], target[2], target[3], target[1]))
        x = jnp.moveaxis(x, 4, 2)
    else:
        x = x.reshape([x.shape[0]] + target)
    return from_rank5(jnp.moveaxis(x, 0, 1), xs[0].ndim)


@layer("permute")
def permute(p, w, xs, ctx):
    """Permute the ``[Seq, C, H, W]`` axes by ``axis``; the Batch axis stays in place."""
    x = as_rank5(xs[0])
    axis = [int(a) for a in p.axis]
    if sorted(axis) != [0, 1, 2, 3]:
        fail(ctx, f"expected a permutation of [0, 1, 2, 3]; found {axis}")
    y = jnp.moveaxis(x, 1, 0).transpose([0] + [a + 1 for a in axis])
    return from_rank5(jnp.moveaxis(y, 0, 1), xs[0].ndim)


@layer("padding")
def padding(p, w, xs, ctx):
    """Pad H and W: constant value, reflection or replication."""
    x = xs[0]
    pads = [(0, 0)] * (x.ndim - 2) + _border(p.paddingAmounts)
    kind = p.WhichOneof("PaddingType")
    if kind == "reflection":
        return jnp.pad(x, pads, mode="reflect")
    if kind == "replication":
        return jnp.pad(x, pads, mode="edge")
    return jnp.pad(x, pads, constant_values=p.constant.value if kind == "constant" else 0.0)


def _linear_grid(n_in: int, n_out: int, mode: int) -> np.ndarray:
    """Input coordinates of output pixels for upsample's bilinear modes (DEFAULT, ALIGN_CORNERS_*)."""
    i = np.arange(n_out, dtype=np.float64)
    if mode == 2:
        spacing = n_in / n_out
        g = i * spacing + 0.5 * spacing - 0.5
    else:
        num = (n_in - 1) if mode == 1 else (n_in - n_in / n_out)
        g = i * (num / (n_out - 1) if n_out > 1 else 0.0)
    return np.clip(g, 0, n_in - 1)


def interp_axis(x, grid: np.ndarray, axis: int):
    """Linear interpolation of ``x`` along ``axis`` at fractional coordinates ``grid``."""
    n = x.shape[axis]
    lo = np.clip(np.floor(grid).astype(np.int32), 0, n - 1)
    hi = np.clip(lo + 1, 0, n - 1)
    frac = (grid - lo).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = len(grid)
    frac = jnp.asarray(frac.reshape(shape), x.dtype)
    return jnp.take(x, lo, axis=axis) * (1 - frac) + jnp.take(x, hi, axis=axis) * frac


@layer("upsample")
def upsample(p, w, xs, ctx):
    """Upsample H, W by integer (or, for bilinear, fractional) factors; NN or BILINEAR."""
    x = xs[0]
    frac = [float(v) for v in p.fractionalScalingFactor]
    scales = frac or [float(v) for v in (list(p.scalingFactor) or [1, 1])]
    for i, axis in enumerate((x.ndim - 2, x.ndim - 1)):
        n_in = x.shape[axis]
        n_out = int(np.floor(n_in * scales[i] + 1e-6))
        if p.mode == 0:
            src = np.minimum((np.arange(n_out) * n_in) // n_out, n_in - 1)
            x = jnp.take(x, src, axis=axis)
        else:
            x = interp_axis(x, _linear_grid(n_in, n_out, p.linearUpsampleMode), axis)
    return x


def _load_constant_weights(p, _):
    return {"data": decode_weights(p.data, tuple(p.shape), where="loadConstant data")}


@layer("loadConstant", weights=_load_constant_weights, static_weights=True)
def load_constant(p, w, xs, ctx):
    """A constant ``[C, H, W]`` (``[1, 1, C, H, W]`` in the rank-5 layout)."""
    data = w["data"]
    return data.reshape((1, 1) + tuple(data.shape)) if ctx.rank5 and data.ndim == 3 else data
