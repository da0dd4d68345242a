"""More legacy (``[.., C, H, W]``) layers: crop, LRN, MVN, L2 norm, scale/bias, reduce, split,
slice, reorganize, resize, 3-D convolution and pooling, copy."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.neuralnetwork._base import fail, flat_lead, layer, xp
from mljax.neuralnetwork.layers_core import _border, _crop_or_pad, interp_axis, same_pads
from mljax.neuralnetwork.weights import decode_weights

_HIGHEST = lax.Precision.HIGHEST


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
    n = int(p.localSize)
    sq = jnp.square(x)
    pads = [(0, 0)] * x.ndim
    pads[x.ndim - 3] = ((n - 1) // 2, n - 1 - (n - 1) // 2)
    window = [1] * x.ndim
    window[x.ndim - 3] = n
    total = lax.reduce_window(sq, 0.0, lax.add, tuple(window), (1,) * x.ndim, pads)
    return x / jnp.power(p.k + p.alpha / n * total, p.beta)


@layer("mvn")
def mvn(p, w, xs, ctx):
    """Subtract the mean (per channel or across C, H, W); optionally divide by ``sqrt(var) + eps``."""
    x = xs[0]
    axes = (-3, -2, -1) if p.acrossChannels else (-2, -1)
    y = x - jnp.mean(x, axis=axes, keepdims=True)
    if p.normalizeVariance:
        y = y / (jnp.sqrt(jnp.mean(jnp.square(y), axis=axes, keepdims=True)) + p.epsilon)
    return y


@layer("l2normalize")
def l2normalize(p, w, xs, ctx):
    """``x / sqrt(sum(x^2) + eps)`` over C, H, W (the last axis for rank < 3)."""
    x = xs[0]
    axes = (-3, -2, -1) if x.ndim >= 3 else (-1,)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True) + p.epsilon)


def _chw(shape) -> tuple:
    """A scale/bias shape ``[1]``, ``[C]``, ``[1, H, W]`` or ``[C, H, W]`` as a broadcastable C, H, W shape."""
    shape = tuple(int(s) for s in shape) or (1,)
    return (shape[0], 1, 1) if len(shape) == 1 else shape


def _scale_weights(p, _):
    return {"scale": decode_weights(p.scale, _chw(p.shapeScale), where="scale"),
            "bias": decode_weights(p.bias, _chw(p.shapeBias), where="scale bias") if p.hasBias else None}


@layer("scale", weights=_scale_weights)
def scale(p, w, xs, ctx):
    y = xs[0] * w["scale"]
    return y + w["bias"] if "bias" in w else y


@layer("bias", weights=lambda p, _: {"bias": decode_weights(p.bias, _chw(p.shape), where="bias")})
def bias(p, w, xs, ctx):
    return xs[0] + w["bias"]


@layer("dot")
def dot(p, w, xs, ctx):
    """Dot product (or cosine similarity) of two ``[.., C, 1, 1]`` vectors -> ``[.., 1, 1, 1]``."""
    a, b = xs[0], xs[1]
    axis = -3 if a.ndim >= 3 else -1
    d = jnp.sum(a * b, axis=axis, keepdims=True)
    if p.cosineSimilarity:
        d = d / (jnp.linalg.norm(a, axis=axis, keepdims=True) * jnp.linalg.norm(b, axis=axis, keepdims=True))
    return d


_REDUCE_AXES = {0: (-3, -2, -1), 1: (-2, -1), 2: (-3,), 3: (-2,), 4: (-1,)}


@layer("reduce")
def reduce(p, w, xs, ctx):
    """Reduce over CHW / HW / C / H / W keeping size-1 axes; ARGMAX gives the index (one axis)."""
    x = xs[0]
    axes = _REDUCE_AXES[p.axis]
    m = p.mode
    if m == 9:
        if len(axes) != 1:
            fail(ctx, "ARGMAX reduces one axis (C, H or W)")
        return jnp.argmax(x, axis=axes[0], keepdims=True).astype(x.dtype)
    ops = {0: lambda v: jnp.sum(v, axes, keepdims=True),
           1: lambda v: jnp.mean(v, axes, keepdims=True),
           2: lambda v: jnp.prod(v, axes, keepdims=True),
           3: lambda v: jnp.log(jnp.sum(v, axes, keepdims=True) + p.epsilon),
           4: lambda v: jnp.sum(jnp.square(v), axes, keepdims=True),
           5: lambda v: jnp.sum(jnp.abs(v), axes, keepdims=True),
           6: lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axes, keepdims=True)),
           7: lambda v: jnp.max(v, axes, keepdims=True),
           8: lambda v: jnp.min(v, axes, keepdims=True)}
    return ops[m](x)


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


def sampling_grid(n_in: int, n_out: int, method: int, start: float = 0.0, end: float | None = None):
    """Input coordinates for SamplingMode methods (STRICT_ALIGN_ENDPOINTS, ALIGN_ENDPOINTS,
    UPSAMPLE, ROI_ALIGN) over the interval [start, end] of the input axis."""
    end = n_in - 1 if end is None else end
    i = np.arange(n_out, dtype=np.float64)
    if method in (0, 1):
        if n_out == 1:
            return np.full(1, (start + end) / 2 if method == 0 else start)
        return start + i * (end - start) / (n_out - 1)
    if method == 2:
        return np.clip(start + i * (end - start + 1) / n_out, 0, n_in - 1)
    step = (end - start) / n_out
    return start + (i + 0.5) * step - 0.5


@layer("resizeBilinear")
def resize_bilinear(p, w, xs, ctx):
    """Bilinear resize of H, W to ``targetSize`` with the layer's sampling mode."""
    x = xs[0]
    target = [int(v) for v in (list(p.targetSize) or [1, 1])]
    for i, axis in enumerate((x.ndim - 2, x.ndim - 1)):
        grid = np.clip(sampling_grid(x.shape[axis], target[i], p.mode.samplingMethod), 0, x.shape[axis] - 1)
        x = interp_axis(x, grid, axis)
    return x


@layer("cropResize")
def crop_resize(p, w, xs, ctx):
    """Crop boxes ``[N, 1, 4|5, 1, 1]`` out of ``x`` and resize them bilinearly to ``targetSize``.

    Box coordinates are static-shaped but may be dynamic; sampling is done with gathers.
    """
    x, boxes = xs[0], xs[1]
    th, tw = [int(v) for v in (list(p.targetSize) or [1, 1])]
    b = boxes.reshape(-1, boxes.shape[-3] if boxes.ndim >= 3 else boxes.shape[-1])
    idx = b[:, 0].astype(jnp.int32) if b.shape[1] == 5 else jnp.zeros(b.shape[0], jnp.int32)
    c = b[:, -4:]
    mode = p.boxIndicesMode.boxMode
    if mode == 1:
        c = c[:, [1, 0, 3, 2]]
    elif mode in (2, 3):
        c = c[:, [1, 0, 3, 2]] if mode == 3 else c
        c = jnp.stack([c[:, 0] - c[:, 2] / 2, c[:, 1] - c[:, 3] / 2,
                       c[:, 0] + c[:, 2] / 2, c[:, 1] + c[:, 3] / 2], axis=1)
    img = x.reshape((-1,) + x.shape[-3:])
    h, wd = img.shape[-2:]
    if p.normalizedCoordinates:
        c = c * jnp.array([h - 1, wd - 1, h - 1, wd - 1], c.dtype)
    if p.spatialScale:
        c = c * p.spatialScale
    ys = _box_grid(c[:, 0], c[:, 2], th, p.mode.samplingMethod, h)
    xs_ = _box_grid(c[:, 1], c[:, 3], tw, p.mode.samplingMethod, wd)
    crops = jnp.stack([_bilinear(img[idx[k]], ys[k], xs_[k]) for k in range(b.shape[0])])
    return crops.reshape((crops.shape[0], 1) + crops.shape[1:])


def _box_grid(lo, hi, n: int, method: int, size: int):
    i = jnp.arange(n, dtype=jnp.float32)
    if method == 3:
        g = lo[:, None] + (i + 0.5) * ((hi - lo) / n)[:, None] - 0.5
    elif n == 1:
        g = ((lo + hi) / 2)[:, None] + 0 * i
    else:
        g = lo[:, None] + i * ((hi - lo) / (n - 1))[:, None]
    return jnp.clip(g, 0, size - 1)


def _bilinear(img, ys, xs):
    """Sample ``img [C, H, W]`` at the grid ``ys x xs``."""
    h, wd = img.shape[-2:]
    y0 = jnp.clip(jnp.floor(ys).astype(jnp.int32), 0, h - 1)
    x0 = jnp.clip(jnp.floor(xs).astype(jnp.int32), 0, wd - 1)
    y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, wd - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g = lambda yy, xx: img[:, yy][:, :, xx]  # noqa: E731
    top = g(y0, x0) * (1 - fx) + g(y0, x1) * fx
    bot = g(y1, x0) * (1 - fx) + g(y1, x1) * fx
    return top * (1 - fy) + bot * fy


# --- 3-D convolution and pooling (inputs [.., C, D, H, W]) ----------------------------------------
def _pads3(p, sizes, k, s, d, kind: str):
    pt = p.paddingType
    if pt == 1:
        return [(0, 0)] * 3
    if pt == 2:
        return [same_pads(sizes[i], k[i], s[i], d[i], False) for i in range(3)]
    return [(p.customPaddingFront, p.customPaddingBack), (p.customPaddingTop, p.customPaddingBottom),
            (p.customPaddingLeft, p.customPaddingRight)]


def _conv3d_weights(p, lyr):
    if len(lyr.input) > 1:
        return {}
    g = p.nGroups or 1
    k = (p.kernelDepth, p.kernelHeight, p.kernelWidth)
    shape = (p.inputChannels, p.outputChannels // g) + k if p.isDeconvolution else \
        (p.outputChannels, p.inputChannels // g) + k
    return {"weight": decode_weights(p.weights, shape, axis=1 if p.isDeconvolution else 0, where="conv3d weights"),
            "bias": decode_weights(p.bias, (p.outputChannels,), where="conv3d bias") if p.hasBias else None}


@layer("convolution3d", weights=_conv3d_weights)
def convolution3d(p, w, xs, ctx):
    x, lead = flat_lead(xs[0], 4)
    wt = w["weight"] if "weight" in w else xs[1]
    k = [p.kernelDepth or 1, p.kernelHeight or 1, p.kernelWidth or 1]
    s = [p.strideDepth or 1, p.strideHeight or 1, p.strideWidth or 1]
    d = [p.dilationDepth or 1, p.dilationHeight or 1, p.dilationWidth or 1]
    g = int(p.nGroups or 1)
    dn = ("NCDHW", "OIDHW", "NCDHW")
    if p.isDeconvolution:
        cin = wt.shape[0]
        kern = wt.reshape((g, cin // g) + tuple(wt.shape[1:])).transpose(0, 2, 1, 3, 4, 5)
        kern = kern.reshape((-1, cin // g) + tuple(wt.shape[2:]))[:, :, ::-1, ::-1, ::-1]
        y = lax.conv_general_dilated(x, kern, (1, 1, 1), [(d[i] * (k[i] - 1),) * 2 for i in range(3)],
                                     lhs_dilation=s, rhs_dilation=d, dimension_numbers=dn,
                                     feature_group_count=g, precision=_HIGHEST)
        pads = _pads3(p, [(x.shape[2 + i] - 1) * s[i] + 1 for i in range(3)], k, [1, 1, 1], d, "deconv")
        out_shape = [int(v) for v in p.outputShape][-3:]
        for i in range(3):
            size = out_shape[i] if out_shape else (x.shape[2 + i] * s[i] if p.paddingType == 2
                                                   else y.shape[2 + i] - sum(pads[i]))
            start = pads[i][0] if p.paddingType != 2 else max(y.shape[2 + i] - size, 0) // 2
            y = _crop_or_pad(y, 2 + i, start, size)
    else:
        pads = _pads3(p, x.shape[2:], k, s, d, "conv")
        y = lax.conv_general_dilated(x, wt, s, pads, rhs_dilation=d, dimension_numbers=dn,
                                     feature_group_count=g, precision=_HIGHEST)
    if "bias" in w:
        y = y + w["bias"].reshape(-1, 1, 1, 1)
    return y.reshape(lead + tuple(y.shape[1:]))


@layer("pooling3d")
def pooling3d(p, w, xs, ctx):
    x = xs[0]
    k = [p.kernelDepth or 1, p.kernelHeight or 1, p.kernelWidth or 1]
    s = [p.strideDepth or 1, p.strideHeight or 1, p.strideWidth or 1]
    pads = _pads3(p, x.shape[-3:], k, s, [1, 1, 1], "pool")
    nd = x.ndim
    window, strides = (1,) * (nd - 3) + tuple(k), (1,) * (nd - 3) + tuple(s)
    padding = ((0, 0),) * (nd - 3) + tuple(pads)
    if p.type == 0:
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)
    if p.countExcludePadding:
        count = lax.reduce_window(np.ones(x.shape[-3:], np.float32), 0.0, lax.add, tuple(k), tuple(s),
                                  tuple(pads))
        return total / count
    return total / float(np.prod(k))


@layer("globalPooling3d")
def global_pooling3d(p, w, xs, ctx):
    x = xs[0]
    f = jnp.max if p.type == 0 else jnp.mean
    return f(x, axis=(-3, -2, -1), keepdims=True)
