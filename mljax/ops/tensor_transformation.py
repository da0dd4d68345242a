"""MIL ``tensor_transformation`` ops: reshapes, slices, transposes and block rearrangements.

Shapes and axes are keyword-only: they must be known before tracing (MIL allows ``reshape``'s
``shape`` to be a tensor; mljax needs it static). Slice ``begin``/``end`` are tensor inputs: static
values give NumPy slicing; values computed from the model's inputs work when the slice size is static.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.errors import OpError
from mljax.ops._registry import register
from mljax.ops.tensor_operation import _axis, _bools, _ints

__all__ = [
    "depth_to_space", "space_to_depth", "space_to_batch", "batch_to_space", "pixel_shuffle",
    "pixel_unshuffle", "expand_dims", "squeeze", "reshape", "reshape_like", "reverse",
    "reverse_sequence", "slice_by_index", "slice_by_size", "slice_update", "transpose",
    "sliding_windows",
]


def _rank4(x, op: str):
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise OpError(f"{op}: expected a rank-4 [n, C, H, W] input, found shape {x.shape}")
    return x


# ---------------------------------------------------------------- block rearrangements
@register("depth_to_space")
def depth_to_space(x, *, block_size):
    """Move channel blocks to space; channel ``(i*b + j)*C_out + c`` goes to ``(c, h*b+i, w*b+j)`` (DCR, as TF)."""
    x = _rank4(x, "depth_to_space")
    n, c, h, w = x.shape
    b = int(block_size)
    if c % (b * b):
        raise OpError(f"depth_to_space: channels {c} must be divisible by block_size^2={b * b}")
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("space_to_depth")
def space_to_depth(x, *, block_size):
    """Inverse of :func:`depth_to_space`: ``(c, h*b+i, w*b+j)`` goes to channel ``(i*b + j)*C + c``."""
    x = _rank4(x, "space_to_depth")
    n, c, h, w = x.shape
    b = int(block_size)
    if h % b or w % b:
        raise OpError(f"space_to_depth: H={h} and W={w} must be divisible by block_size={b}")
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@register("pixel_shuffle")
def pixel_shuffle(x, *, upscale_factor):
    """PyTorch ``PixelShuffle``: channel ``c*f*f + i*f + j`` goes to ``(c, h*f+i, w*f+j)`` (CRD)."""
    x = _rank4(x, "pixel_shuffle")
    n, c, h, w = x.shape
    f = int(upscale_factor)
    if c % (f * f):
        raise OpError(f"pixel_shuffle: channels {c} must be divisible by upscale_factor^2={f * f}")
    y = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (f * f), h * f, w * f)


@register("pixel_unshuffle", "iOS16")
def pixel_unshuffle(x, *, downscale_factor):
    """PyTorch ``PixelUnshuffle`` (inverse of :func:`pixel_shuffle`)."""
    x = _rank4(x, "pixel_unshuffle")
    n, c, h, w = x.shape
    f = int(downscale_factor)
    if h % f or w % f:
        raise OpError(f"pixel_unshuffle: H={h} and W={w} must be divisible by downscale_factor={f}")
    y = x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * f * f, h // f, w // f)


def _block_pairs(block_shape, pairs, op: str, name: str):
    bs = _ints(block_shape, op, "block_shape")
    pr = _ints(pairs, op, name)
    if len(bs) != 2 or len(pr) != 4:
        raise OpError(f"{op}: expected block_shape of 2 and {name} of shape [2, 2], "
                      f"found {bs} and {pr}")
    return bs, [(pr[0], pr[1]), (pr[2], pr[3])]


@register("space_to_batch")
def space_to_batch(x, *, block_shape, paddings):
    """TF ``space_to_batch_nd`` on NCHW: pad H/W, then block offset ``(i, j)`` becomes batch
    ``(i*bw + j)*n + batch``."""
    x = _rank4(x, "space_to_batch")
    (bh, bw), pads = _block_pairs(block_shape, paddings, "space_to_batch", "paddings")
    x = jnp.pad(x, [(0, 0), (0, 0), *pads])
    n, c, h, w = x.shape
    if h % bh or w % bw:
        raise OpError(f"space_to_batch: padded H={h}, W={w} must be divisible by block {bh}x{bw}")
    y = x.reshape(n, c, h // bh, bh, w // bw, bw).transpose(3, 5, 0, 1, 2, 4)
    return y.reshape(bh * bw * n, c, h // bh, w // bw)


@register("batch_to_space")
def batch_to_space(x, *, block_shape, crops):
    """Inverse of :func:`space_to_batch`: batch blocks back to space, then crop H/W."""
    x = _rank4(x, "batch_to_space")
    (bh, bw), (ch, cw) = _block_pairs(block_shape, crops, "batch_to_space", "crops")
    nb, c, h, w = x.shape
    if nb % (bh * bw):
        raise OpError(f"batch_to_space: batch {nb} must be divisible by block {bh}x{bw}")
    n = nb // (bh * bw)
    y = x.reshape(bh, bw, n, c, h, w).transpose(2, 3, 4, 0, 5, 1).reshape(n, c, h * bh, w * bw)
    return y[:, :, ch[0]:h * bh - ch[1], cw[0]:w * bw - cw[1]]


# ---------------------------------------------------------------- rank changes
@register("expand_dims")
def expand_dims(x, *, axes):
    """Insert size-1 dims at ``axes``, each counted in the output rank (``-rank-1 <= axis <= rank``)."""
    x = jnp.asarray(x)
    axes = _ints(axes, "expand_dims", "axes")
    out_rank = x.ndim + len(axes)
    positions = sorted(_axis(a, out_rank, "expand_dims") for a in axes)
    shp = list(x.shape)
    for p in positions:
        shp.insert(p, 1)
    return x.reshape(shp)


@register("squeeze")
def squeeze(x, *, axes=None):
    """Drop size-1 dims (all of them when ``axes`` is None); listed dims that are not 1 are kept (as PyTorch)."""
    x = jnp.asarray(x)
    if axes is None:
        drop = {i for i, d in enumerate(x.shape) if d == 1}
    else:
        drop = {_axis(a, x.ndim, "squeeze") for a in _ints(axes, "squeeze", "axes")}
        drop = {i for i in drop if x.shape[i] == 1}
    return x.reshape([d for i, d in enumerate(x.shape) if i not in drop])


def _infer_minus_one(in_shape, target, op: str):
    size = int(np.prod(in_shape))
    if target.count(-1) > 1:
        raise OpError(f"{op}: at most one -1 allowed in shape, found {target}")
    if -1 in target:
        known = int(np.prod([d for d in target if d != -1]))
        if known == 0 or size % known:
            raise OpError(f"{op}: cannot infer -1 in {target} for input shape {tuple(in_shape)}")
        target = [size // known if d == -1 else d for d in target]
    if int(np.prod(target)) != size:
        raise OpError(f"{op}: shape {target} has a different element count than input "
                      f"shape {tuple(in_shape)}")
    return target


@register("reshape")
def reshape(x, *, shape):
    """Reshape to static ``shape``; one ``-1`` is inferred, ``0`` copies the input dim at the same
    position (iOS15/16 allow 0 only when ``len(shape) == rank(x)``)."""
    x = jnp.asarray(x)
    target = _ints(shape, "reshape", "shape")
    if 0 in target:
        if len(target) != x.ndim:
            raise OpError(f"reshape: a 0 in shape {target} needs len(shape) == rank(x) = {x.ndim} "
                          "before iOS17")
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(_infer_minus_one(x.shape, target, "reshape"))


@register("reshape", "iOS17")
def reshape_ios17(x, *, shape):
    """iOS17 reshape: each ``0`` copies the input dim aligned from the right (1 when out of range)."""
    x = jnp.asarray(x)
    target = _ints(shape, "reshape", "shape")
    offset = x.ndim - len(target)
    target = [(x.shape[i + offset] if i + offset >= 0 else 1) if d == 0 else d
              for i, d in enumerate(target)]
    return x.reshape(_infer_minus_one(x.shape, target, "reshape"))


@register("reshape_like", "iOS16")
def reshape_like(x, *ref_tensors, begins, ends, end_masks):
    """Reshape to the concatenation of ``ref_tensors[i].shape[begins[i]:ends[i]]`` (``[begins[i]:]``
    where ``end_masks[i]``)."""
    begins = _ints(begins, "reshape_like", "begins")
    ends = _ints(ends, "reshape_like", "ends")
    masks = _bools(end_masks, len(begins))
    if not len(ref_tensors) == len(begins) == len(ends) == len(masks):
        raise OpError(f"reshape_like: expected as many begins/ends/end_masks as ref_tensors "
                      f"({len(ref_tensors)}), found {len(begins)}/{len(ends)}/{len(masks)}")
    target = []
    for ref, b, e, m in zip(ref_tensors, begins, ends, masks):
        shp = jnp.shape(ref)
        target += list(shp[b:] if m else shp[b:e])
    return jnp.reshape(x, _infer_minus_one(jnp.shape(x), target, "reshape_like"))


@register("transpose")
def transpose(x, *, perm):
    """Permute dims by ``perm`` (negative entries allowed)."""
    x = jnp.asarray(x)
    perm = [_axis(p, x.ndim, "transpose") for p in _ints(perm, "transpose", "perm")]
    if sorted(perm) != list(range(x.ndim)):
        raise OpError(f"transpose: perm must be a permutation of range({x.ndim}), found {perm}")
    return jnp.transpose(x, perm)


# ---------------------------------------------------------------- reversal
@register("reverse")
def reverse(x, *, axes=None):
    """Reverse along ``axes`` (all dims when None)."""
    x = jnp.asarray(x)
    if axes is None:
        dims = tuple(range(x.ndim))
    else:
        dims = tuple(_axis(a, x.ndim, "reverse") for a in _ints(axes, "reverse", "axes"))
    return lax.rev(x, dims) if dims else x


@register("reverse_sequence")
def reverse_sequence(x, lengths, *, seq_axis=0, batch_axis=0):
    """Reverse the first ``lengths[b]`` elements along ``seq_axis`` of each slice ``b`` of ``batch_axis``."""
    x = jnp.asarray(x)
    sa = _axis(seq_axis, x.ndim, "reverse_sequence")
    ba = _axis(batch_axis, x.ndim, "reverse_sequence")
    lengths = jnp.asarray(lengths).astype(jnp.int32).reshape(-1)
    seq = jnp.arange(x.shape[sa], dtype=jnp.int32)
    bshape = [1] * x.ndim
    bshape[ba] = x.shape[ba]
    sshape = [1] * x.ndim
    sshape[sa] = x.shape[sa]
    length = lengths.reshape(bshape)
    pos = seq.reshape(sshape)
    src = jnp.where(pos < length, length - 1 - pos, pos)
    return jnp.take_along_axis(x, jnp.broadcast_to(src, x.shape), axis=sa)


# ---------------------------------------------------------------- slicing
def _traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def _index_slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask, op: str):
    """Python slices for ``slice_by_index``-style static inputs, plus the dims to squeeze."""
    rank = len(shape)
    begin = _ints(begin, op, "begin")
    end = _ints(end, op, "end")
    stride = _strides(stride, rank, op)
    bm, em, sm = (_bools(m, rank) for m in (begin_mask, end_mask, squeeze_mask))
    if not len(begin) == len(end) == rank:
        raise OpError(f"{op}: begin/end must each have rank(x)={rank} entries, found "
                      f"{len(begin)}/{len(end)}")
    slices = []
    for i in range(rank):
        b = None if bm[i] else begin[i]
        if sm[i]:  # pure index at begin[i] (Python negative-index rules)
            idx = 0 if b is None else (b + shape[i] if b < 0 else b)
            if not 0 <= idx < shape[i]:
                raise OpError(f"{op}: squeezed index {begin[i]} out of range for dim {i} "
                              f"of size {shape[i]}")
            slices.append(slice(idx, idx + 1, 1))
        else:
            slices.append(slice(b, None if em[i] else end[i], stride[i]))
    return tuple(slices), tuple(i for i in range(rank) if sm[i])


def _strides(stride, rank: int, op: str) -> list[int]:
    stride = [1] * rank if stride is None else _ints(stride, op, "stride")
    if len(stride) != rank or 0 in stride:
        raise OpError(f"{op}: stride must have rank(x)={rank} non-zero entries, found {stride}")
    return stride


def _region_sizes(out_shape, rank: int, squeeze_mask, op: str) -> list[int]:
    """Per-dim element counts of a slice whose (squeezed) result has static ``out_shape``."""
    squeezed = _bools(squeeze_mask, rank)
    if out_shape is None or not all(isinstance(d, (int, np.integer)) for d in out_shape):
        raise OpError(f"{op}: with begin/end computed from the model's inputs the slice size must "
                      f"be static, but the output shape is {out_shape}")
    if len(out_shape) == rank:
        return [int(d) for d in out_shape]
    if len(out_shape) != rank - sum(squeezed):
        raise OpError(f"{op}: slice of shape {tuple(out_shape)} does not match rank {rank} with "
                      f"squeeze_mask {squeezed}")
    dims = iter(out_shape)
    return [1 if sq else int(next(dims)) for sq in squeezed]


def _window_starts(shape, begin, sizes, stride, begin_mask):
    """Traced ``begin`` -> the lowest index each strided window touches (wrapping negatives)."""
    begin = jnp.asarray(begin).astype(jnp.int32).reshape(-1)
    bm = _bools(begin_mask, len(shape))
    starts = []
    for i, (d, n, s) in enumerate(zip(shape, sizes, stride)):
        b = jnp.int32(0 if s > 0 else d - 1) if bm[i] else begin[i]
        b = jnp.clip(jnp.where(b < 0, b + d, b), 0, max(d - 1, 0))  # Python's clamping
        starts.append(b if s > 0 else b - (max(n, 1) - 1) * -s)
    return starts


@register("slice_by_index")
def slice_by_index(x, begin, end, *, stride=None, begin_mask=None, end_mask=None,
                   squeeze_mask=None, ctx=None):
    """NumPy ``x[begin:end:stride, ...]`` per dim (Python clamping and negative indices); masks make
    ``begin``/``end`` open, ``squeeze_mask`` indexes ``begin[i]`` and drops the dim.

    ``begin``/``end`` may be computed from the model's inputs when the declared output shape is
    static (e.g. ``x[:, i]``): the slice then starts at the traced ``begin`` (``end`` is implied).
    """
    x = jnp.asarray(x)
    if not _traced(begin, end):
        slices, squeeze_dims = _index_slices(x.shape, begin, end, stride, begin_mask, end_mask,
                                             squeeze_mask, "slice_by_index")
        out = x[slices]
        return jnp.squeeze(out, axis=squeeze_dims) if squeeze_dims else out
    out_shape = ctx.output_types[0].shape if ctx is not None and ctx.output_types else None
    sizes = _region_sizes(out_shape, x.ndim, squeeze_mask, "slice_by_index")
    stride = _strides(stride, x.ndim, "slice_by_index")
    starts = _window_starts(x.shape, begin, sizes, stride, begin_mask)
    window = lax.dynamic_slice(x, starts, [(n - 1) * abs(s) + 1 if n else 0
                                           for n, s in zip(sizes, stride)])
    return window[tuple(slice(None, None, s) for s in stride)].reshape(out_shape)


@register("slice_update", "iOS18")
def slice_update(x, update, begin, end, *, stride=None, begin_mask=None, end_mask=None,
                 squeeze_mask=None):
    """Return ``x`` with the ``slice_by_index`` region replaced by ``update``.

    ``begin``/``end`` may be computed from the model's inputs (e.g. a KV-cache position): the
    region then starts at the traced ``begin`` and has ``update``'s shape.
    """
    x, update = jnp.asarray(x), jnp.asarray(update)
    if not _traced(begin, end):
        slices, _ = _index_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask,
                                  "slice_update")
        region = tuple(len(range(d)[s]) for d, s in zip(x.shape, slices))
        if int(np.prod(region)) != update.size:
            raise OpError(f"slice_update: update of shape {update.shape} does not fit the slice "
                          f"region of shape {region}")
        return x.at[slices].set(update.reshape(region).astype(x.dtype))
    sizes = _region_sizes(update.shape, x.ndim, squeeze_mask, "slice_update")
    stride = _strides(stride, x.ndim, "slice_update")
    starts = _window_starts(x.shape, begin, sizes, stride, begin_mask)
    update = update.reshape(sizes).astype(x.dtype)
    if all(s == 1 for s in stride):
        return lax.dynamic_update_slice(x, update, starts)
    index = [(lo + jnp.arange((n - 1) * abs(s) + 1 if n else 0))[::s]
             for lo, n, s in zip(starts, sizes, stride)]
    return x.at[jnp.ix_(*index)].set(update)


@register("slice_by_size")
def slice_by_size(x, begin, *, size):
    """``x[begin[i] : begin[i] + size[i]]`` per dim; ``size[i] == -1`` takes the rest, negative
    ``begin`` counts from the end. A traced ``begin`` needs ``size`` without -1."""
    x = jnp.asarray(x)
    size = _ints(size, "slice_by_size", "size")
    if _traced(begin):
        if -1 in size or len(size) != x.ndim:
            raise OpError(f"slice_by_size: with a begin computed from the model's inputs, size must "
                          f"list rank(x)={x.ndim} explicit sizes, found {size}")
        return lax.dynamic_slice(x, _window_starts(x.shape, begin, size, [1] * x.ndim, None), size)
    begin = _ints(begin, "slice_by_size", "begin")
    if not len(begin) == len(size) == x.ndim:
        raise OpError(f"slice_by_size: begin/size must have rank(x)={x.ndim} entries, found "
                      f"{len(begin)}/{len(size)}")
    starts = [b + d if b < 0 else b for b, d in zip(begin, x.shape)]
    stops = [d if s == -1 else b + s for b, s, d in zip(starts, size, x.shape)]
    if any(not 0 <= b <= e <= d for b, e, d in zip(starts, stops, x.shape)):
        raise OpError(f"slice_by_size: begin {begin} / size {size} out of range for shape {x.shape}")
    return lax.slice(x, starts, stops)


@register("sliding_windows")
def sliding_windows(x, *, axis, size, stride=1):
    """All windows of ``size`` every ``stride`` along ``axis``: ``[.., (d - size)//stride + 1, size, ..]``."""
    x = jnp.asarray(x)
    ax = _axis(axis, x.ndim, "sliding_windows")
    size, stride = int(size), int(stride)
    count = (x.shape[ax] - size) // stride + 1
    if size <= 0 or stride <= 0 or count <= 0:
        raise OpError(f"sliding_windows: size {size} / stride {stride} invalid for dim {ax} "
                      f"of size {x.shape[ax]}")
    idx = np.arange(count)[:, None] * stride + np.arange(size)[None, :]
    return jnp.take(x, idx, axis=ax)
