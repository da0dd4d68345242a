"""The classic NeuralNetwork layers: dense, convolution, normalization, activations, pooling, shapes.

Each layer translates its parameters into calls of the ML-program op functions
(:mod:`mljax.ops`), so both model types share one implementation of the math.  Legacy
layers see the last three axes as ``[C, H, W]``; leading axes (``[Seq, Batch]`` in the rank-5
layout, anything in rank-N networks) are batch-like and are folded into the op's batch axis.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mljax.neuralnetwork._base import as_rank5, fail, flat_lead, from_rank5, layer, xp
from mljax.neuralnetwork.weights import decode_weights
from mljax.ops import activation as act_ops
from mljax.ops import conv as conv_ops
from mljax.ops import elementwise_binary as bin_ops
from mljax.ops import elementwise_unary as un_ops
from mljax.ops import image_resizing as resize_ops
from mljax.ops import linear as linear_ops
from mljax.ops import normalization as norm_ops
from mljax.ops import pool as pool_ops
from mljax.ops import reduction as reduce_ops


def channels_first(x):
    """``[.., C, H, W]`` (or ``[C]`` / ``[B, C]``) as ``[N, C, *]`` for the MIL ops' channel axis 1,
    and the function that restores the leading axes of a result."""
    if x.ndim >= 3:
        xb, lead = flat_lead(x, 3)
        return xb, lambda y: y.reshape(lead + tuple(y.shape[1:]))
    if x.ndim == 1:
        return x[None], lambda y: y[0]
    return x, lambda y: y


# --- activations ----------------------------------------------------------------------------
def activation_weights(p) -> dict:
    kind = p.WhichOneof("NonlinearityType")
    if kind == "PReLU":
        return {"alpha": decode_weights(p.PReLU.alpha, where="PReLU alpha")}
    if kind == "parametricSoftplus":
        return {"alpha": decode_weights(p.parametricSoftplus.alpha, where="softplus alpha"),
                "beta": decode_weights(p.parametricSoftplus.beta, where="softplus beta")}
    return {}


def _per_channel(op, x, *params):
    xb, back = channels_first(x)
    return back(op(xb, *params))


#: ``ActivationParams`` nonlinearity -> ``f(x, params message, weights)`` over the MIL activation
#: ops: the one activation table of NeuralNetwork layers (activation, recurrent layers).
ACTIVATIONS = {
    "linear": lambda x, a, w: act_ops.linear_activation(x, alpha=a.alpha, beta=a.beta),
    "ReLU": lambda x, a, w: act_ops.relu(x),
    "leakyReLU": lambda x, a, w: act_ops.leaky_relu(x, alpha=a.alpha),
    "thresholdedReLU": lambda x, a, w: act_ops.thresholded_relu(x, alpha=a.alpha),
    "PReLU": lambda x, a, w: _per_channel(act_ops.prelu, x, w["alpha"]),
    "tanh": lambda x, a, w: un_ops.tanh(x),
    "scaledTanh": lambda x, a, w: act_ops.scaled_tanh(x, alpha=a.alpha, beta=a.beta),
    "sigmoid": lambda x, a, w: act_ops.sigmoid(x),
    "sigmoidHard": lambda x, a, w: act_ops.sigmoid_hard(x, alpha=a.alpha, beta=a.beta),
    "ELU": lambda x, a, w: act_ops.elu(x, alpha=a.alpha),
    "softsign": lambda x, a, w: act_ops.softsign(x),
    "softplus": lambda x, a, w: act_ops.softplus(x),
    "parametricSoftplus": lambda x, a, w: _per_channel(act_ops.softplus_parametric, x, w["alpha"],
                                                       w["beta"]),
}


def apply_activation(p, x, w=None):
    """One ``ActivationParams`` nonlinearity applied to ``x`` (none set: identity)."""
    kind = p.WhichOneof("NonlinearityType")
    if kind is None:
        return x
    return ACTIVATIONS[kind](x, getattr(p, kind), w or {})


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
    """Rank 1-3: MIL ``linear`` over the last axis; rank 4/5: ``[x1(,x2), C*H*W] -> [.., C_out, 1, 1]``."""
    x, wt = xs[0], w["weight"]
    r = x.ndim
    lead = x.shape[:-1] if r <= 3 else x.shape[: r - 3]
    flat = x if r <= 3 else x.reshape(lead + (-1,))
    if flat.shape[-1] != wt.shape[1]:
        fail(ctx, f"expected {wt.shape[1]} input channels; found input shape {tuple(x.shape)}")
    y = linear_ops.linear(flat, wt, w.get("bias"))
    return y if r <= 3 else y.reshape(lead + (wt.shape[0], 1, 1))


def _embedding_weights(p, _):
    return {"weight": decode_weights(p.weights, (p.outputChannels, p.inputDim), where="embedding weights"),
            "bias": decode_weights(p.bias, (p.outputChannels,), where="embedding bias") if p.hasBias else None}


def embed(idx, weight, bias, vocab: int):
    """Rows of ``weight.T`` (``weight`` stored ``[D, vocab]``) at indices clipped into the vocabulary:
    MIL ``gather`` of the table, plus ``bias``."""
    from mljax.ops.scatter_gather import gather
    idx = jnp.clip(jnp.asarray(idx).astype(jnp.int32), 0, vocab - 1)
    y = gather(jnp.transpose(weight), idx, axis=0)
    return y if bias is None else bin_ops.add(y, bias)


@layer("embedding", weights=_embedding_weights)
def embedding(p, w, xs, ctx):
    """Indices ``[.., 1, 1, 1]`` -> vectors ``[.., C_out, 1, 1]`` (weights are ``[C_out, vocab]``)."""
    x = xs[0]
    idx = x.reshape(x.shape[:-3]) if x.ndim >= 4 else x.reshape(x.shape[:-1]) if x.ndim > 1 else x
    y = embed(idx, w["weight"], w.get("bias"), p.inputDim)
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


def _border(amounts) -> list[tuple[int, int]]:
    edges = [(int(e.startEdgeSize), int(e.endEdgeSize)) for e in amounts.borderAmounts]
    return (edges + [(0, 0), (0, 0)])[:2]


def _mil_pad(p, oneof: str):
    """(pad_type, pad) of MIL for a layer's padding oneof ``same`` (asymmetryMode) or ``valid``."""
    if p.WhichOneof(oneof) == "same":
        return ("same_lower" if p.same.asymmetryMode == 1 else "same"), None
    return "custom", [v for pair in _border(p.valid.paddingAmounts) for v in pair]


def conv_padding(p) -> tuple:
    """``(pad_type, pad)`` of MIL for a convolution layer's padding."""
    return _mil_pad(p, "ConvolutionPaddingType")


@layer("convolution", weights=_conv_weights)
def convolution(p, w, xs, ctx):
    """2-D convolution / transposed convolution over ``[.., C, H, W]``: MIL ``conv`` /
    ``conv_transpose`` (grouped, dilated)."""
    xb, back = channels_first(xs[0])
    wt = w["weight"] if "weight" in w else xs[1]
    k = [int(v) for v in (list(p.kernelSize) or [3, 3])]
    if tuple(wt.shape[:2] if ctx.weight_hwio else wt.shape[2:]) != tuple(k):
        fail(ctx, f"expected a {k[0]}x{k[1]} kernel; found weight shape {tuple(wt.shape)}")
    strides = [int(v) for v in (list(p.stride) or [1, 1])]
    dilations = [int(v) for v in (list(p.dilationFactor) or [1, 1])]
    pad_type, pad = conv_padding(p)
    groups = int(p.nGroups or 1)
    wt = jnp.asarray(wt).astype(xb.dtype)
    if p.isDeconvolution:
        out_shape = [int(v) for v in p.outputShape] or None
        y = conv_ops.conv_transpose(xb, wt, w.get("bias"), pad=pad, output_shape=out_shape,
                                    pad_type=pad_type, strides=strides, dilations=dilations,
                                    groups=groups)
    elif len(xs) == 3 and xs[0].dtype == jnp.float32 and (gated := _gate(xs[1:])) is not None:
        # a region's 1x1 convolution of x * gate (LayerContext.scaled_by): per-image weights
        y = conv_ops.scaled_pointwise_last(*gated, wt.reshape(wt.shape[2:]), w.get("bias"))
    else:
        # a channel-last region's layer ([N, H, W, C]; see mljax.neuralnetwork.network)
        y = conv_ops.convolution(xb, wt, w.get("bias"), strides=strides, pad_type=pad_type, pad=pad,
                                 dilations=dilations, groups=groups, after_costly_op=ctx.after_costly_op,
                                 channels_last=ctx.channels_last, weight_hwio=ctx.weight_hwio,
                                 first_in=ctx.first_in, winograd_u=ctx.winograd_u)
    return back(y)


def _gate(pair):
    """``(x, gate)`` of a multiply's two channel-last operands when one is a per-image channel
    gate that :func:`mljax.ops.conv.folds_channel_scale` folds; else None."""
    for x, gate in (pair, pair[::-1]):
        if conv_ops.folds_channel_scale(tuple(x.shape), tuple(gate.shape)):
            return x, gate
    return None


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
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` over channel axis -3: MIL ``batch_norm``.

    With ``computeMeanVar`` the statistics come from the input: per instance over H, W
    (MIL ``instance_norm``), else over every axis but C.
    """
    xb, back = channels_first(xs[0])
    if p.computeMeanVar and p.instanceNormalization and xb.ndim >= 3:
        return back(norm_ops.instance_norm(xb, w["gamma"], w["beta"], epsilon=p.epsilon))
    if p.computeMeanVar:
        axes = [a for a in range(xb.ndim) if a != 1]
        mean = reduce_ops.reduce_mean(xb, axes=axes)
        centered = bin_ops.sub(xb, mean.reshape((1, -1) + (1,) * (xb.ndim - 2)))
        var = reduce_ops.reduce_mean(un_ops.square(centered), axes=axes)
    else:
        mean, var = w["mean"], w["variance"]
    return back(norm_ops.batch_norm(xb, mean, var, w["gamma"], w["beta"], epsilon=p.epsilon))


# --- pooling ------------------------------------------------------------------------------
_POOL_OPS = {0: pool_ops.max_pool, 1: pool_ops.avg_pool, 2: pool_ops.l2_pool}
_GLOBAL_POOL_OPS = {0: reduce_ops.reduce_max, 1: reduce_ops.reduce_mean, 2: reduce_ops.reduce_l2_norm}


@layer("pooling")
def pooling(p, w, xs, ctx):
    """MAX / AVERAGE / L2 pooling over H, W (MIL ``max_pool`` / ``avg_pool`` / ``l2_pool``);
    ``globalPooling`` reduces them to 1 x 1; ``includeLastPixel`` is MIL's ``ceil_mode``."""
    x = xs[0]
    if p.type not in _POOL_OPS:
        fail(ctx, f"expected pooling type MAX, AVERAGE or L2; found {p.type}")
    if p.globalPooling and ctx.channels_last:    # [N, H, W, C]
        if ctx.pool_by_product:
            return reduce_ops.spatial_pool_by_product(x, mean=True)
        return _GLOBAL_POOL_OPS[p.type](x, axes=[1, 2], keep_dims=True)
    if p.globalPooling:
        return _GLOBAL_POOL_OPS[p.type](x, axes=[-2, -1], keep_dims=True)
    xb, back = (x, lambda y: y) if ctx.channels_last else channels_first(x)
    kw = dict(kernel_sizes=[int(v) for v in (list(p.kernelSize) or [3, 3])],
              strides=[int(v) for v in (list(p.stride) or [1, 1])])
    mode = p.WhichOneof("PoolingPaddingType")
    if mode == "includeLastPixel":
        amounts = [int(v) for v in (list(p.includeLastPixel.paddingAmounts) + [0, 0])[:2]]
        kw.update(pad_type="custom", pad=[amounts[0], amounts[0], amounts[1], amounts[1]], ceil_mode=True)
    else:
        kw["pad_type"], kw["pad"] = _mil_pad(p, "PoolingPaddingType")
    if p.type == 1:
        kw["exclude_padding_from_average"] = bool(p.avgPoolExcludePadding)
    if ctx.channels_last:      # [N, H, W, C] (a channel-last region's max or average pool)
        return (pool_ops.maximum_pool if p.type == 0 else pool_ops.average_pool)(xb, channels_last=True, **kw)
    return back(_POOL_OPS[p.type](xb, **kw))


# --- softmax, elementwise -------------------------------------------------------------------
@layer("softmax")
def softmax(p, w, xs, ctx):
    """Softmax over the channel axis (-3; the last axis for inputs of rank < 3)."""
    x = xs[0]
    return act_ops.softmax(x, axis=-3 if x.ndim >= 3 else -1)


@layer("softmaxND")
def softmax_nd(p, w, xs, ctx):
    return act_ops.softmax(xs[0], axis=int(p.axis))


def fold(op, xs):
    """``op(op(xs[0], xs[1]), xs[2]) ...`` (a variadic layer as binary MIL ops)."""
    out = xs[0]
    for x in xs[1:]:
        out = op(out, x)
    return out


def static_or(np_fn, op, *xs):
    """``np_fn`` when every input is a NumPy constant (shapes computed inside a network stay
    static), else the MIL op ``op``."""
    return np_fn if xp(*xs) is np else op


@layer("add")
def add(p, w, xs, ctx):
    """Sum of the inputs (broadcast), or ``x + alpha`` with one input."""
    op = static_or(np.add, bin_ops.add, *xs)
    return op(xs[0], p.alpha) if len(xs) == 1 else fold(op, xs)


@layer("multiply")
def multiply(p, w, xs, ctx):
    """Product of the inputs (broadcast), or ``x * alpha`` with one input."""
    op = static_or(np.multiply, bin_ops.mul, *xs)
    return op(xs[0], p.alpha) if len(xs) == 1 else fold(op, xs)


@layer("average")
def average(p, w, xs, ctx):
    return static_or(np.divide, bin_ops.real_div, *xs)(fold(static_or(np.add, bin_ops.add, *xs), xs),
                                                       float(len(xs)))


@layer("max")
def maximum(p, w, xs, ctx):
    return fold(static_or(np.maximum, bin_ops.maximum, *xs), xs)


@layer("min")
def minimum(p, w, xs, ctx):
    return fold(static_or(np.minimum, bin_ops.minimum, *xs), xs)


_UNARY = {
    0: lambda x, p: un_ops.sqrt(x),
    1: lambda x, p: un_ops.rsqrt(x, epsilon=p.epsilon),
    2: lambda x, p: un_ops.inverse(x, epsilon=p.epsilon),
    3: lambda x, p: bin_ops.pow(x, p.alpha),
    4: lambda x, p: un_ops.exp(x),
    5: lambda x, p: un_ops.log(x, epsilon=p.epsilon),
    6: lambda x, p: un_ops.abs(x),
    7: lambda x, p: un_ops.threshold(x, alpha=p.alpha),
}


@layer("unary")
def unary(p, w, xs, ctx):
    """``f(scale * x + shift)``; SQRT, RSQRT/INVERSE/LOG with epsilon, POWER/THRESHOLD with alpha.

    An unset (0) scale means 1, as coremltools always writes it.
    """
    if p.type not in _UNARY:
        fail(ctx, f"expected a unary function type 0-7; found {p.type}")
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


@layer("upsample")
def upsample(p, w, xs, ctx):
    """Upsample H, W by integer (or, for bilinear, fractional) factors: MIL
    ``upsample_nearest_neighbor`` / ``upsample_bilinear`` (linearUpsampleMode DEFAULT,
    ALIGN_CORNERS_TRUE or ALIGN_CORNERS_FALSE is its align_corners / half_pixel_centers pair)."""
    x = xs[0]
    frac = [float(v) for v in p.fractionalScalingFactor]
    sh, sw = frac or [float(v) for v in (list(p.scalingFactor) or [1, 1])]
    if x.ndim < 3:
        fail(ctx, f"expected an input of rank >= 3 ([.., C, H, W]); found shape {tuple(x.shape)}")
    if p.mode == 0:
        return resize_ops.upsample_nearest_neighbor(x, scale_factor_height=sh, scale_factor_width=sw)
    align, half = {0: (False, False), 1: (True, False), 2: (False, True)}[int(p.linearUpsampleMode)]
    return resize_ops.upsample_bilinear_ios16(x, scale_factor_height=sh, scale_factor_width=sw,
                                              align_corners=align, half_pixel_centers=half)


def _load_constant_weights(p, _):
    return {"data": decode_weights(p.data, tuple(p.shape), where="loadConstant data")}


@layer("loadConstant", weights=_load_constant_weights, static_weights=True)
def load_constant(p, w, xs, ctx):
    """A constant ``[C, H, W]`` (``[1, 1, C, H, W]`` in the rank-5 layout)."""
    data = w["data"]
    return data.reshape((1, 1) + tuple(data.shape)) if ctx.rank5 and data.ndim == 3 else data
