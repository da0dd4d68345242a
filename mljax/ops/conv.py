"""MIL conv family: ``conv`` and ``conv_transpose`` (1-D, 2-D and 3-D, channel-first).

Layouts are MIL's: ``x`` is ``[N, C_in, *D]``; ``conv`` weights are ``[C_out, C_in/groups, *K]``;
``conv_transpose`` weights are ``[C_in, C_out/groups, *K]``.  fp16 inputs are accumulated in
fp32 (as Core ML's GPU does) and the result is cast back to the input dtype.

iOS17 only widens the dtype domains (weight/bias may differ from ``x``'s dtype, and
``conv_transpose``'s weight need not be const); the same implementations serve every opset.

``conv`` picks its implementation by shape (:func:`conv_path`): depthwise taps, 1x1 as a GEMM,
im2col + GEMM for few input channels, Winograd F(4x4, 3x3) for 3x3 stride-1 layers, else
XLA's convolution; all compute the same convolution (Winograd to ~1e-5 relative in fp32).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from mljax.errors import OpError
from mljax.ops._batching import folding_batch
from mljax.ops._registry import register

__all__ = ["conv", "convolution", "conv_path", "conv_transpose", "is_depthwise_weight", "reads_channel_first"]

_PAD_TYPES = ("valid", "same", "same_lower", "custom")


def _ints(value, n: int, default: int, name: str) -> tuple[int, ...]:
    """A per-spatial-dimension attribute as a tuple of ``n`` ints (``None`` -> ``default``)."""
    if value is None:
        return (default,) * n
    vals = tuple(int(v) for v in np.asarray(value).reshape(-1))
    if len(vals) == 1 and n > 1:
        vals = vals * n
    if len(vals) != n:
        raise OpError(f"{name} must have {n} values (one per spatial dimension), found {len(vals)}")
    return vals


def _spatial_pads(pad_type: str, pad, in_sizes, kernel, strides, dilations=None):
    """``[(before, after), ...]`` padding per spatial dimension, as MIL's ``pad_type`` defines it.

    ``same`` pads so that ``out = ceil(in / stride)``; when the total is odd the extra element
    goes after (bottom/right), for ``same_lower`` it goes before (top/left).
    """
    n = len(in_sizes)
    dilations = dilations or (1,) * n
    pad_type = str(pad_type).lower()
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = _ints(pad, 2 * n, 0, "pad")
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            k_eff = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + k_eff - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise OpError(f"pad_type must be one of {_PAD_TYPES}, found {pad_type!r}")


def _spatial_letters(n_spatial: int) -> str:
    if not 1 <= n_spatial <= 3:
        raise OpError(f"expected 1 to 3 spatial dimensions (x of rank 3 to 5), found {n_spatial}")
    return "DHW"[3 - n_spatial:]


def _geometry(in_sizes, kernel, strides, pad_type, pad, dilations):
    """``(strides, dilations, pads)`` of a convolution over ``in_sizes`` with ``kernel``: MIL's
    attributes as per-axis ints and ``[(lo, hi), ...]`` padding."""
    n = len(in_sizes)
    strides = _ints(strides, n, 1, "strides")
    dilations = _ints(dilations, n, 1, "dilations")
    return strides, dilations, _spatial_pads(pad_type, pad, in_sizes, kernel, strides, dilations)


def _lax_conv(x, weight, **options):
    """``lax.conv_general_dilated`` of channel-first ``x`` and ``weight [C_out, C_in/groups, *K]``,
    issued channel-last (transposes around an NHWC / HWIO convolution), channel-first result.

    XLA:CPU gives a channel-first convolution its channel-last library kernels only outside
    loops: inside a ``while`` body (``lax.map``, ``lax.scan``, a MIL ``while_loop``) it ran a
    generic loop, 13-140x slower (a 7x7 stride-2 first layer of 8 images 203 ms against 15 ms;
    jax-ml/jax#12868).  Outside loops XLA's layout assignment makes the same program of both
    forms (the same time, the same bits)."""
    return jnp.moveaxis(_lax_conv_last(jnp.moveaxis(x, 1, -1), weight, **options), -1, 1)


def _lax_conv_last(x, weight, laid_out=None, **options):
    """``lax.conv_general_dilated`` of a channel-last ``x [N, *D, C_in]`` and ``weight [C_out,
    C_in/groups, *K]``, issued NHWC / HWIO: the result ``[N, *D', C_out]``.  ``laid_out``: the
    weight already HWIO (prepared once per weight values), used instead of transposing ``weight``."""
    sp = _spatial_letters(x.ndim - 2)
    return lax.conv_general_dilated(x, hwio(weight) if laid_out is None else laid_out,
                                    dimension_numbers=("N" + sp + "C", sp + "IO", "N" + sp + "C"), **options)


def _accumulate_dtype(dtype):
    return jnp.float32 if jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) else None


def _add_bias(y, bias, n_spatial: int):
    if bias is None:
        return y
    return y + jnp.asarray(bias).astype(y.dtype).reshape((1, -1) + (1,) * n_spatial)


def _check_channels(op: str, c_in: int, groups: int, expected: int, found: int):
    if groups < 1 or c_in % groups:
        raise OpError(f"{op}: input channels ({c_in}) must be divisible by groups ({groups})")
    if expected != found:
        raise OpError(f"{op}: weight has {found} input channels per group, expected "
                      f"C_in / groups = {c_in} / {groups} = {expected}")


@register("conv")
def conv(x, weight, bias=None, *, strides=None, pad_type="valid", pad=None, dilations=None,
         groups=1, ctx=None):
    """MIL ``conv``: :func:`convolution`, with the graph layer's hint from the lowering's ``ctx``
    (``OpContext.hints``; no input of the program)."""
    hints = ctx.hints if ctx is not None else {}
    return convolution(x, weight, bias, strides=strides, pad_type=pad_type, pad=pad, dilations=dilations,
                       groups=groups, after_costly_op=bool(hints.get("after_costly_op")),
                       channels_last=bool(hints.get("channels_last")),
                       weight_hwio=bool(hints.get("weight_hwio")), first_in=bool(hints.get("first_in")),
                       read_once=bool(hints.get("read_once")),
                       winograd_u=ctx.prepared.get("weights") if ctx is not None else None)


def convolution(x, weight, bias=None, *, strides=None, pad_type="valid", pad=None, dilations=None,
                groups=1, after_costly_op=False, channels_last=False, weight_hwio=False, first_in=False,
                winograd_u=None, read_once=False):
    """N-D convolution of channel-first ``x`` with ``weight [C_out, C_in/groups, *K]``.

    ``same`` / ``same_lower`` padding follows TF's SAME rule (``out = ceil(in / stride)``);
    ``same_lower`` puts the odd padding element first.  iOS15's converter rejects
    ``same_lower``; it is accepted here for every opset.

    ``after_costly_op`` is a hint of mljax's graph layer
    (:func:`mljax.optimize.passes.mark_convs_after_costly_ops`): ``x`` comes from an
    activation with a transcendental function (SiLU, sigmoid, GELU...), which XLA fuses into
    the padding; the padding then takes the form that keeps that fusion vectorized.  It
    changes no value.

    ``channels_last`` is the graph layer's layout
    (:func:`mljax.optimize.passes.channels_last_regions`): ``x`` is ``[N, *D, C_in]`` and so is
    the result (``[N, *D', C_out]``); the weight keeps MIL's layout, unless ``weight_hwio``: a
    depthwise or 1x1 weight laid out ``[*K, C_in/groups, C_out]`` at load (TF's HWIO; a
    ``transpose`` of the program's ``[C_out, C_in/groups, *K]`` weight that the lowering computes
    once per weight values, see :func:`lays_out_weight`).  Depthwise, each tap's weights are one
    contiguous channel vector, which XLA's tap loop needs to vectorize; 1x1, the GEMM's right
    operand is ``[C_in, C_out]``, the orientation XLA:CPU's matrix products run fastest (up to
    2x at a few rows; transposing MIL's ``[C_out, C_in]`` per call would cost a copy).
    ``first_in``: ``x`` is channel-first (MIL's layout) and the result channel-last (a region's
    first layer, run as im2col); ``read_once``: its result's one reader reads each value once (a
    pool of non-overlapping windows, :func:`mljax.optimize.passes.channels_last_regions`).
    ``winograd_u``: ``weight``'s Winograd transforms, computed once per weight values at load
    (:func:`winograd_weight`; ``[16 or 36, C_out, C_in]``), one array or a tuple of them (F(2x2)
    and F(4x4)): where the shapes pick a variant given, that path runs without transforming
    ``weight`` again; a list predict, whose folded batch may pick another variant, looks there too.
    A channel-last conv's tuple may also hold ``weight`` laid out HWIO (:func:`prepared_kind`),
    which XLA's convolution then takes as it is.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    if channels_last:
        if first_in:
            return _direct_last(x, weight, bias, strides, pad_type, pad, dilations, bool(weight_hwio),
                                bool(read_once)).astype(x.dtype)
        return _channels_last(x, weight, bias, strides, pad_type, pad, dilations, int(groups),
                              bool(after_costly_op), bool(weight_hwio), winograd_u).astype(x.dtype)
    groups = int(groups)
    _check_channels("conv", x.shape[1], groups, x.shape[1] // max(groups, 1), weight.shape[1])
    strides, dilations, pads = _geometry(x.shape[2:], weight.shape[2:], strides, pad_type, pad, dilations)
    return _dense_or_grouped(x, weight, strides, pads, dilations, groups, bias,
                             bool(after_costly_op), winograd_u).astype(x.dtype)


_DEPTHWISE_MAX_TAPS = 64
# Path rules for XLA:CPU, from bench/conv_paths.py: single thread, fp32, CPU ms of the path over
# lax.conv_general_dilated's (median of interleaved rounds on a shared 2-core AMD EPYC; +-10%),
# im2col and Winograd in 2 MiB batch chunks (_TEMP_BYTES; with whole batches:
# (32,3,64,64)->32 im2col 0.43-0.63x, (32,32,32,32)->64 F(4x4) 0.92-1.02x, (32,64,16,16)->128
# 0.79-0.86x):
#   shape (N,C_in,H,W)->C_out 3x3    im2col  winograd F(2x2)  F(4x4)
#   (32,3,64,64)->32                 0.47x   0.60x            0.65x
#   (32,3,96,96)->32 stride 2        0.56x   -                -
#   (8,3,224,224)->32                0.57x   0.94x            0.77x
#   (8,3,112,112)->64 7x7 stride 2   1.10x   -                -
#   (32,8,32,32)->16                 0.96x   1.11x            0.85x
#   (32,16,32,32)->16                1.34x   1.02x            0.81x
#   (32,32,32,32)->64                1.28x   0.93x            0.67x
#   (32,64,16,16)->128               1.19x   0.72x            0.56x
#   (32,64,56,56)->64                1.63x   0.97x            0.71x
#   (32,64,32,32)->128 stride 2      1.11x   -                -
#   (1,64,56,56)->64                 1.46x   0.88x            0.66x
#   (8,128,28,28)->128               1.23x   0.63x            0.54x
#   (8,256,14,14)->256               1.04x   0.70x            0.74x
#   (1,256,14,14)->256               0.88x   0.82x            0.93x
#   (1,512,7,7)->512                 0.54x   0.85x            1.41x (4 tiles: the weight transform dominates)
# 1x1 as one GEMM (pointwise) (32,64,24,24)->128: 0.52x.
_IM2COL_MAX_ROWS = 32         # C_in * taps of a patch: im2col for first layers (few input channels)
_IM2COL_MAX_POSITIONS = 128   # N * output positions: im2col for small maps (few Winograd tiles)
_WINOGRAD_MIN_CHANNELS = 16   # C_in and C_out at least this: the transforms pay for themselves
_WINOGRAD_MIN_TILES = 16      # N * output tiles at least this: the weight transform is amortized
# N * 4x4 tiles at least this for F(4x4, 3x3), else F(2x2, 3x3).  Each call transforms the
# weight into 36 (F4) or 16 (F2) matrices of C_out x C_in, and with few tiles the products
# stream those matrices more than they compute: F2's 16 win (Intel Xeon, ResNet-18's last
# stage, (32,512,4,4)->512, 32 tiles: F2 0.50x lax, F4 1.12x; (32,256,8,8)->256, 128 tiles:
# F4 0.54x, F2 0.67x; (1,128,16,16)->128, 16 tiles: F2 0.69x, F4 0.76x, im2col 0.99x, hence
# im2col only up to 128 positions).  Through conv() (batch 32 as a list predict's vmap), F2 against the
# previous rules: (32,512,4,4) 0.81x, (1,128,16,16) 0.62-0.73x, (1,64,20,20) 0.83x,
# (1,256,14,14) 1.00-1.02x.
_WINOGRAD_F4_MIN_TILES = 64
# Channel-last Winograd multiplies the tiles by the weights (tiles the left operand) up to this
# many filter weights C_in * C_out (_winograd_tiles_last).
_WINOGRAD_ROWS_MAX_WEIGHTS = 64 * 128
_FAST_DTYPES = ("float32", "float16", "bfloat16")


def conv_path(x_shape, w_shape, dtype, strides, pads, dilations, groups) -> str:
    """The implementation ``conv`` runs for these shapes and attributes.

    One of ``depthwise``, ``pointwise`` (1x1 as one GEMM), ``im2col`` (patches + one GEMM),
    ``winograd`` (F(4x4, 3x3)), ``winograd2`` (F(2x2, 3x3): few 4x4 tiles) or ``lax`` (XLA's
    convolution); see the table above.
    """
    pads = [tuple(p) for p in pads]
    if _is_depthwise(x_shape, w_shape, groups, pads, strides, dilations):
        return "depthwise"
    if _is_pointwise(w_shape, groups, pads):
        return "pointwise"
    outs = _out_sizes(x_shape[2:], w_shape[2:], strides, pads, dilations)
    if groups != 1 or jnp.dtype(dtype).name not in _FAST_DTYPES or min(outs) < 1:
        return "lax"
    if math.prod(w_shape[1:]) <= _IM2COL_MAX_ROWS or x_shape[0] * math.prod(outs) <= _IM2COL_MAX_POSITIONS:
        return "im2col"
    if (len(outs) == 2 and tuple(w_shape[2:]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(dilations) == (1, 1) and min(w_shape[:2]) >= _WINOGRAD_MIN_CHANNELS):
        tiles = {f.m: x_shape[0] * math.prod(-(-o // f.m) for o in outs) for f in (_WINOGRAD_F2, _WINOGRAD_F4)}
        if tiles[4] >= _WINOGRAD_F4_MIN_TILES:
            return "winograd"
        if tiles[2] >= _WINOGRAD_MIN_TILES:
            return "winograd2"
    return "lax"


def is_depthwise_weight(w_shape, groups: int) -> bool:
    """A ``[C_out, 1, *K]`` weight in ``groups > 1`` groups: one filter (or a few) per input channel."""
    return groups > 1 and w_shape[1] == 1


def lays_out_weight(w_shape, groups: int) -> bool:
    """A channel-last region's conv whose constant weight the graph layer lays out HWIO at load
    (``convolution(weight_hwio=True)``): depthwise, and 1x1 of one group."""
    return is_depthwise_weight(w_shape, groups) or (groups == 1 and all(k == 1 for k in w_shape[2:]))


def hwio_perm(rank: int) -> tuple:
    """The permutation that lays a rank-``rank`` ``[C_out, C_in/groups, *K]`` weight out
    ``[*K, C_in/groups, C_out]`` (``weight_hwio``)."""
    return (*range(2, rank), 1, 0)


def hwio(weight):
    """``weight`` laid out HWIO (:func:`hwio_perm`)."""
    return jnp.transpose(weight, hwio_perm(weight.ndim))


def _from_hwio(weight):
    """A ``[*K, C_in/groups, C_out]`` weight back in MIL's ``[C_out, C_in/groups, *K]`` (for the
    checks and path rules, which read MIL's layout)."""
    n = weight.ndim - 2
    return jnp.transpose(weight, (n + 1, n, *range(n)))


def folds_channel_scale(x_shape, gate_shape) -> bool:
    """A channel-last 1x1 conv of ``x * gate`` (``gate [N, 1, 1, C]``, one scale per image and
    channel) that runs as one product by per-image weights (:func:`scaled_pointwise_last`): an
    image has at least ``2 * C`` positions.  With fewer the per-image weights cost more than the
    multiply's pass over ``x`` (batch 32: 0.46-0.61x at EfficientNet-B0's first stages, 1.1-4.4x
    on later ones)."""
    return (len(x_shape) == 4 and tuple(gate_shape) == (x_shape[0], 1, 1, x_shape[3])
            and x_shape[1] * x_shape[2] >= 2 * x_shape[3])


def scaled_pointwise_last(x, gate, w_io, bias=None):
    """``conv(x * gate)`` for a channel-last ``x [N, H, W, C]``, ``gate [N, 1, 1, C]`` and a 1x1
    weight ``w_io [C, K]``: one batched product of ``x`` by the per-image weights ``gate * w_io``."""
    n, h, w, c = x.shape
    weights = gate.reshape(n, c, 1) * w_io.astype(x.dtype)
    y = jnp.matmul(x.reshape(n, h * w, c), weights).reshape(n, h, w, -1)
    return y if bias is None else y + jnp.asarray(bias).astype(y.dtype)


def reads_channel_first(w_shape, groups: int) -> bool:
    """A dense conv (not 1x1) with at most ``_IM2COL_MAX_ROWS`` weights per output channel: a
    network's first layer, which starts a channel-last region from its channel-first input
    (``convolution(first_in=True)``, a sum over its taps)."""
    return groups == 1 and any(k != 1 for k in w_shape[2:]) and math.prod(w_shape[1:]) <= _IM2COL_MAX_ROWS


def _dense_or_grouped(x, weight, strides, pads, dilations, groups, bias=None, after_costly_op=False,
                      winograd_u=None):
    """``conv`` by the path :func:`conv_path` picks; fp16 comes back as fp32.

    im2col and Winograd add the bias per batch chunk, while the chunk's output is in cache.
    """
    path = conv_path(x.shape, weight.shape, x.dtype, strides, pads, dilations, groups)
    bias = None if bias is None else jnp.asarray(bias)
    if path in ("im2col", "winograd", "winograd2", "pointwise"):
        geom = (tuple(map(int, strides)), tuple((int(a), int(b)) for a, b in pads), tuple(map(int, dilations)))
        bias = jnp.zeros(weight.shape[:1], jnp.float32) if bias is None else bias
        us = _transforms(winograd_u)
        if us:
            return _prepared_folding(path, geom)(x, weight, bias, *us)
        return _batch_folding(path, geom)(x, weight, bias)
    if path == "depthwise":
        y = _depthwise(x, weight, strides, pads, dilations, after_costly_op)
    else:
        y = _lax_conv(x, weight.astype(x.dtype), window_strides=strides, padding=pads, rhs_dilation=dilations,
                      feature_group_count=groups, preferred_element_type=_accumulate_dtype(x.dtype))
    return _add_bias(y, bias, x.ndim - 2)


def _fast_path(path, geom, x, weight, bias, us=()):
    strides, pads, dilations = geom
    if path == "pointwise":
        return _add_bias(_pointwise(x, weight, strides), bias, x.ndim - 2)
    if path == "im2col":
        return _im2col(x, weight, strides, pads, dilations, bias)
    f = _WINOGRAD_PATH_VARIANTS[path]
    return _winograd(x, weight, pads, f, bias, _transform_for(us, f))


def _transforms(winograd_u) -> tuple:
    """The prepared Winograd transforms given as ``winograd_u`` (None, one array or several)."""
    if winograd_u is None:
        return ()
    return tuple(jnp.asarray(u) for u in (winograd_u if isinstance(winograd_u, (tuple, list)) else (winograd_u,)))


def _transform_for(us, f):
    """The transform of variant ``f`` among the prepared ``us``, or None (the path computes it)."""
    return next((u for u in us if u.ndim == 3 and _variant(u).m == f.m), None)


def _laid_out_for(us):
    """The HWIO weight among the prepared ``us`` (the only 4-D one), or None."""
    return next((u for u in us if u.ndim == 4), None)


@functools.lru_cache(maxsize=None)
def _batch_folding(path: str, geom):
    """``_fast_path(path, geom, ...)`` whose ``vmap`` over ``x`` folds the mapped axis into the batch.

    A lowered model's function is vmapped over the samples of a list predict, so it sees batch
    1; ``lax.conv``'s own batching rule folds the samples into its batch, this does the same
    for im2col / Winograd (re-dispatched at the folded batch).  Reverse-mode derivatives come
    from the plain implementation (``custom_vmap`` has none of its own).
    """
    strides, pads, dilations = geom
    return folding_batch(functools.partial(_fast_path, path, geom),
                         lambda x, weight, bias: _dense_or_grouped(x, weight, strides, pads, dilations, 1, bias))


def _is_pointwise(w_shape, groups, pads) -> bool:
    return groups == 1 and all(k == 1 for k in w_shape[2:]) and all(p == (0, 0) for p in map(tuple, pads))


def _batched_gemm(w2, x3):
    """``w2 [K, R]`` times each ``x3[n] [R, P]``: ``[N, K, P]`` (fp16 accumulated in fp32).

    As a batched product the weight is copied once per image; where a weight is larger than an
    image's output (``R > P``: late layers' small maps) one product ``[K, N, P]`` is transposed
    instead (ResNet-18's last stage as a list predict of 8: a [4, 512, 4608] copy per layer)."""
    acc, w2 = _accumulate_dtype(x3.dtype), w2.astype(x3.dtype)
    if x3.shape[0] > 1 and w2.shape[1] > x3.shape[2]:
        y = lax.dot_general(w2, x3, (((1,), (1,)), ((), ())), preferred_element_type=acc)
        return jnp.transpose(y, (1, 0, 2))
    w = jnp.broadcast_to(w2, (x3.shape[0],) + tuple(w2.shape))
    return lax.dot_general(w, x3, (((2,), (1,)), ((0,), (0,))), preferred_element_type=acc)


def _pointwise(x, weight, strides):
    """A 1x1 convolution as a matrix product per image over the flattened spatial positions.

    XLA:CPU runs it as a GEMM instead of a spatial convolution: 1.5-2.7x faster for the
    MobileNet-style pointwise layers of docs/performance.md.  Several images (a batch, or a
    list predict's samples folded in by ``_batch_folding``) loop over one GEMM each
    (``lax.map``): as one product XLA folds the images into the GEMM's columns and transposes
    the activations to ``[C, N*P]`` and back around every layer, and a batched product needs
    the weights broadcast per image; the loop needs neither (zoo dwcnn at batch 32: 0.76x).
    """
    if any(s != 1 for s in strides):
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
    n, c, *spatial = x.shape
    w2 = weight.reshape(weight.shape[:2])

    def gemm(images):      # [m, C, *spatial] -> [m, K, *spatial]
        return _batched_gemm(w2, images.reshape(images.shape[0], c, -1)).reshape(
            (images.shape[0], w2.shape[0], *spatial))
    # the loop carries images in their own shape: carrying [N, K, H*W] made XLA index every
    # consumer through the reshape (a ReLU6 after the layer 3.5x slower)
    return gemm(x) if n == 1 else lax.map(lambda image: gemm(image[None])[0], x)


def _out_sizes(in_sizes, kernel, strides, pads, dilations):
    return [(size + lo + hi - ((k - 1) * d + 1)) // s + 1
            for size, k, s, (lo, hi), d in zip(in_sizes, kernel, strides, pads, dilations)]


def _pad_spatial(x, pads, after_costly_op=False):
    """``x`` zero-padded by ``pads`` on its spatial axes (the minor one by concatenation, see below;
    always so when ``x`` comes from a costly activation)."""
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if not any(lo or hi for lo, hi in pads):
        return x
    if after_costly_op:
        return _pad_minor_by_concat(x, pads)
    return _spatial_padder(pads)(x)


def _pad_all(x, pads):
    return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] * (x.ndim - len(pads)) + [(lo, hi, 0) for lo, hi in pads])


def _pad_minor_by_concat(x, pads):
    """``_pad_all``, but the minor axis padded by concatenating zero columns.

    XLA:CPU's loop emitter guards every element of a fusion whose root pads the minor axis, so
    nothing in it is vectorized, including the activation XLA fuses in (a SiLU before a
    depthwise layer: 1x96x64x64 ran 7x slower than the SiLU alone); a concatenation it emits
    per operand.  EfficientNet-B0 at batch 1: 0.75x the XLA time, 0.84x the predict time.
    """
    *major, (lo, hi) = pads
    x = _pad_all(x, tuple(major) + ((0, 0),))
    zeros = [jnp.zeros(x.shape[:-1] + (n,), x.dtype) for n in (lo, hi)]
    return jnp.concatenate([zeros[0], x, zeros[1]], axis=-1)


@functools.lru_cache(maxsize=None)
def _spatial_padder(pads):
    """The zero pad by ``pads`` as one function: by concatenation (``_pad_minor_by_concat``),
    but a plain ``lax.pad`` when vmapped over the samples of a list predict.

    There XLA fuses the producer into both the concatenation and the taps that read the
    unpadded middle directly (a slice of a concatenation is simplified to its operand), which
    costs more than the guarded loop after cheap activations (MobileNetV3-Small's hardswish,
    ReLU6: 1.05-1.23x at batch 32) and less after costly ones (EfficientNet-B0's SiLU:
    0.90-0.93x): the graph layer's hint (``after_costly_op``) picks the concatenation for
    those.  Reverse-mode derivatives come from ``lax.pad``'s (``custom_vmap`` has none of its
    own).
    """
    @custom_vmap
    def padded(x):
        return _pad_minor_by_concat(x, pads)

    @padded.def_vmap
    def _rule(axis_size, in_batched, x):
        return _pad_all(x, pads), True

    @jax.custom_vjp
    def fn(x):
        return padded(x)

    fn.defvjp(lambda x: (padded(x), x), lambda x, ct: jax.vjp(lambda u: _pad_all(u, pads), x)[1](ct))
    return fn


def _windows(xp, kernel, strides, dilations, outs, lead=2):
    """``(tap, window)`` per kernel tap, row-major: the ``[N, C, *outs]`` slice of padded ``xp`` it
    reads.  The spatial axes follow ``lead`` leading axes, any after them are whole: 1 for a
    channel-last ``xp`` (``[N, *outs, C]``), 2 with a trailing axis for ``[N, G, *outs, cb]``."""
    trail = xp.ndim - lead - len(kernel)
    for tap in np.ndindex(*kernel):
        start = tuple(t * d for t, d in zip(tap, dilations))
        limit = tuple(b + (o - 1) * s + 1 for b, o, s in zip(start, outs, strides))
        yield tap, lax.slice(xp, (0,) * lead + start + (0,) * trail,
                             xp.shape[:lead] + limit + xp.shape[xp.ndim - trail:],
                             (1,) * lead + tuple(strides) + (1,) * trail)


def _is_depthwise(x_shape, w_shape, groups, pads, strides, dilations) -> bool:
    """One filter (or a few) per input channel with a small kernel: ``_depthwise`` applies."""
    kernel = w_shape[2:]
    return (groups > 1 and groups == x_shape[1] and w_shape[1] == 1 and w_shape[0] % groups == 0
            and math.prod(kernel) <= _DEPTHWISE_MAX_TAPS
            and min(_out_sizes(x_shape[2:], kernel, strides, pads, dilations)) > 0)


def _tap_sum(chains):
    """The sum of lists of terms: each list added in order (one chain of dependent adds), the
    chains' sums added pairwise.

    XLA:CPU keeps a fused loop's additions in the order written, so one chain over all of a
    kernel's taps makes each output vector wait on every multiply-add before it; one chain per
    kernel row lets them overlap (EfficientNet-B0 at batch 32, its 5x5 depthwise layers: 0.95x
    the model's time; a 5x5 layer of 240 channels at 16x16 alone 0.70x).
    """
    sums = [functools.reduce(lambda a, b: a + b, terms) for terms in chains]
    while len(sums) > 1:
        sums = [sums[i] + sums[i + 1] if i + 1 < len(sums) else sums[i] for i in range(0, len(sums), 2)]
    return sums[0]


def _depthwise(x, weight, strides, pads, dilations, after_costly_op=False):
    """A depthwise convolution as a sum over kernel taps of strided slices times per-channel weights.

    Same result as a grouped ``conv_general_dilated`` (fp16 accumulated in fp32), but XLA:CPU
    fuses the taps into one loop instead of running a grouped convolution, which it does
    one group at a time: 15-25x faster for 3x3 MobileNet layers on this project's benchmark
    machine (see docs/performance.md).
    """
    mult = weight.shape[0] // x.shape[1]
    if mult > 1:                          # channel multiplier: output o reads input channel o // mult
        x = jnp.repeat(x, mult, axis=1)
    acc = _accumulate_dtype(x.dtype) or x.dtype
    n_sp = x.ndim - 2
    outs = _out_sizes(x.shape[2:], weight.shape[2:], strides, pads, dilations)
    w = weight.astype(acc)
    xp = _pad_spatial(x.astype(acc), pads, after_costly_op)
    rows = {}
    for tap, window in _windows(xp, weight.shape[2:], strides, dilations, outs):
        rows.setdefault(tap[:-1], []).append(window * w[(slice(None), 0) + tap].reshape((1, -1) + (1,) * n_sp))
    return _tap_sum(list(rows.values()))


def _channels_last(x, weight, bias, strides, pad_type, pad, dilations, groups, after_costly_op, weight_hwio,
                   winograd_u=None):
    """``convolution`` of a channel-last ``x [N, *D, C]``: depthwise and 1x1 layers in that layout
    (every tap and product reads whole channel vectors), others through the channel-first paths."""
    laid_out = weight if weight_hwio else None
    if weight_hwio:
        weight = _from_hwio(weight)
    _check_channels("conv", x.shape[-1], groups, x.shape[-1] // max(groups, 1), weight.shape[1])
    kernel = weight.shape[2:]
    strides, dilations, pads = _geometry(x.shape[1:-1], kernel, strides, pad_type, pad, dilations)
    first = (x.shape[0], x.shape[-1]) + tuple(x.shape[1:-1])
    path = conv_path(first, weight.shape, x.dtype, strides, pads, dilations, groups)
    if path == "depthwise":
        taps = laid_out[..., 0, :] if laid_out is not None else jnp.moveaxis(weight[:, 0], 0, -1)   # [*K, C_out]
        y = _depthwise_last(x, taps, strides, pads, dilations)
    elif path == "pointwise":
        y = (_pointwise_last(x, laid_out.reshape(weight.shape[1::-1]), 0, strides) if laid_out is not None
             else _pointwise_last(x, weight.reshape(weight.shape[:2]), 1, strides))
    else:
        geom = (tuple(map(int, strides)), tuple((int(a), int(b)) for a, b in pads), tuple(map(int, dilations)))
        bias = jnp.zeros(weight.shape[:1], jnp.float32) if bias is None else jnp.asarray(bias)
        us = _transforms(winograd_u)
        if us:
            return _dense_last_folding(geom, groups, True)(x, weight, bias, *us)
        return _dense_last_folding(geom, groups, False)(x, weight, bias)
    return y if bias is None else y + jnp.asarray(bias).astype(y.dtype)


def _dense_last(x, weight, bias, geom, groups, *us):
    """A dense (or grouped, not depthwise) convolution of a channel-last ``x [N, *D, C_in]`` into
    ``[N, *D', C_out]``, by the path :func:`conv_path` picks for its channel-first twin.

    Winograd runs channel-last (:func:`_winograd_tiles_last`) and XLA's convolution is issued NHWC /
    HWIO with no transposes of the activations; im2col (first layers and small maps, where the
    activations are small) runs channel-first between two transposes.  ``us``: the weight's prepared
    values, Winograd transforms (any of F(2x2) and F(4x4)) used where the shapes pick one of them,
    and the weight laid out HWIO, used by XLA's convolution."""
    strides, pads, dilations = geom
    first = (x.shape[0], x.shape[-1]) + tuple(x.shape[1:-1])
    path = conv_path(first, weight.shape, x.dtype, strides, pads, dilations, groups)
    if path in _WINOGRAD_PATH_VARIANTS:
        f = _WINOGRAD_PATH_VARIANTS[path]
        return _winograd(x, weight, pads, f, bias, _transform_for(us, f), last=True)
    if path == "im2col":
        y = _im2col(jnp.moveaxis(x, -1, 1), weight, strides, pads, dilations, bias)
        return jnp.moveaxis(y, 1, -1)
    laid_out = _laid_out_for(us)
    y = _lax_conv_last(x, weight.astype(x.dtype), window_strides=strides, padding=pads, rhs_dilation=dilations,
                       feature_group_count=groups, preferred_element_type=_accumulate_dtype(x.dtype),
                       laid_out=None if laid_out is None else laid_out.astype(x.dtype))
    return y + bias.astype(y.dtype)


@functools.lru_cache(maxsize=None)
def _dense_last_folding(geom, groups: int, prepared: bool):
    """``_dense_last`` whose ``vmap`` over ``x`` (a list predict's samples) folds the mapped axis
    into the batch and picks the path again at the folded batch
    (:func:`mljax.ops._batching.folding_batch`).  With a prepared Winograd transform
    (``prepared``: predictions only) there are no derivatives."""
    def plain(x, weight, bias, *us):
        return _dense_last(x, weight, bias, geom, groups, *us)
    return folding_batch(plain, plain, derivatives=not prepared)


# Channels per block of a channel-last depthwise layer (one 512-bit vector of float32).
_DEPTHWISE_BLOCK = 16


def _depthwise_last(x, taps, strides, pads, dilations):
    """``_depthwise`` of a channel-last ``x`` with ``taps [*K, C_out]``: each tap a strided window
    times a contiguous channel vector.

    Where the channels split into several blocks of :data:`_DEPTHWISE_BLOCK`, the sum is
    written blocked: the padded input viewed as ``[N, C/16, *D, 16]``, the sum taken in that
    shape and moved back to ``[N, *D', C]``.  XLA folds both moves into the index arithmetic of
    its fused loops (no transposing copy in the compiled program); the loop that computes the
    sum, fused with the activation after it, still iterates in ``[N, *D', C]`` order, so the
    gain is in the code XLA emits for that indexing, not in a smaller working set, and it is
    measured, not derived.  Whole models, one thread, against the unblocked sum in the same
    process (six processes each): EfficientNet-B0 at batch 32 0.92x the time (0.87-0.94x), at
    batch 1 1.00x; MobileNetV3-Small at batch 32 0.99x, at batch 1 1.03x (0.99-1.06x, within
    its noise).  Blocks of 8 or 32 channels, or blocking only layers of >= 128 channels, gained
    less on EfficientNet-B0.
    """
    w = taps.astype(_accumulate_dtype(x.dtype) or x.dtype)
    mult = w.shape[-1] // x.shape[-1]
    if mult > 1:
        x = jnp.repeat(x, mult, axis=-1)
    kernel, channels = w.shape[:-1], w.shape[-1]
    outs = _out_sizes(x.shape[1:-1], kernel, strides, pads, dilations)
    xp = lax.pad(x.astype(w.dtype), jnp.zeros((), w.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])
    cb = _DEPTHWISE_BLOCK
    blocked = channels % cb == 0 and channels > cb
    if blocked:
        groups = channels // cb
        xp = jnp.moveaxis(xp.reshape(xp.shape[:-1] + (groups, cb)), -2, 1)       # [N, G, *D_pad, cb]
        w = w.reshape(kernel + (groups,) + (1,) * len(kernel) + (cb,))         # per tap [G, 1.., cb]
    rows = {}
    for tap, window in _windows(xp, kernel, strides, dilations, outs, lead=2 if blocked else 1):
        rows.setdefault(tap[:-1], []).append(window * w[tap])
    y = _tap_sum(list(rows.values()))
    if not blocked:
        return y
    y = jnp.moveaxis(y, 1, -2)                                                   # [N, *D', G, cb]
    return y.reshape(y.shape[:-2] + (channels,))


def _direct_last(x, weight, bias, strides, pad_type, pad, dilations, weight_hwio=False, read_once=False):
    """A network's first layer (few weights per output channel, :func:`reads_channel_first`):
    channel-first ``x [N, C_in, *D]`` in, channel-last ``[N, *D', C_out]`` out, as a sum over the
    input channels and kernel taps of a strided window (one input value per position,
    broadcast) times that tap's ``C_out`` weights: XLA emits a loop over the output, vectorized
    over its channels.

    Measured against im2col + GEMM (patches materialized, one product per image, the
    ``[C_out, P]`` result transposed in every consumer), one thread, with a hardswish, input
    128x128 RGB, 3x3 stride 2: 16 output channels 0.41x the im2col time at batch 1, 0.67x at 16
    images, 0.72x at 32 (0.69-0.98x ONNX Runtime's conv + activation); 32 channels 0.61x at batch
    1, 0.64x at 4 images.  Only the padding the windows read is added (a stride-2 layer's
    bottom/right padding is never read).  The taps sum in independent chains, one per input
    channel and kernel row, added pairwise (:func:`_tap_sum`), so that consecutive
    multiply-adds do not wait on each other.  The graph layer lays the weight out HWIO at load
    (``weight_hwio``), so that each tap's ``C_out`` weights are contiguous: XLA otherwise made the
    transpose a layout of its parameter and gathered every tap's weights at a stride.
    """
    laid_out = weight if weight_hwio else hwio(weight)             # [*K, C_in, C_out]
    weight = _from_hwio(weight) if weight_hwio else weight
    _check_channels("conv", x.shape[1], 1, x.shape[1], weight.shape[1])
    kernel = weight.shape[2:]
    strides, dilations, pads = _geometry(x.shape[2:], kernel, strides, pad_type, pad, dilations)
    outs = _out_sizes(x.shape[2:], kernel, strides, pads, dilations)
    acc = _accumulate_dtype(x.dtype) or x.dtype
    # padding past the last window's end is never read
    reads = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(outs, strides, kernel, dilations)]
    pads = [(lo, max(0, min(hi, r - size - lo))) for (lo, hi), r, size in zip(pads, reads, x.shape[2:])]
    xp = _pad_all(x.astype(acc), pads)
    w = laid_out.astype(acc)
    bias = None if bias is None else jnp.asarray(bias).astype(acc)

    def rows(xr, out_rows):       # the output rows of the padded input rows xr
        chains = {}
        for c in range(x.shape[1]):
            for tap, window in _windows(xr[:, c:c + 1], kernel, strides, dilations, (out_rows,) + tuple(outs[1:])):
                chains.setdefault((c, tap[:-1]), []).append(window[:, 0, ..., None] * w[tap + (c,)])
        y = _tap_sum(list(chains.values()))
        return y if bias is None else y + bias

    # Materialized once, behind an optimization barrier: as one elementwise expression XLA fused
    # the whole tap sum into each of its consumers (a SiLU's two, a depthwise layer's padding),
    # computing it up to three times.  A loop over blocks of output rows did the same, and its
    # zero-filled output cost a pass (MobileNetV3-Small at batch 32: 1.5 ms of 17); against it the
    # barrier takes MobileNetV3-Small 0.94x the time at batch 32, 0.85x at batch 1, EfficientNet-B0
    # 1.00x / 0.98x (three processes each).  With ``read_once`` (one reader that reads each value
    # once: a ReLU and 2x2/2 max pool) XLA fuses the sum into that reader without repeating it
    # (the zoo's cnn at batch 32: 0.90x the time of the materialized form).
    y = rows(xp, outs[0])
    return y if read_once else lax.optimization_barrier(y)


def _pointwise_last(x, w2, w_in_axis, strides):
    """A 1x1 convolution of a channel-last ``x``: one GEMM over all positions (and images) with
    ``w2``, ``[C_in, C_out]`` (``w_in_axis`` 0, HWIO) or MIL's ``[C_out, C_in]`` (1)."""
    if any(s != 1 for s in strides):
        x = x[(slice(None),) + tuple(slice(None, None, s) for s in strides)]
    return lax.dot_general(x, w2.astype(x.dtype), (((x.ndim - 1,), (w_in_axis,)), ((), ())),
                           preferred_element_type=_accumulate_dtype(x.dtype))


def _im2col(x, weight, strides, pads, dilations, bias=None):
    """im2col: every tap's window stacked as rows of a ``[C_in * taps, positions]`` matrix, one GEMM per image.

    For few input channels (a network's first layer) XLA:CPU's convolution runs far below
    GEMM speed; the patch matrix is small there (C_in * taps rows).
    """
    outs = _out_sizes(x.shape[2:], weight.shape[2:], strides, pads, dilations)
    w2, p = weight.reshape(weight.shape[0], -1), math.prod(outs)

    def one_chunk(xc):
        wins = [v for _, v in _windows(_pad_spatial(xc, pads), weight.shape[2:], strides, dilations, outs)]
        patches = jnp.stack(wins, axis=2)            # [N, C, taps, *outs]: rows in weight's (c, tap) order
        return _add_bias(_batched_gemm(w2, patches.reshape(xc.shape[0], -1, p)), bias, 1)

    y = _in_batch_chunks(one_chunk, x, (w2.shape[1] * x.dtype.itemsize + w2.shape[0] * 4) * p)
    return y.reshape((x.shape[0], weight.shape[0], *outs))


# Temporaries per batch chunk of im2col / Winograd (one image per chunk where an image needs
# more): a chunk's patches or tiles, products and output stay in the core's caches between the
# transform, the product and the next layer's read.  Inside whole networks (one thread, freed
# memory retained, in-process interleaved rounds against ONNX Runtime, AMD EPYC): ResNet-18
# batch 32 0.95x ONNX Runtime with 2-4 MiB chunks against 1.07x with 32 MiB (two runs; 1 MiB
# 1.02x, whole batches 1.14x), the zoo's cnn batch 32 1.14-1.18x against 1.38-1.44x; batch 8
# and the depthwise CNN unchanged within noise.  Without retain_freed_memory() the executable's
# temporaries are fresh pages on every call whatever the chunk (ResNet-18 batch 32 1.53-1.63x
# with every size).  The per-layer path rules above were measured with these chunks.
_TEMP_BYTES = 2 << 20


def _in_batch_chunks(fn, x, bytes_per_image: int):
    """``fn(x)`` (batch-wise independent), over ``lax.map``'d batch chunks whose temporaries fit ``_TEMP_BYTES``."""
    n = x.shape[0]
    size = max(1, min(n, _TEMP_BYTES // max(bytes_per_image, 1)))
    while n % size:
        size -= 1
    if size == n:
        return fn(x)
    y = lax.map(fn, x.reshape((n // size, size) + x.shape[1:]))
    return y.reshape((n,) + y.shape[2:])


class _Winograd(NamedTuple):
    """Winograd F(m x m, 3 x 3): ``Y = A^T [(G g G^T) * (B^T d B)] A`` over (m+2)^2 input tiles."""
    m: int
    bt: np.ndarray   # [m+2, m+2] input transform B^T
    g: np.ndarray    # [m+2, 3] weight transform
    at: np.ndarray   # [m, m+2] output transform A^T


_WINOGRAD_F2 = _Winograd(2, np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
                         np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]),
                         np.array([[1, 1, 1, 0], [0, 1, -1, -1]]))
# Interpolation points 0, +-1, +-2 (Lavin & Gray 2016): error ~1e-5 relative in fp32.
_WINOGRAD_F4 = _Winograd(
    4, np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
    np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
    np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]))


def _combine(parts, coeffs):
    """``sum(c * p)`` over the nonzero constant coefficients (elementwise, fused by XLA)."""
    terms = [p if c == 1 else -p if c == -1 else p * float(c) for c, p in zip(coeffs, parts) if c]
    return sum(terms[1:], terms[0])


def winograd_weight(weight, m: int):
    """The Winograd F(m x m, 3 x 3) transform ``G g G^T`` of every 3x3 filter of ``weight``
    ``[C_out, C_in, 3, 3]``: ``[(m+2)^2, C_out, C_in]`` in fp32, one ``[(m+2)^2, 9] x [9, C_out*C_in]``
    product (``G (x) G`` times the raveled filters)."""
    f = _WINOGRAD_F4 if m == 4 else _WINOGRAD_F2
    t = f.m + 2
    w = jnp.asarray(weight).astype(jnp.float32)
    k, c = w.shape[:2]
    return lax.dot_general(jnp.asarray(np.kron(f.g, f.g), jnp.float32), w.reshape(k * c, 9),
                           (((1,), (1,)), ((), ()))).reshape(t * t, k, c)


def winograd_variant(x_shape, w_shape, dtype, *, strides=None, pad_type="valid", pad=None, dilations=None,
                     groups=1) -> int | None:
    """``m`` of the Winograd F(m x m, 3 x 3) path a convolution of one sample ``x_shape``
    (channel-first) takes, or None: the transform its weight may have computed at load.

    A predict passes it (``winograd_u``), so the per-call transform goes: ResNet-18 batch 1 ran
    0.78x the time.  A list predict whose folded batch picks the same variant uses it too; one
    that picks the other (more tiles: F(4x4)) transforms the weight itself, as before."""
    n = len(x_shape) - 2
    if n != 2 or len(w_shape) != 4:
        return None
    strides, dilations, pads = _geometry(x_shape[2:], w_shape[2:], strides, pad_type, pad, dilations)
    path = conv_path(x_shape, w_shape, dtype, strides, pads, dilations, int(groups))
    return next((m for m, name in _WINOGRAD_PATHS.items() if name == path), None)


def prepared_kind(x_shape, w_shape, dtype, *, region: bool, strides=None, pad_type="valid", pad=None,
                  dilations=None, groups=1) -> int | str | None:
    """What a conv of one sample (or a folded batch) ``x_shape`` (channel-first) takes prepared once
    per weight values (the lowering's and the NeuralNetwork translator's prepared weights): the
    Winograd variant ``m`` its path runs (:func:`winograd_variant`), ``"hwio"`` for a dense conv of a
    channel-last region (``region``) that runs by XLA's convolution, issued NHWC / HWIO (its weight
    laid out once saves the transposing copy on every call: ResNet-18's 256 -> 512 stride-2 layer,
    1.5-2.6 ms a call at batch 32), or None."""
    m = winograd_variant(x_shape, w_shape, dtype, strides=strides, pad_type=pad_type, pad=pad,
                         dilations=dilations, groups=groups)
    if (m is not None or not region or len(x_shape) != 4 or len(w_shape) != 4
            or is_depthwise_weight(w_shape, int(groups))):
        return m
    strides, dilations, pads = _geometry(x_shape[2:], w_shape[2:], strides, pad_type, pad, dilations)
    return "hwio" if conv_path(x_shape, w_shape, dtype, strides, pads, dilations, int(groups)) == "lax" else None


def prepared_weight(weight, kind):
    """A conv weight's value prepared once per weight values (:func:`prepared_kind`): its Winograd
    transform (``kind`` 2 or 4, :func:`winograd_weight`) or its HWIO layout (``"hwio"``)."""
    return hwio(weight) if kind == "hwio" else winograd_weight(weight, kind)


def _variant(u) -> _Winograd:
    return _WINOGRAD_F4 if u.shape[0] == 36 else _WINOGRAD_F2


_WINOGRAD_PATHS = {4: "winograd", 2: "winograd2"}     # conv_path's name of each variant
_WINOGRAD_PATH_VARIANTS = {"winograd": _WINOGRAD_F4, "winograd2": _WINOGRAD_F2}


@functools.lru_cache(maxsize=None)
def _prepared_folding(path: str, geom):
    """``_fast_path`` with prepared weight transforms ``*us`` (any of F(2x2) and F(4x4)), whose
    ``vmap`` over ``x`` folds the mapped axis into the batch and re-dispatches at the folded batch
    (as :func:`_batch_folding`) with the same transforms: a batch that picks a variant not given
    transforms the weight itself.  For predictions: no derivatives of its own (training computes
    the transform in the traced function)."""
    strides, pads, dilations = geom
    return folding_batch(
        lambda x, weight, bias, *us: _fast_path(path, geom, x, weight, bias, us),
        lambda x, weight, bias, *us: _dense_or_grouped(x, weight, strides, pads, dilations, 1, bias, winograd_u=us),
        derivatives=False)


def _winograd(x, weight, pads, f: _Winograd, bias=None, u=None, last=False):
    """A 3x3 stride-1 convolution (2-D) by Winograd's minimal filtering, computed in fp32.

    ``m x m`` output tiles from overlapping ``t x t`` input tiles (``t = m + 2``): the input
    transform is two separable passes of constant combinations of strided slices (the first
    materialized, which halves its cost on XLA:CPU), the product one batched GEMM over the
    ``t^2`` tile positions ``[K, C] @ [C, N * tiles]``, the output transform one small dot
    with ``A^T (x) A^T``.  The weight transform ``u`` (:func:`winograd_weight`) runs inside the
    traced function, so weights stay ordinary (differentiable) arguments, unless it comes
    computed once per weight values (a predict's prepared weights, see :func:`winograd_variant`).

    ``last``: a channel-last ``x [N, H, W, C]`` and result ``[N, H', W', K]``
    (:func:`_winograd_tiles_last`).
    """
    m, t = f.m, f.m + 2
    x = x.astype(jnp.float32)
    k, c = weight.shape[:2]
    (top, bottom), (left, right) = pads
    h, w = x.shape[1:3] if last else x.shape[2:4]
    ho, wo = h + top + bottom - 2, w + left + right - 2
    th, tw = -(-ho // m), -(-wo // m)
    u = winograd_weight(weight, m) if u is None else u.astype(jnp.float32)
    if last:
        b = 0.0 if bias is None else jnp.asarray(bias).astype(jnp.float32)
        y = _in_batch_chunks(lambda xc: _winograd_tiles_last(xc, u, (top, left), (th, tw), f) + b,
                             x, t * t * th * tw * (c + k) * 4)
        return y[:, :ho, :wo]
    y = _in_batch_chunks(lambda xc: _add_bias(_winograd_tiles(xc, u, (top, left), (th, tw), f), bias, 2),
                         x, t * t * th * tw * (c + k) * 4)
    return y[:, :, :ho, :wo]


def _winograd_tiles_last(x, u, before, tiles, f: _Winograd):
    """``[N, th*m, tw*m, K]`` from channel-last ``x``: ``_winograd_tiles`` with channels minor.

    Every transform reads and writes whole channel vectors.  A layer of at most
    ``_WINOGRAD_ROWS_MAX_WEIGHTS`` filter weights (``C * K``) multiplies the transformed tiles by
    the transformed weights (``[t*t, N*tiles, C] @ [t*t, K, C]^T``), so the product comes out
    channel-last and the output transform is two separable passes of constant combinations, as
    the input's; per layer at batch 32 (one thread, Intel Xeon, prepared weights) against the
    weights as the left operand: 0.65x at 32 -> 64 channels (32x32), 0.81x at 64 -> 64 (32x32),
    0.90x at 64 -> 128 (16x16); batch 1 0.85x at 64 -> 64.  Larger layers take the transformed
    weights ``[t*t, K, C]`` as the product's left operand (``[t*t, K, N*tiles]``), which the
    output transform turns back to channel-last: as the right operand the library transposed and
    packed them on every call (128 -> 128 1.42x, 256 -> 256 2.15x, 512 -> 512 2.0x).  Against the
    channel-first path those ran (AMD EPYC, one run each) 0.87x at 64 channels (32x32), 0.85x at
    128 (16x16), 0.93x at 256 (8x8), 0.96x at 512 (4x4, F(2x2))."""
    m, t = f.m, f.m + 2
    (n, h, wd, c), k = x.shape, u.shape[1]
    (top, left), (th, tw) = before, tiles
    xp = _pad_all(x, [(top, th * m + 2 - h - top), (left, tw * m + 2 - wd - left), (0, 0)])
    rows = [lax.slice_in_dim(xp, a, a + m * (th - 1) + 1, m, axis=1) for a in range(t)]
    s = lax.optimization_barrier(jnp.stack([_combine(rows, f.bt[i]) for i in range(t)]))   # [t, N, th, Wp, C]
    cols = [lax.slice_in_dim(s, b, b + m * (tw - 1) + 1, m, axis=3) for b in range(t)]
    v = jnp.stack([_combine(cols, f.bt[j]) for j in range(t)], axis=1).reshape(t * t, n * th * tw, c)
    if c * k <= _WINOGRAD_ROWS_MAX_WEIGHTS:
        prod = lax.dot_general(v, u, (((2,), (2,)), ((0,), (0,)))).reshape(t, t, n, th, tw, k)
        rows = jnp.stack([_combine(list(prod), f.at[i]) for i in range(m)])             # [m, t, N, th, tw, K]
        y = jnp.stack([_combine([rows[:, j] for j in range(t)], f.at[i]) for i in range(m)], axis=1)
        return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, k)
    prod = lax.dot_general(u, v, (((2,), (2,)), ((0,), (0,))))            # [t*t, K, N*th*tw]
    y = jnp.tensordot(jnp.asarray(np.kron(f.at, f.at), jnp.float32), prod, axes=1)
    return y.reshape(m, m, k, n, th, tw).transpose(3, 4, 0, 5, 1, 2).reshape(n, th * m, tw * m, k)


def _winograd_tiles(x, u, before, tiles, f: _Winograd):
    """``[N, K, th*m, tw*m]``: input transform, the product with transformed weights ``u``, output transform."""
    m, t = f.m, f.m + 2
    (n, c, h, wd), k = x.shape, u.shape[1]
    (top, left), (th, tw) = before, tiles
    # Channels first so that the transformed tiles come out as [t*t, C, N*th*tw]; the bottom /
    # right padding is extended to whole tiles (the extra outputs are cropped by the caller).
    xp = _pad_spatial(x.transpose(1, 0, 2, 3), [(top, th * m + 2 - h - top), (left, tw * m + 2 - wd - left)])
    rows = [lax.slice_in_dim(xp, a, a + m * (th - 1) + 1, m, axis=2) for a in range(t)]
    s = lax.optimization_barrier(jnp.stack([_combine(rows, f.bt[i]) for i in range(t)]))
    cols = [lax.slice_in_dim(s, b, b + m * (tw - 1) + 1, m, axis=4) for b in range(t)]
    v = jnp.stack([_combine(cols, f.bt[j]) for j in range(t)], axis=1).reshape(t * t, c, n * th * tw)
    prod = lax.dot_general(u, v, (((2,), (1,)), ((0,), (0,))))            # [t*t, K, N*th*tw]
    y = jnp.tensordot(jnp.asarray(np.kron(f.at, f.at), jnp.float32), prod, axes=1)
    return y.reshape(m, m, k, n, th, tw).transpose(3, 2, 4, 0, 5, 1).reshape(n, k, th * m, tw * m)


def _transpose_out_sizes(pad_type, pad, output_shape, in_sizes, kernel, strides, dilations):
    """Output spatial sizes and the leading crop of the full transposed-conv output."""
    n = len(in_sizes)
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    full = [(i - 1) * s + k for i, s, k in zip(in_sizes, strides, k_eff)]
    pad_type = str(pad_type).lower()
    if pad_type not in _PAD_TYPES:
        raise OpError(f"pad_type must be one of {_PAD_TYPES}, found {pad_type!r}")
    if output_shape is not None:
        shape = [int(v) for v in np.asarray(output_shape).reshape(-1)]
        out = shape[-n:] if len(shape) in (n, n + 2) else None
        if out is None:
            raise OpError(f"output_shape must have {n + 2} (or {n}) values, found {len(shape)}")
    elif pad_type == "same" or pad_type == "same_lower":
        out = [i * s for i, s in zip(in_sizes, strides)]
    elif pad_type == "custom":
        p = _ints(pad, 2 * n, 0, "pad")
        out = [f - p[2 * i] - p[2 * i + 1] for i, f in enumerate(full)]
    else:
        out = list(full)
    if pad_type == "custom":
        before = list(_ints(pad, 2 * n, 0, "pad")[0::2])
    elif pad_type in ("same", "same_lower"):
        totals = [max(0, f - o) for f, o in zip(full, out)]
        before = [t // 2 if pad_type == "same" else t - t // 2 for t in totals]
    else:
        before = [0] * n
    return out, before, k_eff


def _transpose_kernel(weight, groups: int):
    """``[C_in, C_out/g, *K]`` -> the forward-conv kernel ``[C_out, C_in/g, *K]``, flipped."""
    c_in, c_out_g, *k = weight.shape
    w = weight.reshape((groups, c_in // groups, c_out_g, *k))
    w = jnp.swapaxes(w, 1, 2).reshape((groups * c_out_g, c_in // groups, *k))
    return jnp.flip(w, axis=tuple(range(2, w.ndim)))


@register("conv_transpose")
def conv_transpose(x, weight, bias=None, *, pad=None, output_shape=None, pad_type="valid",
                   strides=None, dilations=None, groups=1):
    """Transposed convolution with ``weight [C_in, C_out/groups, *K]``.

    Output size: ``output_shape`` when given, else ``(D-1)*s + K_eff`` minus the custom pads
    (``valid``: no pads; ``same``: ``D*s``).  Output position ``o`` is position
    ``o + pad_before`` of the full (uncropped) result; positions past its end are zero (plus
    bias), which is how an ``output_shape`` larger than the full result (PyTorch's
    ``output_padding``) reads.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    n = x.ndim - 2
    groups = int(groups)
    c_in = x.shape[1]
    if weight.shape[0] != c_in or c_in % max(groups, 1):
        raise OpError(f"conv_transpose: weight's first dimension ({weight.shape[0]}) must equal "
                      f"the input channels ({c_in}), divisible by groups ({groups})")
    strides = _ints(strides, n, 1, "strides")
    dilations = _ints(dilations, n, 1, "dilations")
    out, before, k_eff = _transpose_out_sizes(pad_type, pad, output_shape, x.shape[2:],
                                              weight.shape[2:], strides, dilations)
    lo = [k - 1 - b for k, b in zip(k_eff, before)]
    hi = [o - (i - 1) * s - 1 + b for o, i, s, b in zip(out, x.shape[2:], strides, before)]
    y = _lax_conv(x, _transpose_kernel(weight.astype(x.dtype), groups), window_strides=(1,) * n,
                  padding=[(max(a, 0), max(b, 0)) for a, b in zip(lo, hi)], lhs_dilation=strides,
                  rhs_dilation=dilations, feature_group_count=groups,
                  preferred_element_type=_accumulate_dtype(x.dtype))
    # Negative padding (crop more than the kernel overhang) is applied as a slice afterwards.
    crop = tuple(slice(max(-a, 0), y.shape[2 + i] - max(-b, 0))
                 for i, (a, b) in enumerate(zip(lo, hi)))
    y = y[(slice(None), slice(None)) + crop]
    return _add_bias(y, bias, n).astype(x.dtype)

