"""MIL list ops: make_list, list_length, list_read, list_write, list_gather, list_scatter.

A MIL list value is a :class:`TensorList`: a ``[capacity, *elem_shape]`` buffer plus a length.
The capacity is static (XLA needs static shapes); the length is a Python int while it is known
before execution and an int32 scalar array once it depends on the data.  Writes at indices known
before execution grow the buffer; a write at a data-dependent index needs a capacity known to be
large enough: a fixed-length list (``dynamic_length=False``), or a list that ``while_loop``
presized from the loop's trip count (see :func:`list_while_loop`).  Otherwise the op raises
:class:`~mljax.errors.OpError` and ``MLModel`` runs the model op by op on concrete values,
where every index is known and lists grow as needed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.errors import OpError
from mljax.mil.types import dtype_from_name
from mljax.ops._elementwise_util import jax_dtype_of
from mljax.ops._registry import register

__all__ = ["TensorList", "make_list", "list_length", "list_read", "list_write", "list_gather",
           "list_scatter", "is_list", "list_while_loop", "list_cond"]

# Trip counts the loop simulation follows while some loop values are traced (abstract tracing
# costs Python time per iteration); a fully concrete loop (op-by-op execution) has no limit.
_MAX_SIMULATED_TRIPS = 1024


@jax.tree_util.register_pytree_node_class
class TensorList:
    """A MIL list: ``buffer`` (``[capacity, *elem_shape]`` array, None while the element shape is
    unknown), ``length`` (int when static, else an int32 scalar array) and static facts: element
    ``dtype``, ``capacity``, ``elem_shape`` (None = unknown until the first write), ``dynamic``
    (MIL ``dynamic_length``: writes past the end grow the list) and ``bounded`` (writes at
    data-dependent indices are known to stay within ``capacity``)."""

    __slots__ = ("buffer", "length", "dtype", "capacity", "elem_shape", "dynamic", "bounded")

    def __init__(self, buffer, length, dtype, capacity, elem_shape, dynamic, bounded):
        self.buffer, self.length, self.dtype = buffer, length, np.dtype(dtype)
        self.capacity, self.elem_shape = int(capacity), None if elem_shape is None else tuple(elem_shape)
        self.dynamic, self.bounded = bool(dynamic), bool(bounded)

    def replace(self, **changes) -> "TensorList":
        fields = {k: getattr(self, k) for k in self.__slots__}
        fields.update(changes)
        return TensorList(**fields)

    @property
    def static_length(self) -> bool:
        return isinstance(self.length, int)

    def tree_flatten(self):
        static = self.length if self.static_length else None
        aux = (static, self.dtype, self.capacity, self.elem_shape, self.dynamic, self.bounded)
        return (self.buffer, None if self.static_length else self.length), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        static, dtype, capacity, elem_shape, dynamic, bounded = aux
        buffer, length = children
        return cls(buffer, static if static is not None else length, dtype, capacity, elem_shape,
                   dynamic, bounded)

    def __repr__(self) -> str:
        shape = "?" if self.elem_shape is None else self.elem_shape
        return f"TensorList({self.dtype}, elem_shape={shape}, length={self.length}, capacity={self.capacity})"


def is_list(x) -> bool:
    return isinstance(x, TensorList)


def _concrete(x) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def _zeros(shape, dtype):
    with jax.ensure_compile_time_eval():
        return jnp.zeros(shape, dtype)


# ---------------------------------------------------------------- the ops
def _elem_shape(elem_shape):
    """``make_list``'s elem_shape (ints, or strings for dims known only at run time) -> tuple or None."""
    dims = elem_shape if isinstance(elem_shape, (list, tuple)) else [elem_shape]
    flat = []
    for d in dims:
        if isinstance(d, str):
            return None
        flat.extend(np.asarray(d).reshape(-1).tolist())
    if any(isinstance(d, str) for d in flat):
        return None
    return tuple(int(d) for d in flat)


@register("make_list")
def make_list(*, init_length=1, dynamic_length=True, elem_shape=(), dtype="fp32", ctx):
    """An all-zeros list of ``init_length`` elements; symbolic ``elem_shape`` dims (strings)
    leave the element shape to the first write.  ``init_length`` must be known before execution."""
    length = int(np.asarray(init_length).reshape(()))
    if length < 0:
        raise OpError(f"make_list: init_length must be >= 0, found {length}")
    elem_dtype = jax_dtype_of(ctx.compute_dtype(dtype_from_name(str(dtype))).numpy)
    shape = _elem_shape(elem_shape)
    buffer = None if shape is None else _zeros((length, *shape), elem_dtype)
    return TensorList(buffer, length, elem_dtype, length, shape, dynamic_length, not dynamic_length)


def _as_list(ls, op: str) -> TensorList:
    if not is_list(ls):
        raise OpError(f"{op}: input 'ls' must be a list (from make_list), found {type(ls).__name__}")
    return ls


def _buffer(ls: TensorList, op: str):
    if ls.buffer is None:
        raise OpError(f"{op}: the list's element shape is unknown (no element was written yet)")
    return ls.buffer


def _static_indices(indices, ls: TensorList, op: str) -> np.ndarray:
    idx = np.asarray(indices).reshape(-1).astype(np.int64)
    bad = idx[(idx < 0) | (idx >= ls.length)] if ls.static_length else idx[idx < 0]
    if bad.size:
        raise OpError(f"{op}: index {int(bad[0])} is out of range for a list of length {ls.length}")
    return idx


@register("list_length")
def list_length(ls):
    """The list's length (known before execution unless the list grew at data-dependent indices)."""
    ls = _as_list(ls, "list_length")
    return np.asarray(ls.length, np.int32) if ls.static_length else ls.length


@register("list_read")
def list_read(ls, index):
    """The element at ``index`` (zeros where nothing was written)."""
    ls = _as_list(ls, "list_read")
    buffer = _buffer(ls, "list_read")
    if _concrete(index):
        return buffer[int(_static_indices(index, ls, "list_read")[0])]
    return lax.dynamic_index_in_dim(buffer, jnp.asarray(index).reshape(()), 0, keepdims=False)


@register("list_gather")
def list_gather(ls, indices):
    """The elements at ``indices`` stacked on a new leading axis."""
    ls = _as_list(ls, "list_gather")
    buffer = _buffer(ls, "list_gather")
    if _concrete(indices):
        idx = _static_indices(indices, ls, "list_gather")
        return buffer[idx.reshape(np.shape(indices))]
    return jnp.take(buffer, jnp.asarray(indices), axis=0, mode="clip")


@register("list_write")
def list_write(ls, index, value):
    """``ls`` with ``value`` at ``index``; a dynamic-length list grows past its end."""
    value = jnp.asarray(value)
    return _store(_as_list(ls, "list_write"), index, value[None], "list_write")


@register("list_scatter")
def list_scatter(ls, indices, value):
    """``ls`` with ``value[k]`` at ``indices[k]``; a dynamic-length list grows past its end."""
    value = jnp.asarray(value)
    if value.ndim == 0 or np.size(indices) != value.shape[0]:
        raise OpError(f"list_scatter: expected one value row per index ({np.size(indices)}), "
                      f"found value of shape {value.shape}")
    return _store(_as_list(ls, "list_scatter"), indices, value, "list_scatter")


def _with_elem_shape(ls: TensorList, shape: tuple, op: str) -> TensorList:
    if ls.elem_shape is None:
        return ls.replace(buffer=_zeros((ls.capacity, *shape), ls.dtype), elem_shape=shape)
    if ls.elem_shape != shape:
        raise OpError(f"{op}: value elements of shape {shape} do not match the list's element "
                      f"shape {ls.elem_shape}")
    return ls


def _grow(ls: TensorList, capacity: int) -> TensorList:
    pad = [(0, capacity - ls.capacity)] + [(0, 0)] * len(ls.elem_shape)
    return ls.replace(buffer=jnp.pad(ls.buffer, pad), capacity=capacity)


def _store(ls: TensorList, indices, values, op: str) -> TensorList:
    """Write ``values[k]`` at ``indices[k]``."""
    ls = _with_elem_shape(ls, tuple(values.shape[1:]), op)
    values = values.astype(ls.dtype)
    if _concrete(indices):
        idx = np.asarray(indices).reshape(-1).astype(np.int64)
        if idx.size == 0:
            return ls
        if idx.min() < 0:
            raise OpError(f"{op}: index {int(idx.min())} is negative")
        need = int(idx.max()) + 1
        if need > ls.capacity:
            if not ls.dynamic:
                raise OpError(f"{op}: index {need - 1} is past the end of a fixed-length list "
                              f"of length {ls.capacity}")
            ls = _grow(ls, max(need, 2 * ls.capacity))
        length = max(ls.length, need) if ls.static_length else jnp.maximum(ls.length, need)
        return ls.replace(buffer=ls.buffer.at[idx].set(values), length=length)
    if not ls.bounded:
        raise OpError(f"{op}: writing at an index computed from the model's inputs into a "
                      f"growable list of capacity {ls.capacity} needs the index before execution")
    idx = jnp.asarray(indices).reshape(-1).astype(jnp.int32)
    buffer = ls.buffer.at[idx].set(values, mode="drop")
    if not ls.dynamic:
        return ls.replace(buffer=buffer)
    length = jnp.maximum(jnp.asarray(ls.length, jnp.int32), jnp.max(idx) + 1)
    return ls.replace(buffer=buffer, length=jnp.minimum(length, ls.capacity))


# ---------------------------------------------------------------- lists through control flow
def _struct(x):
    """The abstract value (shapes, dtypes, static list facts) of a pytree of values."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), x)


def _join(a, b, what: str):
    """The abstract value both ``a`` and ``b`` conform to (lists: larger capacity, length traced
    unless both agree statically); OpError when tensors disagree."""
    if is_list(a) or is_list(b):
        if not (is_list(a) and is_list(b)) or a.dtype != b.dtype:
            raise OpError(f"{what}: a list meets a value of another type ({a} vs {b})")
        shape = a.elem_shape if a.elem_shape is not None else b.elem_shape
        if None not in (a.elem_shape, b.elem_shape) and a.elem_shape != b.elem_shape:
            raise OpError(f"{what}: list element shapes differ: {a.elem_shape} vs {b.elem_shape}")
        cap = max(a.capacity, b.capacity)
        static = a.static_length and b.static_length and a.length == b.length
        length = a.length if static else jax.ShapeDtypeStruct((), jnp.int32)
        buffer = None if shape is None else jax.ShapeDtypeStruct((cap, *shape), a.dtype)
        return TensorList(buffer, length, a.dtype, cap, shape, a.dynamic, a.bounded and b.bounded)
    if np.shape(a) != np.shape(b):
        raise OpError(f"{what} changes a value's shape from {np.shape(a)} to {np.shape(b)}; "
                      f"only fixed-shape values are supported")
    return a


def _conform(x, like):
    """``x`` made to have the abstract value ``like`` (pads list buffers, casts dtypes)."""
    if is_list(like):
        if x.elem_shape is None and like.elem_shape is not None:
            x = _with_elem_shape(x, like.elem_shape, "list")
        if like.buffer is not None and like.capacity > x.capacity:
            x = _grow(x, like.capacity)
        length = x.length if like.static_length else jnp.asarray(x.length, jnp.int32)
        return x.replace(length=length, capacity=like.capacity, bounded=like.bounded)
    if _concrete(x):
        with jax.ensure_compile_time_eval():
            return jnp.asarray(x).astype(like.dtype)
    return jnp.asarray(x).astype(like.dtype)


def _conform_all(xs, likes):
    return tuple(_conform(x, like) for x, like in zip(xs, likes))


def _same(a, b) -> bool:
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    return ta == tb and all(np.shape(x) == np.shape(y) for x, y in
                            zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _settle(body_fn, init: tuple, what: str) -> tuple:
    """Loop values that the body maps to values of the same structure (fixed point of joins)."""
    vals = init
    for _ in range(4):
        out = jax.eval_shape(lambda *v: tuple(body_fn(*v)), *vals)
        want = tuple(_join(s, o, what) for s, o in zip(_struct(vals), out))
        if _same(want, _struct(vals)):   # tree structures hold the static list facts
            return vals
        vals = _conform_all(vals, want)
    raise OpError(f"{what}: the loop's list structures do not settle")


def _truth(p) -> bool:
    return bool(np.asarray(p).reshape(-1)[0])


def _simulate(cond_fn, body_fn, init: tuple):
    """Follow the loop on the values known before execution.

    Returns ``("values", final)`` when every value stays concrete (the loop's result),
    ``("shapes", final_lists)`` with each list's final static facts when the trip count is
    known but some values are traced, or None when the trip count depends on traced values.
    """
    leaves, tree = jax.tree_util.tree_flatten(init)
    known = [not isinstance(leaf, jax.core.Tracer) for leaf in leaves]
    found = {}

    def run(*traced):
        it = iter(traced)
        vals = tree.unflatten([leaf if k else next(it) for leaf, k in zip(leaves, known)])
        trips = 0
        while True:
            p = cond_fn(*vals)[0]
            if not _concrete(p):
                return
            if not _truth(p):
                break
            if trips >= _MAX_SIMULATED_TRIPS and not _concrete(vals):
                return
            out = tuple(body_fn(*vals))
            vals = tuple(o if is_list(o) else _conform(o, _struct(v)) for o, v in zip(out, vals))
            trips += 1
        if _concrete(vals):
            found["values"] = vals
        else:
            found["shapes"] = tuple(
                v.replace(buffer=None, length=v.length if v.static_length else None)
                if is_list(v) else None for v in vals)

    try:
        jax.eval_shape(run, *[leaf for leaf, k in zip(leaves, known) if not k])
    except OpError:
        return None
    return next(iter(found.items()), None)


def _presize(v: TensorList, final: TensorList) -> TensorList:
    like = TensorList(jax.ShapeDtypeStruct((final.capacity, *final.elem_shape), v.dtype),
                      jax.ShapeDtypeStruct((), jnp.int32), v.dtype, final.capacity,
                      final.elem_shape, v.dynamic, True)
    return _conform(v, like)


def list_while_loop(cond_fn, body_fn, loop_vars):
    """``while_loop`` over values that include lists.

    Lists whose structure the body keeps (or that settle after a join) run as one
    ``lax.while_loop``.  A list that grows at data-dependent indices is presized to its final
    capacity when the trip count is known before execution (the loop is followed on the known
    values); a fully concrete loop (op-by-op execution) runs in Python.  Otherwise OpError.
    """
    init = tuple(v if is_list(v) else _conform(v, _struct(v)) for v in loop_vars)
    finals = None
    try:
        vals = _settle(body_fn, init, "while_loop body")
    except OpError:
        sim = _simulate(cond_fn, body_fn, init)
        if sim is None:
            raise OpError("while_loop: a list grows at indices computed from the model's inputs "
                          "for a number of iterations not known before execution") from None
        kind, final = sim
        if kind == "values":
            return final
        finals = final
        presized = tuple(_presize(v, f) if is_list(v) and f.elem_shape is not None else v
                         for v, f in zip(init, finals))
        vals = _settle(body_fn, presized, "while_loop body")
    like = _struct(vals)

    def body(vs):
        return _conform_all(tuple(body_fn(*vs)), like)

    def check(vs):
        return jnp.asarray(cond_fn(*vs)[0]).reshape(())

    out = lax.while_loop(check, body, vals)
    restored = []
    for i, (o, v) in enumerate(zip(out, init)):
        if is_list(o):
            o = o.replace(bounded=v.bounded)
            if finals is not None and finals[i].static_length:
                o = o.replace(length=finals[i].length)
        restored.append(o)
    return tuple(restored)


def list_cond(pred, true_fn, false_fn):
    """``lax.cond`` whose branches return lists of possibly different capacities or lengths."""
    outs = [jax.eval_shape(lambda: tuple(f())) for f in (true_fn, false_fn)]
    like = tuple(_join(a, b, "cond branches") for a, b in zip(*outs))
    return lax.cond(pred, lambda: _conform_all(tuple(true_fn()), like),
                    lambda: _conform_all(tuple(false_fn()), like))
