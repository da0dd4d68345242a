"""MIL scatter/gather ops: gather, gather_along_axis, gather_nd, scatter, scatter_along_axis, scatter_nd.

Opset deltas: iOS16 adds ``batch_dims`` to ``gather`` and ``gather_nd``; iOS17 adds
``validate_indices`` to every op here and declares negative indices out of bounds.
Negative indices are wrapped (``i + dim``) by every gather and by iOS15/16 scatters; iOS17+
scatters treat them as out of bounds, as Core ML does.  Out-of-bound indices are clamped by
gathers and dropped by scatters (iOS17 calls both "undefined but memory safe").
``validate_indices=True`` raises :class:`~mljax.errors.PredictionError` on out-of-bound
indices: at once for concrete indices, after the call (a ``checkify`` flag) for computed ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from mljax.errors import OpError, PredictionError
from mljax.ops._registry import register

__all__ = ["gather", "gather_along_axis", "gather_nd", "scatter", "scatter_along_axis", "scatter_nd",
           "has_runtime_checks"]

_MODES = ("update", "add", "sub", "mul", "div", "max", "min")
_OPS = frozenset(__all__[:6])


def _norm_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise OpError(f"{op}: axis must be in [{-rank}, {rank}) for a rank-{rank} input; found {axis}")
    return axis % rank


def _wrap(indices, size, negative_from_end: bool = True):
    """int32 indices with negative values counted from the end (``-1`` -> ``size - 1``), or,
    with ``negative_from_end=False`` (iOS17+ scatters), made out of bounds (``size``)."""
    idx = jnp.asarray(indices).astype(jnp.int32)
    return jnp.where(idx < 0, idx + size if negative_from_end else size, idx)


def _check_bounds(indices, upper, op: str) -> None:
    idx = np.asarray(indices)
    bad = (idx < 0) | (idx >= upper)
    if np.any(bad):
        raise PredictionError(f"{op}: validate_indices=True expects indices in [0, {upper.tolist()}); "
                              f"found out-of-bound value(s) {np.unique(idx[bad]).tolist()}")


def _validate(indices, upper, validate: bool, op: str) -> None:
    """With ``validate``, fail when ``indices`` fall outside ``[0, upper)``.

    Concrete indices fail at once (:class:`PredictionError`); traced ones add a
    ``checkify.check``: the flag is an extra output that ``MLModel`` checks after the call
    (it runs such programs through ``checkify.checkify``) and raises as ``PredictionError``.
    """
    if not validate:
        return
    upper = np.asarray(upper)
    if not isinstance(indices, jax.core.Tracer):
        _check_bounds(indices, upper, op)
        return
    idx = jnp.asarray(indices)
    bad = (idx < 0) | (idx >= upper)
    first = jnp.broadcast_to(idx, bad.shape).reshape(-1)[jnp.argmax(bad.reshape(-1))]
    checkify.check(~jnp.any(bad), f"{op}: validate_indices=True expects indices in "
                   f"[0, {upper.tolist()}); found out-of-bound value {{}}", first)


def has_runtime_checks(function) -> bool:
    """Whether a MIL function validates indices it computes at run time (``validate_indices=True``
    on non-constant indices): it then needs ``checkify.checkify`` around its traced calls."""
    for op in function.block.walk():
        if op.type in _OPS:
            flag, indices = op.input("validate_indices"), op.input("indices")
            validate = op.attributes.get("validate_indices", False) if flag is None else flag.value
            if indices is not None and indices.value is None and bool(np.asarray(validate)):
                return True
    return False


# --- gather -----------------------------------------------------------------------------
def _gather(x, indices, axis: int, batch_dims: int):
    x = jnp.asarray(x)
    indices = jnp.asarray(indices)
    axis = _norm_axis(axis, x.ndim, "gather")
    if batch_dims < 0:
        batch_dims += indices.ndim
    if not 0 <= batch_dims <= min(axis, indices.ndim):
        raise OpError(f"gather: batch_dims must be in [0, min(axis={axis}, rank(indices)="
                      f"{indices.ndim})]; found {batch_dims}")
    if x.shape[:batch_dims] != indices.shape[:batch_dims]:
        raise OpError(f"gather: the first batch_dims={batch_dims} dims of x {x.shape} and indices "
                      f"{indices.shape} must match")
    idx = _wrap(indices, x.shape[axis])

    def take(xb, ib):
        return jnp.take(xb, ib, axis=axis - batch_dims, mode="clip")

    for _ in range(batch_dims):
        take = jax.vmap(take)
    return take(x, idx)


@register("gather")
def gather(x, indices, *, axis=0):
    """``x`` sliced along ``axis`` at ``indices`` (``tf.gather``); negative indices allowed."""
    return _gather(x, indices, axis, 0)


@register("gather", "iOS16")
def gather_iOS16(x, indices, *, axis=0, batch_dims=0):
    """iOS16 adds ``batch_dims`` (leading dims shared by ``x`` and ``indices``)."""
    return _gather(x, indices, axis, batch_dims)


@register("gather", "iOS17")
def gather_iOS17(x, indices, *, axis=0, batch_dims=0, validate_indices=False):
    """iOS17 adds ``validate_indices``; negative indices are still wrapped."""
    ax = _norm_axis(axis, jnp.ndim(x), "gather")
    _validate(indices, jnp.shape(x)[ax], validate_indices, "gather")
    return _gather(x, indices, axis, batch_dims)


@register("gather_along_axis")
def gather_along_axis(x, indices, *, axis=0):
    """``np.take_along_axis``: output has the shape of ``indices``."""
    x = jnp.asarray(x)
    axis = _norm_axis(axis, x.ndim, "gather_along_axis")
    if jnp.ndim(indices) != x.ndim:
        raise OpError(f"gather_along_axis: indices must have the rank of x ({x.ndim}); "
                      f"found shape {jnp.shape(indices)}")
    return jnp.take_along_axis(x, _wrap(indices, x.shape[axis]), axis=axis, mode="clip")


@register("gather_along_axis", "iOS17")
def gather_along_axis_iOS17(x, indices, *, axis=0, validate_indices=False):
    """iOS17 adds ``validate_indices``."""
    ax = _norm_axis(axis, jnp.ndim(x), "gather_along_axis")
    _validate(indices, jnp.shape(x)[ax], validate_indices, "gather_along_axis")
    return gather_along_axis(x, indices, axis=axis)


def _gather_nd(x, indices, batch_dims: int):
    x, indices = jnp.asarray(x), jnp.asarray(indices)
    depth = indices.shape[-1]
    if depth + batch_dims > x.ndim or x.shape[:batch_dims] != indices.shape[:batch_dims]:
        raise OpError(f"gather_nd: expected indices.shape[-1] + batch_dims <= rank(x) and matching "
                      f"batch dims; found x {x.shape}, indices {indices.shape}, batch_dims={batch_dims}")

    def take(xb, ib):
        coords = tuple(_wrap(ib[..., i], xb.shape[i]) for i in range(depth))
        return xb.at[coords].get(mode="clip")

    for _ in range(batch_dims):
        take = jax.vmap(take)
    return take(x, indices)


@register("gather_nd")
def gather_nd(x, indices):
    """``tf.gather_nd``: ``indices[..., :]`` address slices of ``x``."""
    return _gather_nd(x, indices, 0)


@register("gather_nd", "iOS16")
def gather_nd_iOS16(x, indices, *, batch_dims=0):
    """iOS16 adds ``batch_dims``."""
    return _gather_nd(x, indices, batch_dims)


@register("gather_nd", "iOS17")
def gather_nd_iOS17(x, indices, *, batch_dims=0, validate_indices=False):
    """iOS17 adds ``validate_indices``."""
    depth = jnp.shape(indices)[-1]
    _validate(indices, jnp.shape(x)[batch_dims:batch_dims + depth], validate_indices, "gather_nd")
    return _gather_nd(x, indices, batch_dims)


# --- scatter ----------------------------------------------------------------------------
def _scatter_into(data, coords, updates, mode: str, op: str):
    """``data`` with ``updates`` combined in at ``coords`` by ``mode``; duplicates accumulate."""
    data = jnp.asarray(data)
    updates = jnp.asarray(updates).astype(data.dtype)
    ref = data.at[coords]
    if mode == "update":
        return ref.set(updates, mode="drop")
    if mode == "add":
        return ref.add(updates, mode="drop")
    if mode == "sub":
        return ref.add(-updates, mode="drop")
    if mode == "mul":
        return ref.multiply(updates, mode="drop")
    if mode == "max":
        return ref.max(updates, mode="drop")
    if mode == "min":
        return ref.min(updates, mode="drop")
    if mode == "div":
        # Divide once by the product of every update landing on an element.
        denom = jnp.ones_like(data).at[coords].multiply(updates, mode="drop")
        return lax.div(data, denom)
    raise OpError(f"{op}: mode must be one of {_MODES}; found {mode!r}")


def _scatter(data, indices, updates, axis: int, mode: str, wrap: bool = True):
    data = jnp.asarray(data)
    axis = _norm_axis(axis, data.ndim, "scatter")
    if jnp.ndim(indices) != 1:
        raise OpError(f"scatter: indices must be 1-D; found shape {jnp.shape(indices)}")
    moved = jnp.moveaxis(data, axis, 0)
    upd = jnp.moveaxis(jnp.asarray(updates), axis, 0)
    idx = _wrap(indices, data.shape[axis], wrap)
    if idx.shape == (1,) and upd.shape == (1,) + moved.shape[1:] and mode in _ONE_ROW:
        out = _scatter_one_row(moved, idx[0], upd.astype(data.dtype), mode)
    else:
        out = _scatter_into(moved, idx, upd, mode, "scatter")
    return jnp.moveaxis(out, 0, axis)


# How each mode combines a row of ``data`` with its update (one index: no duplicates to combine).
_ONE_ROW = {"update": lambda row, u: u, "add": lax.add, "sub": lax.sub, "mul": lax.mul,
            "max": lax.max, "min": lax.min, "div": lax.div}


def _scatter_one_row(data, index, update, mode: str):
    """``scatter`` of one row (``update [1, ...]``) at ``index`` along axis 0, as a
    ``dynamic_update_slice``: XLA updates the buffer in place where its scatter ran a general
    loop (coremltools' torch-GRU loop writes one step's state per iteration this way: the zoo gru
    at batch 1 1.28x ONNX Runtime's time against 1.48x, in-process).  An index out of bounds
    leaves ``data`` as it is, as the scatter drops it: the row at the clamped index is written
    back unchanged."""
    n = data.shape[0]
    at = jnp.clip(index, 0, n - 1)
    row = lax.dynamic_slice_in_dim(data, at, 1, axis=0)
    new = jnp.where((index >= 0) & (index < n), _ONE_ROW[mode](row, update), row)
    return lax.dynamic_update_slice_in_dim(data, new, at, axis=0)


@register("scatter")
def scatter(data, indices, updates, *, axis=0, mode="add"):
    """Combine slices ``updates`` into ``data`` along ``axis`` at 1-D ``indices`` by ``mode``."""
    return _scatter(data, indices, updates, axis, mode)


@register("scatter", "iOS17")
def scatter_iOS17(data, indices, updates, *, axis=0, mode="add", validate_indices=False):
    """iOS17 adds ``validate_indices``; negative indices are out of bounds (dropped)."""
    ax = _norm_axis(axis, jnp.ndim(data), "scatter")
    _validate(indices, jnp.shape(data)[ax], validate_indices, "scatter")
    return _scatter(data, indices, updates, axis, mode, wrap=False)


def _scatter_along_axis(data, indices, updates, axis: int, mode: str, wrap: bool = True):
    data = jnp.asarray(data)
    axis = _norm_axis(axis, data.ndim, "scatter_along_axis")
    shape = jnp.shape(indices)
    if len(shape) != data.ndim:
        raise OpError(f"scatter_along_axis: indices must have the rank of data ({data.ndim}); "
                      f"found shape {shape}")
    coords = tuple(_wrap(indices, data.shape[axis], wrap) if d == axis else
                   lax.broadcasted_iota(jnp.int32, shape, d) for d in range(data.ndim))
    return _scatter_into(data, coords, updates, mode, "scatter_along_axis")


@register("scatter_along_axis")
def scatter_along_axis(data, indices, updates, *, axis=0, mode="add"):
    """The inverse of ``gather_along_axis``: ``updates[p]`` goes to ``data[p with axis -> indices[p]]``."""
    return _scatter_along_axis(data, indices, updates, axis, mode)


@register("scatter_along_axis", "iOS17")
def scatter_along_axis_iOS17(data, indices, updates, *, axis=0, mode="add", validate_indices=False):
    """iOS17 adds ``validate_indices``."""
    ax = _norm_axis(axis, jnp.ndim(data), "scatter_along_axis")
    _validate(indices, jnp.shape(data)[ax], validate_indices, "scatter_along_axis")
    return _scatter_along_axis(data, indices, updates, axis, mode, wrap=False)


def _scatter_nd(data, indices, updates, mode: str, wrap: bool = True):
    data = jnp.asarray(data)
    depth = jnp.shape(indices)[-1]
    if depth > data.ndim:
        raise OpError(f"scatter_nd: indices.shape[-1] must be <= rank(data) {data.ndim}; found {depth}")
    idx = jnp.asarray(indices)
    coords = tuple(_wrap(idx[..., i], data.shape[i], wrap) for i in range(depth))
    return _scatter_into(data, coords, updates, mode, "scatter_nd")


@register("scatter_nd")
def scatter_nd(data, indices, updates, *, mode="add"):
    """Combine ``updates`` into ``data`` at the slices addressed by ``indices[..., :]``."""
    return _scatter_nd(data, indices, updates, mode)


@register("scatter_nd", "iOS17")
def scatter_nd_iOS17(data, indices, updates, *, mode="add", validate_indices=False):
    """iOS17 adds ``validate_indices``."""
    depth = jnp.shape(indices)[-1]
    _validate(indices, jnp.shape(data)[:depth], validate_indices, "scatter_nd")
    return _scatter_nd(data, indices, updates, mode, wrap=False)
