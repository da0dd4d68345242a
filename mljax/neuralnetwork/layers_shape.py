"""Rank-N shape layers: reshape / squeeze / transpose / slice / concat / split, fill and
broadcast, gather / scatter, ranges, constants.

Shape-like results (``getShape``, ranges, small constants) are NumPy values, and these layers
keep NumPy inputs NumPy, so shapes computed inside a network stay static.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.neuralnetwork._base import fail, layer, static_value, xp
from mljax.neuralnetwork.weights import decode_weights
from mljax.ops import scatter_gather as gather_ops
from mljax.ops import tensor_operation as tensor_ops


def _ints(x, ctx, what: str) -> list[int]:
    return [int(v) for v in static_value(x, ctx, what).reshape(-1)]


# --- constants, shapes, fills -----------------------------------------------------------------
@layer("getShape")
def get_shape(p, w, xs, ctx):
    return np.asarray(np.shape(xs[0]), np.int32)


@layer("loadConstantND", weights=lambda p, _: {"data": decode_weights(p.data, tuple(p.shape),
                                                                      where="loadConstantND data")},
       static_weights=True)
def load_constant_nd(p, w, xs, ctx):
    return w["data"]


@layer("rangeStatic")
def range_static(p, w, xs, ctx):
    return np.arange(p.startValue, p.endValue, p.stepSizeValue or 1.0, dtype=np.float32)


@layer("rangeDynamic")
def range_dynamic(p, w, xs, ctx):
    """``arange(start, end, step)``; inputs override end, start, step (they must be constants)."""
    vals = [float(static_value(x, ctx, "range bounds").reshape(-1)[0]) for x in xs]
    end = vals[0]
    start = vals[1] if len(vals) > 1 else p.startValue
    step = vals[2] if len(vals) > 2 else (p.stepSizeValue or 1.0)
    return np.arange(start, end, step, dtype=np.float32)


@layer("fillLike")
def fill_like(p, w, xs, ctx):
    return np.full(np.shape(xs[0]), p.value, np.float32)


@layer("fillStatic")
def fill_static(p, w, xs, ctx):
    return np.full(tuple(int(s) for s in p.targetShape), p.value, np.float32)


@layer("fillDynamic")
def fill_dynamic(p, w, xs, ctx):
    return np.full(_ints(xs[0], ctx, "fillDynamic's shape"), p.value, np.float32)


@layer("broadcastToLike")
def broadcast_to_like(p, w, xs, ctx):
    return xp(xs[0]).broadcast_to(xs[0], np.shape(xs[1]))


@layer("broadcastToStatic")
def broadcast_to_static(p, w, xs, ctx):
    return xp(xs[0]).broadcast_to(xs[0], tuple(int(s) for s in p.targetShape))


@layer("broadcastToDynamic")
def broadcast_to_dynamic(p, w, xs, ctx):
    return xp(xs[0]).broadcast_to(xs[0], tuple(_ints(xs[1], ctx, "broadcastToDynamic's shape")))


# --- reshapes -----------------------------------------------------------------------------------
def _reshape(x, shape):
    return xp(x).reshape(x, tuple(int(s) for s in shape))


@layer("reshapeStatic")
def reshape_static(p, w, xs, ctx):
    return _reshape(xs[0], p.targetShape)


@layer("reshapeLike")
def reshape_like(p, w, xs, ctx):
    return _reshape(xs[0], np.shape(xs[1]))


@layer("reshapeDynamic")
def reshape_dynamic(p, w, xs, ctx):
    return _reshape(xs[0], _ints(xs[1], ctx, "reshapeDynamic's shape"))


@layer("rankPreservingReshape")
def rank_preserving_reshape(p, w, xs, ctx):
    """Reshape keeping the rank; 0 keeps that dimension, -1 is inferred."""
    x = xs[0]
    target = [int(t) if t != 0 else x.shape[i] for i, t in enumerate(p.targetShape)]
    return _reshape(x, target)


@layer("flattenTo2D")
def flatten_to_2d(p, w, xs, ctx):
    x = xs[0]
    axis = int(p.axis) % (x.ndim + 1) if p.axis >= 0 else x.ndim + int(p.axis)
    lead = int(np.prod(x.shape[:axis], dtype=np.int64))
    return _reshape(x, (lead, -1) if x.size else (lead, 0))


@layer("squeeze")
def squeeze(p, w, xs, ctx):
    """Remove unit axes (``axes`` or all); a rank-1 input stays rank 1."""
    x = xs[0]
    if p.squeezeAll or not len(p.axes):
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    else:
        axes = tuple(int(a) % x.ndim for a in p.axes)
    y = xp(x).squeeze(x, axis=axes) if axes else x
    return y.reshape((1,)) if y.ndim == 0 else y


@layer("expandDims")
def expand_dims(p, w, xs, ctx):
    x = xs[0]
    rank = x.ndim + len(p.axes)
    axes = sorted(int(a) % rank for a in p.axes)
    return xp(x).expand_dims(x, tuple(axes))


@layer("transpose")
def transpose(p, w, xs, ctx):
    return xp(xs[0]).transpose(xs[0], [int(a) for a in p.axes])


@layer("reverse")
def reverse(p, w, xs, ctx):
    x = xs[0]
    axes = tuple(i for i, r in enumerate(p.reverseDim) if r) if len(p.reverseDim) else tuple(range(x.ndim))
    return xp(x).flip(x, axis=axes) if axes else x


@layer("reverseSeq")
def reverse_seq(p, w, xs, ctx):
    """Reverse the first ``lengths[b]`` entries along sequenceAxis for each batch entry b."""
    x, lengths = xs[0], jnp.asarray(xs[1]).astype(jnp.int32).reshape(-1)
    b_axis, s_axis = int(p.batchAxis) % x.ndim, int(p.sequenceAxis) % x.ndim
    n = x.shape[s_axis]
    i = jnp.arange(n)[None, :]
    src = jnp.where(i < lengths[:, None], lengths[:, None] - 1 - i, i)      # [B, S]
    shape = [1] * x.ndim
    shape[b_axis], shape[s_axis] = src.shape
    if b_axis > s_axis:
        src = src.T
    src = jnp.broadcast_to(src.reshape(shape), x.shape)
    return jnp.take_along_axis(x, src, axis=s_axis)


@layer("constantPad")
def constant_pad(p, w, xs, ctx):
    """Pad with ``value``; pads are ``[before0, after0, ...]`` for the trailing axes (or the second input).

    With padToGivenOutputSizeMode the amounts are target sizes, padded at the side where nonzero.
    """
    x = xs[0]
    amounts = _ints(xs[1], ctx, "padding amounts") if len(xs) > 1 else [int(v) for v in p.padAmounts]
    pairs = [(amounts[2 * i], amounts[2 * i + 1]) for i in range(len(amounts) // 2)]
    pairs = [(0, 0)] * (x.ndim - len(pairs)) + pairs
    if p.padToGivenOutputSizeMode:
        pairs = [(max(b - n, 0) if b else 0, max(a - n, 0) if a else 0)
                 for (b, a), n in zip(pairs, x.shape)]
    return xp(x).pad(x, pairs, constant_values=p.value)


# --- concat, split, stack, tile, slices -------------------------------------------------------
@layer("concatND")
def concat_nd(p, w, xs, ctx):
    """Concatenate along ``axis``; ``interleave`` alternates equal-size chunks of the inputs."""
    m = xp(*xs)
    axis = int(p.axis) % xs[0].ndim
    if not p.interleave:
        return m.concatenate(xs, axis=axis)
    y = m.stack(xs, axis=axis + 1)
    return y.reshape(xs[0].shape[:axis] + (-1,) + xs[0].shape[axis + 1:])


@layer("splitND")
def split_nd(p, w, xs, ctx):
    x = xs[0]
    axis = int(p.axis) % x.ndim
    if len(p.splitSizes):
        cuts = np.cumsum([int(s) for s in p.splitSizes])[:-1]
        return tuple(xp(x).split(x, cuts, axis=axis))
    n = int(p.numSplits) or len(ctx.layer.output)
    return tuple(xp(x).split(x, n, axis=axis))


@layer("stack")
def stack(p, w, xs, ctx):
    axis = int(p.axis) % (xs[0].ndim + 1)
    return xp(*xs).stack(xs, axis=axis)


@layer("tile")
def tile(p, w, xs, ctx):
    x = xs[0]
    reps = _ints(xs[1], ctx, "tile reps") if len(xs) > 1 else [int(r) for r in p.reps]
    reps = [1] * (x.ndim - len(reps)) + reps
    return xp(x).tile(x, reps)


def _strided(x, begin, end, strides, bmask, emask, smask):
    idx = []
    for i in range(x.ndim):
        if i < len(smask) and smask[i]:
            idx.append(int(begin[i]))
            continue
        b = None if (i < len(bmask) and bmask[i]) else int(begin[i])
        e = None if (i < len(emask) and emask[i]) else int(end[i])
        idx.append(slice(b, e, int(strides[i]) if i < len(strides) and strides[i] else 1))
    y = x[tuple(idx)]
    return y.reshape((1,)) if y.ndim == 0 else y     # NeuralNetwork blobs have rank >= 1


@layer("sliceStatic")
def slice_static(p, w, xs, ctx):
    """TensorFlow-style strided slice with begin/end/squeeze masks."""
    return _strided(xs[0], list(p.beginIds), list(p.endIds), list(p.strides), list(p.beginMasks),
                    list(p.endMasks), list(p.squeezeMasks))


@layer("sliceDynamic")
def slice_dynamic(p, w, xs, ctx):
    """Strided slice whose begin (and optionally end, strides, masks) are inputs (constant values)."""
    vals = [static_value(v, ctx, "slice bounds").reshape(-1) for v in xs[1:]]
    begin = vals[0]
    end = vals[1] if len(vals) > 1 else list(p.endIds)
    strides = vals[2] if len(vals) > 2 else list(p.strides)
    bmask = vals[3] if len(vals) > 3 else list(p.beginMasks)
    emask = vals[4] if len(vals) > 4 else list(p.endMasks)
    smask = vals[5] if len(vals) > 5 else list(p.squeezeMasks)
    return _strided(xs[0], begin, end, strides, bmask, emask, smask)


@layer("sliceBySize")
def slice_by_size(p, w, xs, ctx):
    """``x[.., begin:begin+size, ..]`` along ``axis``; ``begin`` may be computed."""
    x = xs[0]
    axis = int(p.axis) % x.ndim
    begin = jnp.asarray(xs[1]).reshape(-1)[0].astype(jnp.int32)
    return lax.dynamic_slice_in_dim(x, begin, int(p.size), axis=axis)


@layer("slidingWindows")
def sliding_windows(p, w, xs, ctx):
    """All windows of windowSize every ``step`` along ``axis``: ``[.., L, ..] -> [.., M, W, ..]``."""
    x = xs[0]
    axis = int(p.axis) % x.ndim
    size, step = int(p.windowSize), int(p.step) or 1
    m = (x.shape[axis] - size) // step + 1
    idx = np.arange(m)[:, None] * step + np.arange(size)[None, :]
    return jnp.take(x, idx, axis=axis)


# --- gather / scatter (MIL gather / scatter ops; negative indices count from the end) ------------
@layer("gather")
def gather(p, w, xs, ctx):
    """MIL ``gather``: ``take(data, indices, axis)``."""
    x, i = xs[0], xs[1]
    axis = int(p.axis) % x.ndim
    if isinstance(x, np.ndarray) and isinstance(i, np.ndarray):
        return np.take(x, i.astype(np.int64), axis=axis)
    return gather_ops.gather(x, jnp.asarray(i).astype(jnp.int32), axis=axis)


@layer("gatherAlongAxis")
def gather_along_axis(p, w, xs, ctx):
    return gather_ops.gather_along_axis(xs[0], jnp.asarray(xs[1]).astype(jnp.int32), axis=int(p.axis))


@layer("gatherND")
def gather_nd(p, w, xs, ctx):
    return gather_ops.gather_nd(xs[0], jnp.asarray(xs[1]).astype(jnp.int32))


#: ScatterMode -> MIL's scatter mode
_SCATTER_MODES = {0: "update", 1: "add", 2: "sub", 3: "mul", 4: "div", 5: "max", 6: "min"}


def _mode(p, ctx) -> str:
    if p.mode not in _SCATTER_MODES:
        fail(ctx, f"expected scatter mode 0-6; found {p.mode}")
    return _SCATTER_MODES[p.mode]


@layer("scatter")
def scatter(p, w, xs, ctx):
    """MIL ``scatter``: ``out[.., indices[i], ..] (op)= updates[.., i, ..]`` along ``axis``."""
    return gather_ops.scatter(xs[0], jnp.asarray(xs[1]).astype(jnp.int32), xs[2], axis=int(p.axis),
                              mode=_mode(p, ctx))


@layer("scatterND")
def scatter_nd(p, w, xs, ctx):
    return gather_ops.scatter_nd(xs[0], jnp.asarray(xs[1]).astype(jnp.int32), xs[2], mode=_mode(p, ctx))


@layer("scatterAlongAxis")
def scatter_along_axis(p, w, xs, ctx):
    return gather_ops.scatter_along_axis(xs[0], jnp.asarray(xs[1]).astype(jnp.int32), xs[2],
                                         axis=int(p.axis), mode=_mode(p, ctx))


@layer("whereNonZero")
def where_non_zero(p, w, xs, ctx):
    """Indices ``[N, rank]`` of nonzero entries; N depends on values, so the input must be constant."""
    x = static_value(xs[0], ctx, "whereNonZero's input (its output size depends on it)")
    return np.argwhere(x != 0).astype(np.float32)


@layer("oneHot")
def one_hot(p, w, xs, ctx):
    """One-hot vectors inserted at ``axis``; inputs: indices, [depth, on value, off value]."""
    idx = jnp.asarray(xs[0]).astype(jnp.int32)
    depth = int(static_value(xs[1], ctx, "one-hot depth").reshape(-1)[0]) if len(xs) > 1 \
        else int(p.oneHotVectorSize)
    on = xs[2].reshape(()) if len(xs) > 2 else p.onValue
    off = xs[3].reshape(()) if len(xs) > 3 else p.offValue
    rank = idx.ndim + 1
    axis = int(p.axis) % rank
    hot = jnp.expand_dims(idx, axis) == jnp.arange(depth).reshape([-1 if a == axis else 1 for a in range(rank)])
    return jnp.where(hot, on, off).astype(jnp.float32)


# --- non-maximum suppression ----------------------------------------------------------------------
@layer("NonMaximumSuppression")
def non_maximum_suppression(p, w, xs, ctx):
    """MIL ``non_maximum_suppression``: greedy NMS per batch over center-size boxes ``[B, N, 4]``
    and scores ``[B, N, C]``; outputs boxes, scores, indices and counts as floats."""
    boxes, scores = xs[0], xs[1]
    iou_t = jnp.asarray(xs[2]).reshape(()) if len(xs) > 2 else p.iouThreshold
    score_t = jnp.asarray(xs[3]).reshape(()) if len(xs) > 3 else p.scoreThreshold
    max_boxes = int(static_value(xs[4], ctx, "maxBoxes").reshape(-1)[0]) if len(xs) > 4 else int(p.maxBoxes)
    out = tensor_ops.non_maximum_suppression(boxes, scores, iou_threshold=iou_t, score_threshold=score_t,
                                             max_boxes=max_boxes,
                                             per_class_suppression=bool(p.perClassSuppression))
    return tuple(jnp.asarray(v).astype(jnp.float32) for v in out)
