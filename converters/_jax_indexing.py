"""Indexing: general gathers and scatters, dynamic slices with traced starts, sort, top_k.

XLA's gather addresses whole or unit slices of some operand dims by index vectors; the
forms with unit slices along every indexed dim (``take``, ``take_along_axis``, integer-array
indexing, embedding lookups, nearest-neighbour resizes) become one MIL ``gather``
(one axis) or ``gather_nd`` after moving the indexed dims to the front; batching dims are
indexed by an iota grid.  Scatters of whole windows become ``scatter_nd``.
"""
from __future__ import annotations

import numpy as np

from converters._jax_rules import Unsupported, rule_table, _t, _like, _transpose_to, _reshape_to

__all__ = ["PARTIAL", "RULES"]

RULES, rule = rule_table()

#: primitive -> the forms that are not translated.
PARTIAL = {
    "gather": "unit slices along every indexed dim (take, take_along_axis, integer-array indexing, "
              "embedding lookups); no gathers of longer dynamic slices",
    "sort": "one sort key",
    "approx_top_k": "aggregate_to_topk=True (answered exactly)",
    **{p: "whole windows (`.at[idx]` updates, segment sums); no partial windows or custom combiners"
       for p in ("scatter", "scatter-add", "scatter-mul", "scatter-min", "scatter-max")},
}


def _fill_value(dtype: np.dtype):
    """What JAX's FILL_OR_DROP gathers return out of bounds (NaN, or the dtype's extreme)."""
    if dtype.kind == "f":
        return np.nan
    if dtype.kind == "b":
        return True
    info = np.iinfo(dtype)
    return info.min if dtype.kind == "i" else info.max


def _index_vectors(t, indices, batch_shape, operand_batching, indices_batching):
    """indices [*batch, k] as int32, with one iota column in front per batching dim."""
    idx = t.read(indices)
    if idx.type.dtype.name != "int32":
        idx = t.b.op("cast", _t("int32", idx.type.shape), x=idx, dtype="int32")
    if not operand_batching:
        return idx
    cols = []
    for d in indices_batching:
        ramp = np.arange(batch_shape[d], dtype=np.int32).reshape(
            [-1 if j == d else 1 for j in range(len(batch_shape))])
        cols.append(np.broadcast_to(ramp, batch_shape)[..., None])
    grid = t.b.const(np.concatenate(cols, -1), name="batch_index")
    k = len(cols) + int(idx.type.shape[-1])
    return t.b.op("concat", _t("int32", (*batch_shape, k)), values=[grid, idx], axis=-1, interleave=False)


def _clamp(t, idx, bound: np.ndarray):
    it = idx.type
    return t.b.op("minimum", it, x=t.b.op("maximum", it, x=idx, y=np.int32(0)), y=bound.astype(np.int32))


def _in_bounds(t, idx, bound: np.ndarray, batch_shape):
    """all(0 <= idx <= bound) over the index vector: a bool [*batch, 1]."""
    it = _t("bool", idx.type.shape)
    ok = t.b.op("logical_and", it, x=t.b.op("greater_equal", it, x=idx, y=np.int32(0)),
                y=t.b.op("less_equal", it, x=idx, y=bound.astype(np.int32)))
    as_int = t.b.op("cast", _t("int32", idx.type.shape), x=ok, dtype="int32")
    low = t.b.op("reduce_min", _t("int32", (*batch_shape, 1)), x=as_int, axes=[-1], keep_dims=True)
    return t.b.op("cast", _t("bool", (*batch_shape, 1)), x=low, dtype="bool")


@rule("gather")
def _gather(t, eqn):
    dn, p = eqn.params["dimension_numbers"], eqn.params
    operand, indices = eqn.invars
    shape = tuple(int(d) for d in operand.aval.shape)
    sizes = tuple(int(s) for s in p["slice_sizes"])
    batch_shape = tuple(int(d) for d in indices.aval.shape[:-1])
    index_map = [*dn.operand_batching_dims, *dn.start_index_map]
    for d in index_map:
        if sizes[d] != 1:
            raise Unsupported("gathers of slices longer than 1 along an indexed dim (dynamic-slice gathers)")
    x = t.read(operand)
    rest = [d for d in range(len(shape)) if d not in index_map]
    if any(sizes[d] != shape[d] for d in rest):      # unindexed dims sliced from 0
        end = [sizes[d] if d in rest else shape[d] for d in range(len(shape))]
        x = t.b.op("slice_by_index", _like(x, end), x=x, begin=[0] * len(shape), end=end)
    xs = tuple(x.type.shape)
    idx = _index_vectors(t, indices, batch_shape, dn.operand_batching_dims, dn.start_indices_batching_dims)
    mode = str(p.get("mode"))
    bound = np.array([shape[d] - 1 for d in index_map], np.int32)
    valid = None
    if "FILL" in mode:
        valid = _in_bounds(t, idx, bound, batch_shape)
    if "CLIP" in mode or "FILL" in mode:
        idx = _clamp(t, idx, bound)
    if len(index_map) == 1 and not dn.operand_batching_dims:
        axis = index_map[0]
        flat = _reshape_to(t, idx, batch_shape)
        g = t.b.op("gather", _like(x, [*xs[:axis], *batch_shape, *xs[axis + 1:]]), x=x, indices=flat, axis=axis)
        labels = [("o", d) for d in range(axis)] + [("b", j) for j in range(len(batch_shape))] + \
                 [("o", d) for d in range(axis + 1, len(xs))]
    else:
        xt = _transpose_to(t, x, [*index_map, *rest])
        g = t.b.op("gather_nd", _like(x, [*batch_shape, *(xs[d] for d in rest)]), x=xt, indices=idx)
        labels = [("b", j) for j in range(len(batch_shape))] + [("o", d) for d in rest]
    if valid is not None:
        fill = np.asarray(_fill_value(np.dtype(operand.aval.dtype)), g.type.dtype.numpy)
        v = _reshape_to(t, valid, [batch_shape[lab[1]] if lab[0] == "b" else 1 for lab in labels])
        g = t.b.op("select", g.type, cond=v, a=g, b=fill)
    return [_arrange(t, g, labels, dn, shape, sizes, len(batch_shape), t.out_type(eqn))]


def _arrange(t, g, labels, dn, shape, sizes, nbatch: int, out):
    """Put the gathered dims where XLA's output has them (offset dims at ``offset_dims``)."""
    collapsed = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    offset_operand = [d for d in range(len(shape)) if d not in collapsed]
    target, b = [], 0
    for pos in range(len(out.shape)):
        if pos in dn.offset_dims:
            target.append(("o", offset_operand[list(dn.offset_dims).index(pos)]))
        else:
            target.append(("b", b))
            b += 1
    missing = [lab for lab in target if lab not in labels]       # unit dims indexed but not collapsed
    if missing:
        g = _reshape_to(t, g, [*g.type.shape, *[1] * len(missing)])
        labels = [*labels, *missing]
    return _transpose_to(t, g, [labels.index(lab) for lab in target])


_SCATTER_MODES = {"scatter-add": "add", "scatter_add": "add", "scatter": "update", "scatter-mul": "mul",
                  "scatter_mul": "mul", "scatter-max": "max", "scatter_max": "max", "scatter-min": "min",
                  "scatter_min": "min"}


@rule(*_SCATTER_MODES)
def _scatter(t, eqn):
    """Whole-window scatters (``.at[i].add/set``, segment sums) -> ``scatter_nd``."""
    dn, p = eqn.params["dimension_numbers"], eqn.params
    operand, indices, updates = eqn.invars
    if p.get("update_jaxpr") is not None and eqn.primitive.name not in _SCATTER_MODES:
        raise Unsupported("scatter with a custom combiner")
    shape = tuple(int(d) for d in operand.aval.shape)
    batch_shape = tuple(int(d) for d in indices.aval.shape[:-1])
    index_map = [*dn.operand_batching_dims, *dn.scatter_dims_to_operand_dims]
    rest = [d for d in range(len(shape)) if d not in index_map]
    ushape = tuple(int(d) for d in updates.aval.shape)
    window = list(dn.update_window_dims)
    win_dims = [d for d in range(len(shape)) if d not in dn.inserted_window_dims and d not in dn.operand_batching_dims]
    win_sizes = [ushape[w] for w in window]
    if [shape[d] for d in win_dims if d in rest] != [s for d, s in zip(win_dims, win_sizes) if d in rest] or \
            any(s != 1 for d, s in zip(win_dims, win_sizes) if d not in rest):
        raise Unsupported("scatters of partial windows")
    mode = _SCATTER_MODES[eqn.primitive.name]
    x = _transpose_to(t, t.read(operand), [*index_map, *rest])
    idx = _index_vectors(t, indices, batch_shape, dn.operand_batching_dims, dn.scatter_indices_batching_dims)
    upd = t.read(updates)
    scatter_dims = [d for d in range(len(ushape)) if d not in window]
    upd = _transpose_to(t, upd, [*scatter_dims, *window])
    upd = _reshape_to(t, upd, [*batch_shape, *(shape[d] for d in rest)])   # unit windows of indexed dims dropped
    bound = np.array([shape[d] - 1 for d in index_map], np.int32)
    smode = str(p.get("mode"))
    spare = "FILL" in smode or "CLIP" not in smode and "PROMISE" not in smode
    if "CLIP" in smode:
        idx = _clamp(t, idx, bound)
    elif spare:     # out-of-bounds updates are dropped: send them to a spare row, cut off after
        valid = _in_bounds(t, idx, bound, batch_shape)
        spare_row = np.zeros(len(index_map), np.int32)
        spare_row[0] = shape[index_map[0]]
        idx = t.b.op("select", idx.type, cond=valid, a=idx, b=spare_row)
        xs = list(x.type.shape)
        x = t.b.op("pad", _like(x, [xs[0] + 1, *xs[1:]]), x=x, pad=[0, 1] + [0, 0] * (len(xs) - 1),
                   mode="constant", constant_val=np.asarray(0, x.type.dtype.numpy))
    y = t.b.op("scatter_nd", x.type, data=x, indices=idx, updates=upd, mode=mode)
    if spare:
        ys = list(y.type.shape)
        y = t.b.op("slice_by_index", _like(y, [ys[0] - 1, *ys[1:]]), x=y, begin=[0] * len(ys),
                   end=[ys[0] - 1, *ys[1:]])
    order = [*index_map, *rest]
    return [_transpose_to(t, y, list(np.argsort(order)))]


def _starts(t, eqn, atoms, sizes):
    """The clamped start indices (JAX clamps to [0, dim - size]) as one int32 vector Var."""
    dims = [int(d) for d in eqn.invars[0].aval.shape]
    parts = []
    for a, d, n in zip(atoms, dims, sizes):
        v = t.read(a)
        if v.type.dtype.name != "int32":
            v = t.b.op("cast", _t("int32", ()), x=v, dtype="int32")
        v = t.b.op("minimum", _t("int32", ()), x=t.b.op("maximum", _t("int32", ()), x=v, y=np.int32(0)),
                   y=np.int32(d - n))
        parts.append(t.b.op("reshape", _t("int32", (1,)), x=v, shape=[1]))
    if len(parts) == 1:
        return parts[0]
    return t.b.op("concat", _t("int32", (len(parts),)), values=parts, axis=0, interleave=False)


@rule("dynamic_slice")
def _dynamic_slice(t, eqn):
    x = t.read(eqn.invars[0])
    sizes = [int(s) for s in eqn.params["slice_sizes"]]
    dims = eqn.invars[0].aval.shape
    starts = [t.known(a) for a in eqn.invars[1:]]
    if all(s is not None for s in starts):
        begin = [min(max(int(s), 0), d - n) for s, d, n in zip(starts, dims, sizes)]
        if [int(d) for d in dims] == sizes:
            return [x]
        return [t.b.op("slice_by_index", t.out_type(eqn), x=x, begin=begin,
                       end=[b + n for b, n in zip(begin, sizes)])]
    begin = _starts(t, eqn, eqn.invars[1:], sizes)
    return [t.b.op("slice_by_size", t.out_type(eqn), x=x, begin=begin, size=sizes)]


@rule("dynamic_update_slice")
def _dynamic_update_slice(t, eqn):
    """``scatter_nd`` (mode update) at the clamped start plus the update's index grid."""
    x = t.read(eqn.invars[0])
    upd = t.read(eqn.invars[1])
    ushape = [int(d) for d in eqn.invars[1].aval.shape]
    if 0 in ushape:
        return [x]
    begin = _starts(t, eqn, eqn.invars[2:], ushape)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in ushape), indexing="ij"), -1).astype(np.int32)
    idx = t.b.op("add", _t("int32", grid.shape), x=grid, y=begin)
    return [t.b.op("scatter_nd", x.type, data=x, indices=idx, updates=upd, mode="update")]


def _is_iota(value, axis: int) -> bool:
    if value is None or value.dtype.kind not in "iu":
        return False
    ramp = np.arange(value.shape[axis]).reshape([-1 if i == axis else 1 for i in range(value.ndim)])
    return bool(np.array_equal(value, np.broadcast_to(ramp, value.shape)))


@rule("sort")
def _sort(t, eqn):
    """Sort by the first operand (stable ``argsort``), then gather every operand by the order."""
    p = eqn.params
    if int(p["num_keys"]) != 1:
        raise Unsupported("sorting by more than one key")
    axis = int(p["dimension"])
    key = t.read(eqn.invars[0])
    if key.type.dtype.name == "bool":
        key = t.b.op("cast", _t("int32", key.type.shape), x=key, dtype="int32")
    order = t.b.op("argsort", _t("int32", key.type.shape), x=key, axis=axis, ascending=True)
    outs = []
    for i, a in enumerate(eqn.invars):
        out = t.out_type(eqn, i)
        if _is_iota(t.known(a), axis):
            outs.append(order if out.dtype.name == "int32" else t.b.op("cast", out, x=order, dtype=out.dtype.name))
        else:
            outs.append(t.b.op("gather_along_axis", out, x=t.read(a), indices=order, axis=axis))
    return outs


@rule("top_k")
def _top_k(t, eqn):
    x = t.read(eqn.invars[0])
    k = int(eqn.params["k"])
    axis = int(eqn.params.get("axis", -1) if eqn.params.get("axis") is not None else -1)
    values, indices = t.out_type(eqn, 0), t.out_type(eqn, 1)
    v, i = t.b.op("topk", [values, _t("int32", indices.shape)], x=x, k=k, axis=axis, ascending=False)
    if indices.dtype.name != "int32":
        i = t.b.op("cast", indices, x=i, dtype=indices.dtype.name)
    return [v, i]


@rule("approx_top_k")
def _approx_top_k(t, eqn):
    """The exact top k is a valid answer (recall 1)."""
    p = eqn.params
    if not p.get("aggregate_to_topk", True):
        raise Unsupported("aggregate_to_topk=False (unaggregated partial results)")
    x = t.read(eqn.invars[0])
    values, indices = t.out_type(eqn, 0), t.out_type(eqn, 1)
    v, i = t.b.op("topk", [values, _t("int32", indices.shape)], x=x, k=int(p["k"]),
                  axis=int(p["reduction_dimension"]), ascending=not p.get("is_max_k", True))
    if indices.dtype.name != "int32":
        i = t.b.op("cast", indices, x=i, dtype=indices.dtype.name)
    return [v, i]


@rule("stack")
def _stack_rule(t, eqn):
    values = [t.read(a) for a in eqn.invars]
    if len(values) == 1:
        return [t.b.op("expand_dims", t.out_type(eqn), x=values[0], axes=[int(eqn.params["axis"])])]
    return [t.b.op("stack", t.out_type(eqn), values=values, axis=int(eqn.params["axis"]))]
