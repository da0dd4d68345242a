"""More legacy (``[.., C, H, W]``) layers: crop, LRN, MVN, L2 norm, scale/bias, reduce, split,
slice, reorganize, resize, 3-D convolution and pooling, copy.

The math is the ML-program op functions' (:mod:`mljax.ops`); the layers translate parameters.
"""
from __future__ import annotations

import jax.numpy as jnp

from mljax.neuralnetwork._base import fail, flat_lead, layer, xp
from mljax.neuralnetwork.layers_core import _border
from mljax.neuralnetwork.weights import decode_weights
from mljax.ops import conv as conv_ops
from mljax.ops import elementwise_binary as bin_ops
from mljax.ops import elementwise_unary as un_ops
from mljax.ops import image_resizing as resize_ops
from mljax.ops import normalization as norm_ops
from mljax.ops import pool as pool_ops
from mljax.ops import reduction as reduce_ops


@layer("copy")
def copy(p, w, xs, ctx):
    return xs[0]


@layer("crop")
def crop(p, w, xs, ctx):
    """One input: crop H, W by cropAmounts; two: crop to the second input's H, W at ``offset``."""
    x = xs[0]
    if len(xs) == 1:
        (t, b), (lft, r) = _border(p.cropAmounts)
        return x[..., t: x.shape[-2] - b, lft: x.shape[-1] - r]
    off = (list(p.offset) + [0, 0])[:2]
    h, wd = xs[1].shape[-2:]
    return x[..., off[0]: off[0] + h, off[1]: off[1] + wd]


@layer("lrn")
def lrn(p, w, xs, ctx):
    """``x / (k + alpha / n * sum_{n channels} x^2) ^ beta`` across channels."""
    x = xs[0]
    if x.ndim < 3:
        fail(ctx, f"expected an input of rank >= 3 ([.., C, H, W]); found shape {tuple(x.shape)}")
    return norm_ops.local_response_norm(x, size=int(p.localSize), alpha=p.alpha, beta=p.beta, k=p.k)


@layer("mvn")
def mvn(p, w, xs, ctx):
    """Subtract the mean (per channel or across C, H, W); optionally divide by ``sqrt(var) + eps``."""
    x = xs[0]
    axes = [-3, -2, -1] if p.acrossChannels else [-2, -1]
    y = bin_ops.sub(x, reduce_ops.reduce_mean(x, axes=axes, keep_dims=True))
    if p.normalizeVariance:
        std = un_ops.sqrt(reduce_ops.reduce_mean(un_ops.square(y), axes=axes, keep_dims=True))
        y = bin_ops.real_div(y, bin_ops.add(std, p.epsilon))
    return y


@layer("l2normalize")
def l2normalize(p, w, xs, ctx):
    """``x / sqrt(sum(x^2) + eps)`` over C, H, W (the last axis for rank < 3)."""
    x = xs[0]
    if x.ndim >= 3:
        return norm_ops.l2_norm(x, epsilon=p.epsilon)
    return norm_ops.l2_norm(x.reshape(x.shape + (1, 1)), epsilon=p.epsilon).reshape(x.shape)


def _chw(shape) -> tuple:
    """A scale/bias shape ``[1]``, ``[C]``, ``[1, H, W]`` or ``[C, H, W]`` as a broadcastable C, H, W shape."""
    shape = tuple(int(s) for s in shape) or (1,)
    return (shape[0], 1, 1) if len(shape) == 1 else shape


def _scale_weights(p, _):
    return {"scale": decode_weights(p.scale, _chw(p.shapeScale), where="scale"),
            "bias": decode_weights(p.bias, _chw(p.shapeBias), where="scale bias") if p.hasBias else None}


@layer("scale", weights=_scale_weights)
def scale(p, w, xs, ctx):
    y = bin_ops.mul(xs[0], w["scale"])
    return bin_ops.add(y, w["bias"]) if "bias" in w else y


@layer("bias", weights=lambda p, _: {"bias": decode_weights(p.bias, _chw(p.shape), where="bias")})
def bias(p, w, xs, ctx):
    return bin_ops.add(xs[0], w["bias"])


@layer("dot")
def dot(p, w, xs, ctx):
    """Dot product (or cosine similarity) of two ``[.., C, 1, 1]`` vectors -> ``[.., 1, 1, 1]``."""
    a, b = xs[0], xs[1]
    axes = [-3 if a.ndim >= 3 else -1]
    d = reduce_ops.reduce_sum(bin_ops.mul(a, b), axes=axes, keep_dims=True)
    if p.cosineSimilarity:
        norms = [reduce_ops.reduce_l2_norm(v, axes=axes, keep_dims=True) for v in (a, b)]
        d = bin_ops.real_div(d, bin_ops.mul(*norms))
    return d


_REDUCE_AXES = {0: (-3, -2, -1), 1: (-2, -1), 2: (-3,), 3: (-2,), 4: (-1,)}
_REDUCE_MODES = {0: reduce_ops.reduce_sum, 1: reduce_ops.reduce_mean, 2: reduce_ops.reduce_prod, 3: None,
                 4: reduce_ops.reduce_sum_square, 5: reduce_ops.reduce_l1_norm, 6: reduce_ops.reduce_l2_norm,
                 7: reduce_ops.reduce_max, 8: reduce_ops.reduce_min, 9: None}


@layer("reduce")
def reduce(p, w, xs, ctx):
    """Reduce over CHW / HW / C / H / W keeping size-1 axes; ARGMAX gives the index (one axis)."""
    x = xs[0]
    if p.axis not in _REDUCE_AXES or p.mode not in _REDUCE_MODES:
        fail(ctx, f"expected axis 0-4 and mode 0-9; found axis {p.axis}, mode {p.mode}")
    axes = list(_REDUCE_AXES[p.axis])
    if p.mode == 9:
        if len(axes) != 1:
            fail(ctx, "ARGMAX reduces one axis (C, H or W)")
        return reduce_ops.reduce_argmax(x, axis=axes[0], keep_dims=True).astype(x.dtype)
    if p.mode == 3:   # LOGSUM: log(sum + epsilon)
        return un_ops.log(reduce_ops.reduce_sum(x, axes=axes, keep_dims=True), epsilon=p.epsilon)
    return _REDUCE_MODES[p.mode](x, axes=axes, keep_dims=True)


@layer("split")
def split(p, w, xs, ctx):
    """Split along C into ``nOutputs`` equal parts."""
    x = xs[0]
    n = int(p.nOutputs) or len(ctx.layer.output)
    return tuple(xp(x).split(x, n, axis=-3 if x.ndim >= 3 else -1))


@layer("slice")
def slice_(p, w, xs, ctx):
    """``x[start:end:stride]`` along C, H or W; negative indices count from the end (-1 is N-1)."""
    x = xs[0]
    axis = x.ndim - 3 + int(p.axis)
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(int(p.startIndex), int(p.endIndex), int(p.stride) or 1)
    return x[tuple(idx)]


@layer("sequenceRepeat")
def sequence_repeat(p, w, xs, ctx):
    x = xs[0]
    reps = [1] * x.ndim
    reps[0] = int(p.nRepetitions) or 1
    return jnp.tile(x, reps)


@layer("reorganizeData")
def reorganize_data(p, w, xs, ctx):
    """SPACE_TO_DEPTH / DEPTH_TO_SPACE (TensorFlow's channel order) / PIXEL_SHUFFLE (PyTorch's)."""
    x, lead = flat_lead(xs[0], 3)
    bs = int(p.blockSize)
    n, c, h, wd = x.shape
    if p.mode == 0:
        y = x.reshape(n, c, h // bs, bs, wd // bs, bs).transpose(0, 3, 5, 1, 2, 4)
        y = y.reshape(n, c * bs * bs, h // bs, wd // bs)
    elif p.mode == 1:
        y = x.reshape(n, bs, bs, c // (bs * bs), h, wd).transpose(0, 3, 4, 1, 5, 2)
        y = y.reshape(n, c // (bs * bs), h * bs, wd * bs)
    else:
        y = x.reshape(n, c // (bs * bs), bs, bs, h, wd).transpose(0, 1, 4, 2, 5, 3)
        y = y.reshape(n, c // (bs * bs), h * bs, wd * bs)
    return y.reshape(lead + tuple(y.shape[1:]))


#: SamplingMode.Method -> MIL's sampling_mode (as coremltools' NeuralNetwork backend maps them).
SAMPLING_MODES = {0: "STRICT_ALIGN_CORNERS", 1: "ALIGN_CORNERS", 2: "DEFAULT", 3: "OFFSET_CORNERS"}
_BOX_MODES = {0: "CORNERS_HEIGHT_FIRST", 1: "CORNERS_WIDTH_FIRST", 2: "CENTER_SIZE_HEIGHT_FIRST",
              3: "CENTER_SIZE_WIDTH_FIRST"}


def _sampling_mode(p, ctx) -> str:
    method = int(p.mode.samplingMethod)
    if method not in SAMPLING_MODES:
        fail(ctx, f"expected samplingMethod 0-3; found {method}")
    return SAMPLING_MODES[method]


@layer("resizeBilinear")
def resize_bilinear(p, w, xs, ctx):
    """Bilinear resize of H, W to ``targetSize``: MIL ``resize_bilinear`` with the layer's sampling mode."""
    x = xs[0]
    th, tw = [int(v) for v in (list(p.targetSize) or [1, 1])]
    return resize_ops.resize_bilinear(x, target_size_height=th, target_size_width=tw,
                                      sampling_mode=_sampling_mode(p, ctx))


@layer("cropResize")
def crop_resize(p, w, xs, ctx):
    """Crop boxes ``[N, 1, 4|5, 1, 1]`` out of ``x [.., C, H, W]`` and resize them bilinearly to
    ``targetSize``: MIL ``crop_resize`` (boxes may be computed)."""
    x, boxes = xs[0], jnp.asarray(xs[1])
    th, tw = [int(v) for v in (list(p.targetSize) or [1, 1])]
    if x.ndim < 3:
        fail(ctx, f"expected an input of rank >= 3 ([.., C, H, W]); found shape {tuple(x.shape)}")
    n_coords = boxes.shape[-3] if boxes.ndim >= 3 else boxes.shape[-1]
    roi = boxes.reshape((-1, 1, n_coords, 1, 1))
    img = x.reshape((-1,) + tuple(x.shape[-3:]))
    return resize_ops.crop_resize(img, roi, target_height=th, target_width=tw,
                                  normalized_coordinates=bool(p.normalizedCoordinates),
                                  spatial_scale=p.spatialScale or 1.0,
                                  box_coordinate_mode=_BOX_MODES[int(p.boxIndicesMode.boxMode)],
                                  sampling_mode=_sampling_mode(p, ctx))


# --- 3-D convolution and pooling (inputs [.., C, D, H, W]) ----------------------------------------
def _pad3(p):
    """MIL (pad_type, pad) of a 3-D layer's paddingType CUSTOM (0), VALID (1) or SAME (2)."""
    if p.paddingType == 1:
        return "valid", None
    if p.paddingType == 2:
        return "same", None
    return "custom", [p.customPaddingFront, p.customPaddingBack, p.customPaddingTop,
                      p.customPaddingBottom, p.customPaddingLeft, p.customPaddingRight]


def _conv3d_weights(p, lyr):
    if len(lyr.input) > 1:
        return {}
    g = p.nGroups or 1
    k = (p.kernelDepth, p.kernelHeight, p.kernelWidth)
    shape = (p.inputChannels, p.outputChannels // g) + k if p.isDeconvolution else \
        (p.outputChannels, p.inputChannels // g) + k
    return {"weight": decode_weights(p.weights, shape, axis=1 if p.isDeconvolution else 0, where="conv3d weights"),
            "bias": decode_weights(p.bias, (p.outputChannels,), where="conv3d bias") if p.hasBias else None}


def _ints3(*values):
    return [int(v) or 1 for v in values]


@layer("convolution3d", weights=_conv3d_weights)
def convolution3d(p, w, xs, ctx):
    """3-D convolution / transposed convolution over ``[.., C, D, H, W]``: MIL ``conv`` /
    ``conv_transpose``."""
    x, lead = flat_lead(xs[0], 4)
    wt = jnp.asarray(w["weight"] if "weight" in w else xs[1]).astype(x.dtype)
    s = _ints3(p.strideDepth, p.strideHeight, p.strideWidth)
    d = _ints3(p.dilationDepth, p.dilationHeight, p.dilationWidth)
    g = int(p.nGroups or 1)
    pad_type, pad = _pad3(p)
    if p.isDeconvolution:
        out_shape = [int(v) for v in p.outputShape][-3:] or None
        y = conv_ops.conv_transpose(x, wt, w.get("bias"), pad=pad, output_shape=out_shape,
                                    pad_type=pad_type, strides=s, dilations=d, groups=g)
    else:
        y = conv_ops.conv(x, wt, w.get("bias"), strides=s, pad_type=pad_type, pad=pad, dilations=d,
                          groups=g)
    return y.reshape(lead + tuple(y.shape[1:]))


@layer("pooling3d")
def pooling3d(p, w, xs, ctx):
    """MAX / AVERAGE pooling over D, H, W: MIL ``max_pool`` / ``avg_pool``."""
    x, lead = flat_lead(xs[0], 4)
    pad_type, pad = _pad3(p)
    kw = dict(kernel_sizes=_ints3(p.kernelDepth, p.kernelHeight, p.kernelWidth),
              strides=_ints3(p.strideDepth, p.strideHeight, p.strideWidth), pad_type=pad_type, pad=pad)
    if p.type == 0:
        y = pool_ops.max_pool(x, **kw)
    else:
        y = pool_ops.avg_pool(x, exclude_padding_from_average=bool(p.countExcludePadding), **kw)
    return y.reshape(lead + tuple(y.shape[1:]))


@layer("globalPooling3d")
def global_pooling3d(p, w, xs, ctx):
    op = reduce_ops.reduce_max if p.type == 0 else reduce_ops.reduce_mean
    return op(xs[0], axes=[-3, -2, -1], keep_dims=True)
