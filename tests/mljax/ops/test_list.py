"""MIL list ops against a Python-list reference, directly and end-to-end through coremltools models
(lists in while_loop bodies on the jitted path and on the op-by-op path)."""
from __future__ import annotations

import coremltools as ct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types

import mljax
from mljax.errors import OpError
from mljax.ops import list as L
from mljax.ops._registry import OpContext
from tests.helpers import assert_close, convert_mil

RNG = np.random.default_rng(0)


class RefList:
    """Reference semantics: a Python list of arrays; writes past the end pad with zeros."""

    def __init__(self, length, shape, dtype):
        self.shape, self.dtype = shape, dtype
        self.items = [np.zeros(shape, dtype) for _ in range(length)]

    def write(self, i, v):
        while len(self.items) <= i:
            self.items.append(np.zeros(self.shape, self.dtype))
        self.items[i] = np.asarray(v, self.dtype)

    def gather(self, idx):
        return np.stack([self.items[i] for i in idx]).reshape((len(idx), *self.shape))


def _make(init_length=1, dynamic_length=True, elem_shape=(2,), dtype="fp32"):
    return L.make_list(init_length=init_length, dynamic_length=dynamic_length,
                       elem_shape=elem_shape, dtype=dtype, ctx=OpContext("make_list", "m", 17))


def _data(shape, dtype):
    if np.dtype(dtype) == np.bool_:
        return RNG.integers(0, 2, shape).astype(bool)
    return (RNG.standard_normal(shape) * 4).astype(dtype)


# --- direct ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,name", [(np.float32, "fp32"), (np.float16, "fp16"),
                                        (np.int32, "int32"), (np.bool_, "bool")])
def test_write_read_scatter_gather(dtype, name):
    ls, ref = _make(3, True, (2, 3), name), RefList(3, (2, 3), dtype)
    assert np.asarray(L.list_read(ls, 1)).dtype == dtype
    for i in (0, 5, 2):
        v = _data((2, 3), dtype)
        ls = L.list_write(ls, np.int32(i), v)
        ref.write(i, v)
    vals = _data((2, 2, 3), dtype)
    ls = L.list_scatter(ls, np.array([7, 1], np.int32), vals)
    ref.write(7, vals[0])
    ref.write(1, vals[1])
    assert int(L.list_length(ls)) == len(ref.items) == 8
    idx = [7, 3, 0, 5, 1]
    assert_close(L.list_gather(ls, np.array(idx, np.int32)), ref.gather(idx), dtype=dtype)
    assert_close(L.list_read(ls, np.int32(5)), ref.items[5], dtype=dtype)


def test_unknown_elem_shape_comes_from_first_write():
    ls = _make(2, True, ("s0", 4))
    assert ls.elem_shape is None
    with pytest.raises(OpError, match="element shape is unknown"):
        L.list_read(ls, 0)
    v = _data((3, 4), np.float32)
    ls = L.list_write(ls, np.int32(1), v)
    assert ls.elem_shape == (3, 4)
    assert_close(L.list_gather(ls, np.array([0, 1], np.int32)), np.stack([np.zeros((3, 4)), v]))
    with pytest.raises(OpError, match="do not match"):
        L.list_write(ls, np.int32(0), np.zeros((2, 4), np.float32))


def test_fixed_length_list_errors_and_length():
    ls = _make(3, False, (2,))
    assert int(L.list_length(ls)) == 3
    with pytest.raises(OpError, match="fixed-length"):
        L.list_write(ls, np.int32(3), np.ones(2, np.float32))
    with pytest.raises(OpError, match="out of range"):
        L.list_read(ls, np.int32(3))
    with pytest.raises(OpError, match="one value row per index"):
        L.list_scatter(ls, np.array([0, 1], np.int32), np.ones((3, 2), np.float32))


def test_traced_index_needs_a_bounded_list():
    v = np.arange(2, dtype=np.float32)

    @jax.jit
    def fixed(i):
        ls = L.list_write(_make(4, False, (2,)), i, v)
        return L.list_gather(ls, np.arange(4, dtype=np.int32)), L.list_length(ls)

    out, n = fixed(np.int32(2))
    assert_close(out, np.stack([np.zeros(2), np.zeros(2), v, np.zeros(2)]))
    assert int(n) == 4
    with pytest.raises(OpError, match="needs the index before execution"):
        jax.jit(lambda i: L.list_write(_make(4, True, (2,)), i, v).buffer)(np.int32(2))


def test_list_is_a_pytree_through_jit():
    ls = L.list_write(_make(2, True, (3,)), np.int32(0), np.ones(3, np.float32))
    out = jax.jit(lambda x: x.replace(buffer=x.buffer * 2))(ls)
    assert isinstance(out, L.TensorList) and out.length == 2 and out.capacity == ls.capacity
    assert_close(out.buffer[0], 2 * np.ones(3))


# --- end to end ---------------------------------------------------------------------------
def _model(prog):
    return mljax.MLModel(convert_mil(prog))


def test_e2e_smoke_out_of_bound_write_and_scatter():
    @mb.program(input_specs=[mb.TensorSpec((2,)), mb.TensorSpec((2,))], opset_version=ct.target.iOS17)
    def prog(a, b):
        ls = mb.make_list(init_length=2, elem_shape=(2,))
        first = mb.list_read(ls=ls, index=0)
        ls = mb.list_write(ls=ls, index=0, value=a)
        ls = mb.list_write(ls=ls, index=4, value=b)
        ls = mb.list_scatter(ls=ls, indices=[2, 1], value=np.array([[-1, -2], [-4, -5]], np.float32))
        return first, mb.list_length(ls=ls), mb.list_gather(ls=ls, indices=[4, 2, 3, 0])

    a, b = _data((2,), np.float32), _data((2,), np.float32)
    model = _model(prog)
    first, n, got = model.predict({"a": a, "b": b}).values()
    ref = RefList(2, (2,), np.float32)
    for i, v in ((0, a), (4, b), (2, [-1, -2]), (1, [-4, -5])):
        ref.write(i, v)
    assert_close(first, np.zeros(2))
    assert int(n) == len(ref.items)
    assert_close(got, ref.gather([4, 2, 3, 0]))
    assert not model._eager


def _append_loop(trips, update, length_index=False, init_length=1, dynamic=True, elem_shape=(3,)):
    """while i < trips: ls[i] = update * i  (or ls[len(ls)] = ..., as torch's append)."""
    def cond(i, ls):
        return mb.less(x=mb.cast(x=i, dtype="fp32"), y=trips)

    def body(i, ls):
        index = mb.list_length(ls=ls) if length_index else i
        value = mb.mul(x=update, y=mb.cast(x=i, dtype="fp32"))
        return mb.add(x=i, y=1), mb.list_write(ls=ls, index=index, value=value)

    ls = mb.make_list(init_length=init_length, elem_shape=elem_shape, dynamic_length=dynamic)
    _, out = mb.while_loop(_cond=cond, _body=body, loop_vars=(0, ls))
    return out


def _stack(ls):
    return mb.list_gather(ls=ls, indices=mb.range_1d(start=0, end=mb.list_length(ls=ls), step=1))


def test_e2e_while_append_data_dependent_trip_count_runs_op_by_op():
    @mb.program(input_specs=[mb.TensorSpec((1,)), mb.TensorSpec((3,))], opset_version=ct.target.iOS17)
    def prog(trips, update):
        return _stack(_append_loop(trips, update))

    model = _model(prog)
    update = _data((3,), np.float32)
    for trips in (3, 6, 1):
        got = model.predict({"trips": np.array([trips], np.float32), "update": update})
        expected = np.stack([update * i for i in range(trips)])
        assert_close(next(iter(got.values())), expected)
    assert model._eager


@pytest.mark.parametrize("length_index,elem_shape", [(False, (3,)), (True, (3,)), (False, ("s0",))])
def test_e2e_while_append_static_trip_count_stays_jitted(length_index, elem_shape):
    @mb.program(input_specs=[mb.TensorSpec((3,))], opset_version=ct.target.iOS17)
    def prog(update):
        trips = mb.const(val=np.array([5], np.float32))
        ls = _append_loop(trips, update, length_index=length_index, init_length=0,
                          elem_shape=elem_shape)
        return _stack(ls), mb.list_read(ls=ls, index=2)

    model = _model(prog)
    update = _data((3,), np.float32)
    stacked, third = model.predict({"update": update}).values()
    expected = np.stack([update * i for i in range(5)])
    assert_close(stacked, expected)
    assert_close(third, expected[2])
    assert not model._eager


@pytest.mark.parametrize("elem_shape", [(3,), ("s0",)])
def test_e2e_fixed_length_list_in_data_dependent_loop_stays_jitted(elem_shape):
    @mb.program(input_specs=[mb.TensorSpec((1,)), mb.TensorSpec((3,))], opset_version=ct.target.iOS17)
    def prog(trips, update):
        ls = _append_loop(trips, update, init_length=6, dynamic=False, elem_shape=elem_shape)
        return mb.list_gather(ls=ls, indices=np.arange(6, dtype=np.int32)), mb.list_length(ls=ls)

    model = _model(prog)
    update = _data((3,), np.float32)
    for trips in (2, 6):
        got, n = model.predict({"trips": np.array([trips], np.float32), "update": update}).values()
        expected = np.stack([update * i if i < trips else np.zeros(3) for i in range(6)])
        assert_close(got, expected)
        assert int(n) == 6
    assert not model._eager


def test_e2e_unknown_elem_shape_and_traced_gather_indices():
    @mb.program(input_specs=[mb.TensorSpec((4, 2)), mb.TensorSpec((3,), dtype=types.int32)],
                opset_version=ct.target.iOS17)
    def prog(x, idx):
        ls = mb.make_list(init_length=4, elem_shape=("s_cols",), dynamic_length=False)
        ls = mb.list_scatter(ls=ls, indices=np.array([3, 0, 1, 2], np.int32), value=x)
        return mb.list_gather(ls=ls, indices=idx), mb.list_read(ls=ls, index=3)

    x = _data((4, 2), np.float32)
    idx = np.array([2, 0, 3], np.int32)
    model = _model(prog)
    got, last = model.predict({"x": x, "idx": idx}).values()
    stored = x[[1, 2, 3, 0]]   # ls[3] = x[0], ls[0] = x[1], ls[1] = x[2], ls[2] = x[3]
    assert_close(got, stored[idx])
    assert_close(last, stored[3])
    assert not model._eager


def test_e2e_cond_branches_return_lists_of_different_lengths():
    @mb.program(input_specs=[mb.TensorSpec((1,)), mb.TensorSpec((2,))], opset_version=ct.target.iOS17)
    def prog(p, v):
        ls = mb.make_list(init_length=1, elem_shape=(2,))
        ls = mb.list_write(ls=ls, index=0, value=v)

        def longer():
            return mb.list_write(ls=ls, index=2, value=mb.mul(x=v, y=3.0))

        def same():
            return mb.list_write(ls=ls, index=0, value=mb.mul(x=v, y=-1.0))

        out = mb.cond(pred=mb.greater(x=p, y=0.0), _true_fn=longer, _false_fn=same)
        return mb.list_read(ls=out, index=0), mb.list_length(ls=out)

    v = _data((2,), np.float32)
    model = _model(prog)
    first, n = model.predict({"p": np.array([1.0], np.float32), "v": v}).values()
    assert_close(first, v)
    assert int(n) == 3
    first, n = model.predict({"p": np.array([-1.0], np.float32), "v": v}).values()
    assert_close(first, -v)
    assert int(n) == 1
