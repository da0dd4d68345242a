"""MIL ``tensor_operation`` ops: band_part, cumsum, fill, NMS, non_zero, one_hot, pad, range_1d,
tile, argsort, topk, flatten2d, shape, concat, split, stack, identity, fill_like.

Inputs that decide an output shape (``fill``'s ``shape``, ``tile``'s ``reps``, ``pad``'s ``pad``,
``range_1d``'s bounds, ``one_hot``'s size) are keyword-only: they must be known before tracing.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.errors import OpError
from mljax.ops._registry import register

__all__ = [
    "band_part", "cumsum", "fill", "fill_like", "non_maximum_suppression", "non_zero", "one_hot",
    "pad", "range_1d", "tile", "argsort", "topk", "flatten2d", "shape", "concat", "split", "stack",
    "identity",
]


# ---------------------------------------------------------------- shared static helpers
def _axis(axis, rank: int, op: str, *, extra: int = 0) -> int:
    """Normalise a possibly negative ``axis`` into ``[0, rank + extra)``; OpError when out of range."""
    bound = rank + extra
    a = int(axis)
    if not -bound <= a < max(bound, 1):
        raise OpError(f"{op}: axis {a} is out of range for rank {rank} (expected [{-bound}, {bound}))")
    return a + bound if a < 0 else a


def _ints(values, op: str, name: str) -> list[int]:
    """A static 1-D integer input (NumPy array / list / scalar) as a list of Python ints."""
    if isinstance(values, jax.core.Tracer):
        raise OpError(f"{op}: input {name!r} must be known before tracing, found a traced value")
    return [int(v) for v in np.asarray(values).reshape(-1)]


def _bools(values, rank: int) -> list[bool]:
    """A static optional mask (None = all False) as a list of ``rank`` Python bools."""
    if values is None:
        return [False] * rank
    return [bool(v) for v in np.asarray(values).reshape(-1)]


# ---------------------------------------------------------------- elementwise-shaped ops
@register("band_part")
def band_part(x, *, lower=-1, upper=-1):
    """Zero everything outside a band of the innermost matrix; a negative bound keeps that whole triangle."""
    m = np.arange(x.shape[-2])[:, None]
    n = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


@register("cumsum")
def cumsum(x, *, axis=0, exclusive=False, reverse=False):
    """Cumulative sum along ``axis``; ``exclusive`` shifts in a zero, ``reverse`` sums from the end.

    Accumulates in the input dtype (fp16 stays fp16, as Core ML does).
    """
    x = jnp.asarray(x)
    ax = _axis(axis, x.ndim, "cumsum")
    out = lax.cumsum(x, axis=ax, reverse=bool(reverse))
    if exclusive:
        n = x.shape[ax]
        zero = jnp.zeros_like(lax.slice_in_dim(out, 0, 1, axis=ax))
        if reverse:
            out = jnp.concatenate([lax.slice_in_dim(out, 1, n, axis=ax), zero], axis=ax)
        else:
            out = jnp.concatenate([zero, lax.slice_in_dim(out, 0, n - 1, axis=ax)], axis=ax)
    return out


@register("fill")
def fill(*, shape, value=0.0):
    """A tensor of static ``shape`` filled with ``value`` (``shape`` must be known before tracing)."""
    return jnp.full(tuple(_ints(shape, "fill", "shape")), value)


@register("fill_like", "iOS16")
def fill_like(ref_tensor, *, value=0.0):
    """A tensor shaped like ``ref_tensor`` filled with ``value`` (output dtype is ``value``'s)."""
    return jnp.full(jnp.shape(ref_tensor), value)


@register("one_hot")
def one_hot(indices, *, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    """One-hot vectors inserted at ``axis``; out-of-range (or negative) indices give all ``off_value``."""
    indices = jnp.asarray(indices)
    depth = _ints(one_hot_vector_size, "one_hot", "one_hot_vector_size")[0]
    ax = _axis(axis, indices.ndim, "one_hot", extra=1)
    hot = indices[..., None] == jnp.arange(depth, dtype=indices.dtype)
    out = jnp.where(hot, on_value, off_value)
    return jnp.moveaxis(out, -1, ax)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


@register("pad")
def pad(x, *, pad, mode="constant", constant_val=0.0):
    """Pad the last ``len(pad) // 2`` dims; ``pad`` is flat ``[before_0, after_0, before_1, ...]``.

    ``reflect`` does not repeat the edge (as NumPy's ``reflect``); ``replicate`` is NumPy's ``edge``.
    """
    x = jnp.asarray(x)
    widths = _ints(pad, "pad", "pad")
    if len(widths) % 2 or len(widths) // 2 > x.ndim or min(widths, default=0) < 0:
        raise OpError(f"pad: expected an even number (<= 2*rank={2 * x.ndim}) of non-negative "
                      f"pad amounts, found {widths}")
    if mode not in _PAD_MODES:
        raise OpError(f"pad: mode must be one of {sorted(_PAD_MODES)}, found {mode!r}")
    pairs = [(0, 0)] * (x.ndim - len(widths) // 2) + [
        (widths[i], widths[i + 1]) for i in range(0, len(widths), 2)]
    if mode == "constant":
        return jnp.pad(x, pairs, mode="constant", constant_values=jnp.asarray(constant_val, x.dtype))
    return jnp.pad(x, pairs, mode=_PAD_MODES[mode])


@register("range_1d")
def range_1d(*, end, start, step):
    """NumPy-like ``arange(start, end, step)``; the bounds decide the shape so must be static."""
    for name, v in (("end", end), ("start", start), ("step", step)):
        if isinstance(v, jax.core.Tracer):
            raise OpError(f"range_1d: input {name!r} decides the output length and must be known "
                          "before tracing; found a traced value")
    if step == 0:
        raise OpError("range_1d: step must be non-zero, found 0")
    return jnp.asarray(np.arange(start, end, step))


@register("tile")
def tile(x, *, reps):
    """Repeat ``x`` ``reps[i]`` times along dim ``i`` (``len(reps) == rank(x)``)."""
    reps = _ints(reps, "tile", "reps")
    if len(reps) != jnp.ndim(x):
        raise OpError(f"tile: reps must have rank(x)={jnp.ndim(x)} entries, found {reps}")
    return jnp.tile(x, reps)


# ---------------------------------------------------------------- sorting
@register("argsort")
def argsort(x, *, axis=-1, ascending=False):
    """Indices that sort ``x`` along ``axis``; descending by default (unlike NumPy); ties keep input order."""
    x = jnp.asarray(x)
    return jnp.argsort(x, axis=_axis(axis, x.ndim, "argsort"), stable=True,
                       descending=not ascending)


def _topk(x, k, axis, ascending):
    x = jnp.asarray(x)
    ax = _axis(axis, x.ndim, "topk")
    k = x.shape[ax] if int(k) == -1 else int(k)
    if not 0 <= k <= x.shape[ax]:
        raise OpError(f"topk: k must be in [0, {x.shape[ax]}] (or -1), found {k}")
    moved = jnp.moveaxis(x, ax, -1)
    # lax.top_k picks the largest (ties: lowest index first); order-reverse the key for ascending.
    if ascending:
        key = -moved if jnp.issubdtype(moved.dtype, jnp.floating) else ~moved
    else:
        key = moved
    _, idx = lax.top_k(key, k)
    values = jnp.take_along_axis(moved, idx, axis=-1)
    return jnp.moveaxis(values, -1, ax), jnp.moveaxis(idx.astype(jnp.int32), -1, ax)


@register("topk")
def topk(x, *, k=1, axis=-1, ascending=False):
    """Top (or bottom, ``ascending``) ``k`` values and their int32 indices along ``axis``, sorted."""
    return _topk(x, k, axis, ascending)


@register("topk", "iOS16")
def topk_ios16(x, *, k=1, axis=-1, ascending=False, sort=True, return_indices=True):
    """iOS16 topk: adds ``sort`` (output is always sorted here) and ``return_indices``."""
    values, indices = _topk(x, k, axis, ascending)
    return (values, indices) if return_indices else values


@register("topk", "iOS17")
def topk_ios17(x, *, k=1, axis=-1, ascending=False, sort=True, return_indices=True,
               output_indices_dtype="int32"):
    """iOS17 topk: adds ``output_indices_dtype`` (``int32`` or ``uint16``) and ``k = -1`` for all."""
    if output_indices_dtype not in ("int32", "uint16"):
        raise OpError(f"topk: output_indices_dtype must be 'int32' or 'uint16', "
                      f"found {output_indices_dtype!r}")
    values, indices = _topk(x, k, axis, ascending)
    if not return_indices:
        return values
    return values, indices.astype(np.dtype(output_indices_dtype))


# ---------------------------------------------------------------- shape ops
@register("flatten2d")
def flatten2d(x, *, axis=1):
    """Reshape to ``(prod(shape[:axis]), prod(shape[axis:]))``; negative ``axis`` counts from the end."""
    shp = jnp.shape(x)
    ax = int(axis) + len(shp) if int(axis) < 0 else int(axis)
    if not 0 <= ax <= len(shp):
        raise OpError(f"flatten2d: axis {axis} is out of range for rank {len(shp)}")
    return jnp.reshape(x, (int(np.prod(shp[:ax])), int(np.prod(shp[ax:]))))


@register("shape")
def shape(x):
    """The static shape of ``x`` as an int32 vector (a NumPy constant, never traced)."""
    return np.array(jnp.shape(x), np.int32)


@register("identity")
def identity(x):
    """Return ``x`` unchanged."""
    return x


@register("concat")
def concat(*values, axis, interleave=False):
    """Concatenate along ``axis``; ``interleave`` alternates slices of equally shaped inputs."""
    values = [jnp.asarray(v) for v in values]
    if not values:
        raise OpError("concat: expected at least one input, found none")
    if values[0].ndim == 0:
        return jnp.stack(values)
    ax = _axis(axis, values[0].ndim, "concat")
    if not interleave:
        return jnp.concatenate(values, axis=ax)
    if len({v.shape for v in values}) != 1:
        raise OpError(f"concat: interleave needs equal shapes, found {[v.shape for v in values]}")
    stacked = jnp.stack(values, axis=ax + 1)
    out_shape = list(values[0].shape)
    out_shape[ax] *= len(values)
    return stacked.reshape(out_shape)


@register("split")
def split(x, *, num_splits=None, split_sizes=None, axis):
    """Split along ``axis`` into ``num_splits`` equal parts or parts of ``split_sizes``; returns a tuple."""
    x = jnp.asarray(x)
    ax = _axis(axis, x.ndim, "split")
    dim = x.shape[ax]
    if split_sizes is not None:
        sizes = _ints(split_sizes, "split", "split_sizes")
    elif num_splits is not None:
        n = int(num_splits)
        if n <= 0 or dim % n:
            raise OpError(f"split: num_splits={n} must evenly divide dim {ax} of size {dim}")
        sizes = [dim // n] * n
    else:
        raise OpError("split: expected num_splits or split_sizes, found neither")
    if sum(sizes) != dim:
        raise OpError(f"split: split_sizes {sizes} must sum to dim {ax} of size {dim}")
    bounds = np.cumsum([0] + sizes)
    return tuple(lax.slice_in_dim(x, int(bounds[i]), int(bounds[i + 1]), axis=ax)
                 for i in range(len(sizes)))


@register("stack")
def stack(*values, axis):
    """Stack equally shaped tensors along a new ``axis``."""
    values = [jnp.asarray(v) for v in values]
    if not values:
        raise OpError("stack: expected at least one input, found none")
    return jnp.stack(values, axis=_axis(axis, values[0].ndim, "stack", extra=1))


@register("non_zero")
def non_zero(x):
    """``[N, rank]`` int32 indices of the non-zero elements, in row-major order.

    The output shape depends on the data, so ``x`` must be concrete (the lowering evaluates ops on
    constant inputs eagerly); a traced ``x`` raises :class:`OpError`.
    """
    if isinstance(x, jax.core.Tracer):
        raise OpError("non_zero: the output shape depends on the values of 'x' (a data-dependent "
                      "shape), which cannot be traced; expected a constant input, found a traced one")
    return np.argwhere(np.asarray(x)).astype(np.int32)


# ---------------------------------------------------------------- non-maximum suppression
def _iou_matrix(boxes):
    """IoU of every pair of ``[B, 4]`` boxes given as (center_x, center_y, width, height)."""
    cx, cy, w, h = (boxes[:, i] for i in range(4))
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    iw = jnp.maximum(0, jnp.minimum(x1[:, None], x1[None]) - jnp.maximum(x0[:, None], x0[None]))
    ih = jnp.maximum(0, jnp.minimum(y1[:, None], y1[None]) - jnp.maximum(y0[:, None], y0[None]))
    inter = iw * ih
    union = (w * h)[:, None] + (w * h)[None] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0)


def _nms_one(boxes, scores, iou_threshold, score_threshold, max_boxes, per_class):
    """Greedy NMS of one batch item: ``boxes [B, 4]``, ``scores [B, K]`` -> (indices, count).

    Boxes are ranked by their best class score (ties: lower index first); when nothing survives the
    score threshold, the single best box is returned (Core ML's behaviour).
    """
    n = boxes.shape[0]
    best = jnp.max(scores, axis=-1).astype(jnp.float32)
    order = jnp.argsort(best, descending=True, stable=True)
    iou = _iou_matrix(boxes.astype(jnp.float32)[order])
    overlap = iou > iou_threshold
    if per_class:
        cls = jnp.argmax(scores, axis=-1)[order]
        overlap &= cls[:, None] == cls[None, :]
    candidate = best[order] >= score_threshold

    def step(i, kept):
        suppressed = jnp.any(kept & overlap[i] & (jnp.arange(n) < i))
        return kept.at[i].set(candidate[i] & ~suppressed)

    kept = lax.fori_loop(0, n, step, jnp.zeros(n, bool))
    kept = jnp.where(jnp.any(kept), kept, jnp.arange(n) == 0)
    (pos,) = jnp.nonzero(kept, size=max_boxes, fill_value=-1)
    indices = jnp.where(pos >= 0, order[jnp.maximum(pos, 0)], -1).astype(jnp.int32)
    return indices, jnp.minimum(jnp.sum(kept), max_boxes).astype(jnp.int32)


def _nms(boxes, scores, iou_threshold, score_threshold, max_boxes, per_class):
    """Batched NMS on ``boxes [n, B, 4]``, ``scores [n, B, K]``: (boxes, scores, indices, counts)."""
    return _nms_jit(jnp.asarray(boxes), jnp.asarray(scores), jnp.float32(iou_threshold),
                    jnp.float32(score_threshold), int(max_boxes), bool(per_class))


# Jitted as a unit so eager (constant-input) calls do not dispatch the greedy loop op by op.
@partial(jax.jit, static_argnums=(4, 5))
def _nms_jit(boxes, scores, iou_threshold, score_threshold, max_boxes, per_class):
    run = lambda b, s: _nms_one(b, s, iou_threshold, score_threshold, max_boxes, per_class)
    indices, counts = jax.vmap(run)(boxes, scores)
    valid = (indices >= 0)[..., None]
    safe = jnp.maximum(indices, 0)[..., None]
    out_boxes = jnp.where(valid, jnp.take_along_axis(boxes, safe, axis=1), 0).astype(boxes.dtype)
    out_scores = jnp.where(valid, jnp.take_along_axis(scores, safe, axis=1), 0).astype(scores.dtype)
    return out_boxes, out_scores, indices, counts


@register("non_maximum_suppression")
def non_maximum_suppression(boxes, scores, *, iou_threshold, score_threshold, max_boxes,
                            per_class_suppression=False):
    """Greedy NMS; ``boxes [n, B, 4]`` in (cx, cy, w, h), ``scores [n, B, K]``.

    Returns boxes ``[n, max_boxes, 4]``, scores ``[n, max_boxes, K]``, indices ``[n, max_boxes]``
    (padding: zeros and index -1) and the count per batch. A box is suppressed when its IoU with a
    kept, higher-scoring box is > ``iou_threshold``; boxes scoring below ``score_threshold`` are dropped.
    IoU is computed in fp32 for fp16 inputs.
    """
    return _nms(boxes, scores, iou_threshold, score_threshold, max_boxes, per_class_suppression)


@register("non_maximum_suppression", "iOS17")
def non_maximum_suppression_ios17(boxes, scores, *, iou_threshold, max_boxes,
                                  per_class_suppression=False):
    """iOS17 NMS: boxes/scores are ``[n, 4, B]`` / ``[n, K, B]`` (boxes last), no ``score_threshold``
    and no count output; outputs are ``[n, 4, max]``, ``[n, K, max]``, ``[n, max]``."""
    b, s, idx, _ = _nms(jnp.swapaxes(boxes, 1, 2), jnp.swapaxes(scores, 1, 2), iou_threshold,
                        -jnp.inf, max_boxes, per_class_suppression)
    return jnp.swapaxes(b, 1, 2), jnp.swapaxes(s, 1, 2), idx
