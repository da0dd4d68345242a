"""scatter_gather ops against NumPy loop references, plus end-to-end through coremltools models."""
from __future__ import annotations


import numpy as np
import pytest

from mljax.errors import OpError, PredictionError
from mljax.ops import scatter_gather as sg
from mljax.ops._registry import lookup
from tests.helpers import assert_close

RNG = np.random.default_rng(0)
DTYPES = [np.float32, np.float16, np.int32]


def _data(shape, dtype):
    if np.dtype(dtype).kind == "i":
        return RNG.integers(-20, 20, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


def _indices(shape, size, negative=True):
    low = -size if negative else 0
    return RNG.integers(low, size, shape).astype(np.int32)


# --- gather -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis,ishape", [(0, ()), (1, (3,)), (-1, (2, 4)), (0, (2, 4))])
def test_gather(dtype, axis, ishape):
    x = _data((4, 5, 3), dtype)
    idx = _indices(ishape, x.shape[axis])
    expected = np.take(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis)
    for fn in (sg.gather, sg.gather_iOS16, sg.gather_iOS17):
        out = np.asarray(fn(x, idx, axis=axis))
        assert out.shape == x.shape[:axis % 3] + ishape + x.shape[axis % 3 + 1:]
        assert_close(out, expected, dtype=dtype)


def _gather_batch_ref(x, idx, axis, batch_dims):
    """tf.gather semantics, by looping over the batch dims."""
    bshape = x.shape[:batch_dims]
    out = np.empty(bshape + x.shape[batch_dims:axis] + idx.shape[batch_dims:] + x.shape[axis + 1:],
                   x.dtype)
    for b in np.ndindex(*bshape):
        out[b] = np.take(x[b], idx[b], axis=axis - batch_dims)
    return out


@pytest.mark.parametrize("axis,batch_dims", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_gather_batch_dims(axis, batch_dims):
    x = _data((2, 3, 4, 5), np.float32)
    idx = _indices((2, 3, 4)[:batch_dims] + (2,), x.shape[axis], negative=False)
    out = sg.gather_iOS16(x, idx, axis=axis, batch_dims=batch_dims)
    assert_close(out, _gather_batch_ref(x, idx, axis, batch_dims))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_along_axis(dtype, axis):
    x = _data((3, 4, 5), dtype)
    ishape = list(x.shape)
    ishape[axis] = 6
    idx = _indices(tuple(ishape), x.shape[axis])
    expected = np.take_along_axis(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis)
    assert_close(sg.gather_along_axis(x, idx, axis=axis), expected, dtype=dtype)
    assert_close(sg.gather_along_axis_iOS17(x, idx, axis=axis), expected, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ishape", [(4, 1), (2, 3, 2), (5, 3)])
def test_gather_nd(dtype, ishape):
    x = _data((3, 4, 5), dtype)
    depth = ishape[-1]
    idx = np.stack([_indices(ishape[:-1], x.shape[d]) for d in range(depth)], axis=-1)
    expected = np.empty(ishape[:-1] + x.shape[depth:], x.dtype)
    for i in np.ndindex(*ishape[:-1]):
        expected[i] = x[tuple(idx[i])]
    assert_close(sg.gather_nd(x, idx), expected, dtype=dtype)
    assert_close(sg.gather_nd_iOS17(x, idx), expected, dtype=dtype)


def test_gather_nd_batch_dims():
    x = _data((2, 3, 4, 5), np.float32)
    idx = np.stack([_indices((2, 6), 3, False), _indices((2, 6), 4, False)], axis=-1)
    expected = np.stack([np.stack([x[b][tuple(idx[b, i])] for i in range(6)]) for b in range(2)])
    out = sg.gather_nd_iOS16(x, idx, batch_dims=1)
    assert out.shape == (2, 6, 5)
    assert_close(out, expected)


def test_validate_indices_rejects_out_of_bounds():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(PredictionError, match="validate_indices"):
        sg.gather_iOS17(x, np.array([0, 3]), axis=0, validate_indices=True)
    with pytest.raises(PredictionError, match="validate_indices"):
        sg.scatter_nd_iOS17(x, np.array([[0, 4]]), np.ones(1, np.float32), validate_indices=True)
    # in range: no error, same result as without validation
    assert_close(sg.gather_iOS17(x, np.array([0, 2]), validate_indices=True), x[[0, 2]])


def test_validate_indices_at_run_time():
    """Traced indices: a checkify check (the flag comes back with the outputs)."""
    import jax
    from jax.experimental import checkify
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    f = jax.jit(checkify.checkify(lambda x, i: sg.scatter_along_axis_iOS17(
        x, i, x, axis=1, mode="add", validate_indices=True)))
    ok = np.tile(np.array([3, 2, 1, 0], np.int32), (3, 1))
    err, out = f(x, ok)
    assert err.get() is None
    assert_close(out, x + x[:, ::-1])
    err, _ = f(x, np.where(ok == 0, -1, ok))
    assert "found out-of-bound value -1" in err.get()
    g = jax.jit(checkify.checkify(lambda x, i: sg.gather_nd_iOS17(x, i, validate_indices=True)))
    assert g(x, np.array([[2, 3]], np.int32))[0].get() is None
    assert "value 4" in g(x, np.array([[0, 1], [2, 4]], np.int32))[0].get()


def test_has_runtime_checks():
    """Only validate_indices=True on indices computed at run time needs a traced check."""
    from coremltools.converters.mil.mil import Builder as mb, types
    import mljax
    from tests.helpers import convert_mil, target

    def function(indices_from_input: bool, validate: bool):
        specs = [mb.TensorSpec((3, 4), types.fp32), mb.TensorSpec((2,), types.int32)]

        @mb.program(input_specs=specs, opset_version=target("iOS17"))
        def prog(x, i):
            idx = i if indices_from_input else np.array([0, 2], np.int32)
            return mb.add(x=mb.gather(x=x, indices=idx, validate_indices=validate),
                          y=mb.cast(x=mb.reduce_sum(x=i), dtype="fp32"))
        return mljax.MLModel(convert_mil(prog)).stage.lowered.fn

    assert sg.has_runtime_checks(function(True, True))
    assert not sg.has_runtime_checks(function(True, False))
    assert not sg.has_runtime_checks(function(False, True))


def test_opset_lookup():
    assert lookup("gather", "iOS15").fn is sg.gather
    assert lookup("gather", "iOS16").fn is sg.gather_iOS16
    assert lookup("gather", "iOS18").fn is sg.gather_iOS17
    assert "validate_indices" in lookup("scatter", "iOS17").static_inputs
    assert "validate_indices" not in lookup("scatter", "iOS16").static_inputs


# --- scatter ----------------------------------------------------------------------------
_NP_MODES = {
    "update": lambda a, u: u, "add": lambda a, u: a + u, "sub": lambda a, u: a - u,
    "mul": lambda a, u: a * u, "div": lambda a, u: a / u,
    "max": np.maximum, "min": np.minimum,
}


def _updates(shape, dtype, mode):
    u = _data(shape, dtype)
    if mode in ("div", "mul"):
        u = (RNG.uniform(0.5, 2.0, shape) * RNG.choice([-1, 1], shape)).astype(dtype)
    return u


def _apply(out, where, value, mode):
    out[where] = _NP_MODES[mode](out[where], value)


@pytest.mark.parametrize("mode", list(_NP_MODES))
@pytest.mark.parametrize("dtype,axis", [(np.float32, 0), (np.float16, 1), (np.float32, -1)])
def test_scatter(mode, dtype, axis):
    data = _data((4, 5, 3), dtype)
    size = data.shape[axis]
    # duplicates (which accumulate) except for "update", whose order is undefined
    idx = RNG.permutation(size)[:3] if mode == "update" else RNG.integers(0, size, 4)
    idx = np.where(RNG.random(idx.shape) < 0.5, idx - size, idx).astype(np.int32)
    ushape = list(data.shape)
    ushape[axis] = idx.size
    upd = _updates(tuple(ushape), dtype, mode)
    moved = np.moveaxis(upd.astype(np.float64), axis, 0)
    # iOS15/16 count negative indices from the end; iOS17 drops them (out of bounds)
    for fn, wrap in ((sg.scatter, True), (sg.scatter_iOS17, False)):
        expected = np.moveaxis(data.astype(np.float64), axis, 0).copy()
        for i, j in enumerate(idx):
            if wrap or j >= 0:
                _apply(expected, j, moved[i], mode)
        expected = np.moveaxis(expected, 0, axis)
        out = np.asarray(fn(data, idx, upd, axis=axis, mode=mode))
        assert out.dtype == dtype
        assert_close(out, expected, dtype=dtype)


@pytest.mark.parametrize("mode", list(_NP_MODES))
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_scatter_of_one_row(mode, axis):
    """One index (the one-row path, a dynamic_update_slice): in bounds, negative (counted from the
    end before iOS17, dropped from iOS17), and past the end (dropped), against NumPy; the same
    under jit with the index traced, and vmapped over a batch of rows."""
    import jax
    data = _data((4, 5, 3), np.float32)
    size = data.shape[axis]
    ushape = list(data.shape)
    ushape[axis] = 1
    upd = _updates(tuple(ushape), np.float32, mode)
    moved = np.moveaxis(upd.astype(np.float64), axis, 0)
    for j in (0, size - 1, 2, -1, -size, size, size + 3, -size - 1):
        for fn, wrap in ((sg.scatter, True), (sg.scatter_iOS17, False)):
            expected = np.moveaxis(data.astype(np.float64), axis, 0).copy()
            if (wrap and -size <= j < size) or 0 <= j < size:
                _apply(expected, j, moved[0], mode)
            expected = np.moveaxis(expected, 0, axis)
            idx = np.array([j], np.int32)
            assert_close(np.asarray(fn(data, idx, upd, axis=axis, mode=mode)), expected, dtype=np.float32)
            jitted = jax.jit(lambda d, i, u: fn(d, i, u, axis=axis, mode=mode))
            assert_close(np.asarray(jitted(data, idx, upd)), expected, dtype=np.float32)
    # vmapped (a list predict's samples): each sample its own data, update and index
    datas = np.stack([_data((4, 5, 3), np.float32) for _ in range(3)])
    upds = np.stack([_updates(tuple(ushape), np.float32, mode) for _ in range(3)])
    idxs = np.array([[1], [-1], [size]], np.int32)
    got = jax.vmap(lambda d, i, u: sg.scatter(d, i, u, axis=axis, mode=mode))(datas, idxs, upds)
    for k in range(3):
        assert_close(np.asarray(got[k]), np.asarray(sg.scatter(datas[k], idxs[k], upds[k], axis=axis, mode=mode)),
                     dtype=np.float32)


def test_scatter_int32_and_documented_example():
    # the example in the MIL docs: add mode along axis 0
    data = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    out = sg.scatter(data, np.array([1, 0]), np.array([[5, 6, 7], [8, 9, 10]], np.int32), mode="add")
    np.testing.assert_array_equal(out, [[9, 11, 13], [9, 11, 13]])


@pytest.mark.parametrize("mode,axis", [(m, [0, 2, -2][i % 3]) for i, m in enumerate(_NP_MODES)])
def test_scatter_along_axis(mode, axis):
    data = _data((3, 4, 5), np.float32)
    shape = list(data.shape)
    shape[axis] = 2 if mode == "update" else 6
    if mode == "update":  # distinct targets along the axis for each line
        idx = np.argsort(RNG.random(tuple(shape[:axis % 3]) + (data.shape[axis],)
                                    + tuple(shape[axis % 3 + 1:])), axis=axis)
        idx = np.take(idx, np.arange(2), axis=axis).astype(np.int32)
    else:
        idx = _indices(tuple(shape), data.shape[axis])
    upd = _updates(tuple(shape), np.float32, mode)
    ax = axis % 3
    for fn, wrap in ((sg.scatter_along_axis, True), (sg.scatter_along_axis_iOS17, False)):
        expected = data.astype(np.float64).copy()
        for p in np.ndindex(*shape):
            target = list(p)
            target[ax] = idx[p] % data.shape[axis]
            if wrap or idx[p] >= 0:
                _apply(expected, tuple(target), upd[p], mode)
        assert_close(fn(data, idx, upd, axis=axis, mode=mode), expected)


@pytest.mark.parametrize("mode,ishape", [(m, [(3, 1), (2, 2, 2), (4, 3)][i % 3])
                                         for i, m in enumerate(_NP_MODES)])
def test_scatter_nd(mode, ishape):
    data = _data((4, 5, 3), np.float32)
    depth = ishape[-1]
    if mode == "update":  # distinct addresses
        flat = RNG.permutation(int(np.prod(data.shape[:depth])))[: int(np.prod(ishape[:-1]))]
        idx = np.stack(np.unravel_index(flat, data.shape[:depth]), -1).reshape(ishape)
    else:
        idx = np.stack([_indices(ishape[:-1], data.shape[d]) for d in range(depth)], axis=-1)
    idx = idx.astype(np.int32)
    upd = _updates(ishape[:-1] + data.shape[depth:], np.float32, mode)
    for fn, wrap in ((sg.scatter_nd, True), (sg.scatter_nd_iOS17, False)):
        expected = data.astype(np.float64).copy()
        for i in np.ndindex(*ishape[:-1]):
            target = tuple(int(v) % data.shape[d] for d, v in enumerate(idx[i]))
            if wrap or (idx[i] >= 0).all():
                _apply(expected, target, upd[i], mode)
        assert_close(fn(data, idx, upd, mode=mode), expected)


def test_bad_mode():
    with pytest.raises(OpError, match="mode"):
        sg.scatter(np.zeros(3, np.float32), np.array([0]), np.ones(1, np.float32), mode="xor")


def test_jit_traced():
    import jax
    x = _data((4, 5), np.float32)
    idx = np.array([[0, 1], [3, -1]], np.int32)
    f = jax.jit(lambda x, i: sg.gather_nd(x, i))
    assert_close(f(x, idx), np.stack([x[0, 1], x[3, 4]]))


# --- end to end -------------------------------------------------------------------------
def _mljax_available():
    try:
        import mljax
        return hasattr(mljax, "MLModel")
    except Exception:  # pragma: no cover
        return False


e2e = pytest.mark.skipif(not _mljax_available(), reason="mljax.MLModel not available yet")


@e2e
@pytest.mark.parametrize("opset", ["iOS15", "iOS16", "iOS17"])
def test_e2e_gather_and_scatter(opset):
    from coremltools.converters.mil.mil import Builder as mb, types
    from tests.helpers import run_mil, target

    x = _data((4, 5), np.float32)
    upd = _data((2, 5), np.float32)
    gidx = np.array([3, 0, 2], np.int32)
    sidx = np.array([1, 3], np.int32)

    @mb.program(input_specs=[mb.TensorSpec((4, 5), types.fp32), mb.TensorSpec((2, 5), types.fp32)],
                opset_version=target(opset))
    def prog(x, u):
        g = mb.gather(x=x, indices=gidx, axis=0, name="g")
        s = mb.scatter(data=x, indices=sidx, updates=u, axis=0, mode="add", name="s")
        nd = mb.gather_nd(x=x, indices=np.array([[0, 1], [3, 4]], np.int32), name="nd")
        ga = mb.gather_along_axis(x=x, indices=np.array([[1, 0, 4]] * 4, np.int32), axis=1,
                                  name="ga")
        return g, s, nd, ga

    res = run_mil(prog, {"x": x, "u": upd}, opset=opset)
    outs = [res[k] for k in ("g", "s", "nd", "ga")]
    expected_s = x.copy()
    expected_s[sidx] += upd
    assert_close(outs[0], x[gidx])
    assert_close(outs[1], expected_s)
    assert_close(outs[2], [x[0, 1], x[3, 4]])
    assert_close(outs[3], x[:, [1, 0, 4]])
