"""tensor_transformation ops against independent NumPy / torch references."""
from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import torch

from mljax.errors import OpError
from mljax.mil.types import DTYPES, TensorType
from mljax.ops import _registry
from mljax.ops._registry import OpContext
from mljax.ops import tensor_transformation as T

RNG = np.random.default_rng(1)
ALL_DTYPES = [np.float32, np.float16, np.int32, np.bool_]
FLOATS = [np.float32, np.float16]


def rand(shape, dtype=np.float32):
    if dtype == np.bool_:
        return RNG.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        return RNG.integers(-100, 100, size=shape).astype(dtype)
    return RNG.uniform(-5, 5, size=shape).astype(dtype)


def same(actual, expected):
    """Data movement ops must be exact, with the input dtype kept."""
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    np.testing.assert_array_equal(actual, expected)


def test_registered_opsets():
    reg = _registry.registry()
    expect = {"depth_to_space": [15], "space_to_depth": [15], "space_to_batch": [15],
              "batch_to_space": [15], "pixel_shuffle": [15], "pixel_unshuffle": [16],
              "expand_dims": [15], "squeeze": [15], "reshape": [15, 17], "reshape_like": [16],
              "reverse": [15], "reverse_sequence": [15], "slice_by_index": [15],
              "slice_by_size": [15], "slice_update": [18], "transpose": [15],
              "sliding_windows": [15]}
    for op, versions in expect.items():
        assert sorted(reg[op]) == versions, op


# ---------------------------------------------------------------- block rearrangements
def _ref_depth_to_space(x, b):
    n, c, h, w = x.shape
    co = c // (b * b)
    out = np.empty((n, co, h * b, w * b), x.dtype)
    for cc, i, j in itertools.product(range(co), range(b), range(b)):
        out[:, cc, i::b, j::b] = x[:, (i * b + j) * co + cc]
    return out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,b", [((1, 4, 1, 1), 2), ((2, 8, 3, 2), 2), ((1, 18, 2, 3), 3)])
def test_depth_to_space_and_back(dtype, shape, b):
    x = rand(shape, dtype)
    y = T.depth_to_space(x, block_size=b)
    same(y, _ref_depth_to_space(x, b))
    same(T.space_to_depth(np.asarray(y), block_size=b), x)


def test_depth_to_space_coremltools_example():
    x = np.array([[[[9.0]], [[5.0]], [[1.0]], [[3.0]]]], np.float32)
    same(T.depth_to_space(x, block_size=2), np.array([[[[9.0, 5.0], [1.0, 3.0]]]], np.float32))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,f", [((1, 4, 2, 3), 2), ((2, 18, 1, 2), 3)])
def test_pixel_shuffle_unshuffle(dtype, shape, f):
    x = rand(shape, dtype)
    y = T.pixel_shuffle(x, upscale_factor=f)
    ref = torch.nn.functional.pixel_shuffle(torch.from_numpy(x.astype(np.float32)), f)
    same(y, ref.numpy().astype(dtype))
    back = T.pixel_unshuffle(np.asarray(y), downscale_factor=f)
    ref_back = torch.nn.functional.pixel_unshuffle(ref, f)
    same(back, ref_back.numpy().astype(dtype))
    same(np.asarray(back), x)


def _ref_space_to_batch(x, bs, pads):
    x = np.pad(x, [(0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])])
    n, c, h, w = x.shape
    out = np.empty((n * bs[0] * bs[1], c, h // bs[0], w // bs[1]), x.dtype)
    for i, j, k in itertools.product(range(bs[0]), range(bs[1]), range(n)):
        out[(i * bs[1] + j) * n + k] = x[k, :, i::bs[0], j::bs[1]]
    return out


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,bs,pads", [((2, 1, 2, 4), [2, 2], [[0, 0], [2, 0]]),
                                           ((1, 3, 4, 3), [2, 3], [[1, 1], [0, 0]]),
                                           ((3, 2, 3, 5), [1, 2], [[0, 0], [1, 0]])])
def test_space_to_batch_and_back(dtype, shape, bs, pads):
    x = rand(shape, dtype)
    y = T.space_to_batch(x, block_shape=np.array(bs), paddings=np.array(pads))
    same(y, _ref_space_to_batch(x, bs, pads))
    same(T.batch_to_space(np.asarray(y), block_shape=np.array(bs), crops=np.array(pads)), x)


def test_space_to_batch_coremltools_example():
    x = np.arange(1, 17, dtype=np.float32).reshape(2, 1, 2, 4)
    y = T.space_to_batch(x, block_shape=[2, 2], paddings=[[0, 0], [2, 0]])
    expected = np.array([[0, 1, 3], [0, 9, 11], [0, 2, 4], [0, 10, 12], [0, 5, 7], [0, 13, 15],
                         [0, 6, 8], [0, 14, 16]], np.float32).reshape(8, 1, 1, 3)
    same(y, expected)


def test_rank4_errors():
    with pytest.raises(OpError, match="rank-4"):
        T.depth_to_space(np.zeros((4, 1, 1), np.float32), block_size=2)
    with pytest.raises(OpError, match="divisible"):
        T.pixel_shuffle(np.zeros((1, 3, 1, 1), np.float32), upscale_factor=2)


# ---------------------------------------------------------------- rank changes
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape,axes", [((2, 3), [0]), ((2, 3), [-1]), ((2, 3), [0, 3]),
                                        ((4,), [-1, -3]), ((), [0]), ((2, 3), [1, -2])])
def test_expand_dims(dtype, shape, axes):
    x = rand(shape, dtype)
    same(T.expand_dims(x, axes=np.array(axes)), np.expand_dims(x, tuple(axes)))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape,axes", [((1, 3, 1, 2), None), ((1, 3, 1, 2), [0]),
                                        ((1, 3, 1, 2), [-2, 0]), ((2, 3, 4), [0, 1]),
                                        ((1,), None), ((1, 1), [1])])
def test_squeeze(dtype, shape, axes):
    x = rand(shape, dtype)
    t = torch.from_numpy(np.asarray(x, np.float32))
    ref = t.squeeze() if axes is None else t.squeeze(tuple(axes))  # torch ignores non-1 dims
    same(T.squeeze(x, axes=None if axes is None else np.array(axes)), ref.numpy().astype(dtype))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape,target,expected", [
    ((2, 3, 4), [6, 4], (6, 4)), ((2, 3, 4), [-1, 2], (12, 2)), ((2, 3, 4), [0, -1, 2], (2, 6, 2)),
    ((2, 3, 4), [0, 0, 0], (2, 3, 4)), ((2, 3, 4), [24], (24,)), ((1, 1), [], ()),
])
def test_reshape_ios15(dtype, shape, target, expected):
    x = rand(shape, dtype)
    same(T.reshape(x, shape=np.array(target, np.int32)), x.reshape(expected))


@pytest.mark.parametrize("shape,target,expected", [
    ((2, 50), [1, 0, -1, 0], (1, 1, 2, 50)),  # the iOS17 docstring example
    ((2, 3, 4), [0, -1], (3, 8)),  # right-aligned: the 0 copies dim 1 (3), not dim 0
    ((2, 3, 4), [0, 0, 0], (2, 3, 4)),
    ((2, 3, 4), [-1, 0, 0], (2, 3, 4)),
    ((6,), [0, 0, 2, 3], (1, 1, 2, 3)),  # zeros out of range (from the right) become 1
])
def test_reshape_ios17(shape, target, expected):
    x = rand(shape)
    same(T.reshape_ios17(x, shape=np.array(target)), x.reshape(expected))


def test_reshape_errors():
    x = rand((2, 50))
    with pytest.raises(OpError, match="rank"):
        T.reshape(x, shape=np.array([1, 0, -1, 0]))  # iOS15: 0 needs len(shape) == rank
    with pytest.raises(OpError, match="one -1"):
        T.reshape(x, shape=[-1, -1])
    with pytest.raises(OpError, match="element count"):
        T.reshape(x, shape=[3, 7])


def test_reshape_like_docstring_example():
    refs = (rand((2, 3, 4)), rand((1, 5, 6), np.int32))
    x = rand((180,), np.float16)
    out = T.reshape_like(x, *refs, begins=[0, 1], ends=[2, 0], end_masks=[False, True])
    same(out, x.reshape(2, 3, 5, 6))
    x = rand((3, 20), np.int32)
    out = T.reshape_like(x, *refs, begins=[1, 0], ends=[0, 2], end_masks=[True, False])
    same(out, x.reshape(3, 4, 1, 5))
    with pytest.raises(OpError, match="element count"):
        T.reshape_like(x, refs[0], begins=[0], ends=[1], end_masks=[True])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("perm", [[0, 1, 2], [2, 0, 1], [1, 2, 0], [-1, 0, -2]])
def test_transpose(dtype, perm):
    x = rand((2, 3, 4), dtype)
    same(T.transpose(x, perm=np.array(perm)), np.transpose(x, perm))


def test_transpose_bad_perm():
    with pytest.raises(OpError, match="permutation"):
        T.transpose(rand((2, 3)), perm=[0, 0])


# ---------------------------------------------------------------- reversal
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("axes", [None, [0], [-1], [0, 2], []])
def test_reverse(dtype, axes):
    x = rand((2, 3, 4), dtype)
    ref = np.flip(x) if axes is None else np.flip(x, tuple(axes))
    same(T.reverse(x, axes=None if axes is None else np.array(axes, np.int32)), ref)


def _ref_reverse_sequence(x, lengths, seq_axis, batch_axis):
    out = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        n, i = lengths[idx[batch_axis]], idx[seq_axis]
        src = list(idx)
        src[seq_axis] = n - 1 - i if i < n else i
        out[idx] = x[tuple(src)]
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("seq_axis,batch_axis", [(1, 0), (0, 1), (2, 0), (-1, 1)])
def test_reverse_sequence(dtype, seq_axis, batch_axis):
    x = rand((3, 4, 5), dtype)
    nb = x.shape[batch_axis]
    lengths = RNG.integers(0, x.shape[seq_axis] + 1, size=nb).astype(np.int32)
    ref = _ref_reverse_sequence(x, lengths, seq_axis % 3, batch_axis % 3)
    same(T.reverse_sequence(x, lengths, seq_axis=seq_axis, batch_axis=batch_axis), ref)


def test_reverse_sequence_traced_lengths():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = jax.jit(lambda a, l: T.reverse_sequence(a, l, seq_axis=1, batch_axis=0))(
        x, np.array([4, 0, 2], np.int32))
    np.testing.assert_array_equal(np.asarray(out), [[3, 2, 1, 0], [4, 5, 6, 7], [9, 8, 10, 11]])


# ---------------------------------------------------------------- slicing
X24 = np.arange(24).reshape(2, 3, 4)

# (kwargs, the NumPy expression that must give the same result) -- from the MIL docs / tests.
SLICE_CASES = [
    (dict(begin=[1, 1, 1], end=[2, 2, 2]), lambda a: a[1:2, 1:2, 1:2]),
    (dict(begin=[1, 1, 1], end=[2, 3, 4], stride=[1, 1, 2]), lambda a: a[1:2, 1:3, 1:4:2]),
    (dict(begin=[-3, -3, -3], end=[-1, -1, -1]), lambda a: a[-3:-1, -3:-1, -3:-1]),
    (dict(begin=[0, 0, -3], end=[-1, -2, -2]), lambda a: a[0:-1, 0:-2, -3:-2]),
    (dict(begin=[-1, -1, -1], end=[0, 1, -3], stride=[-2, -1, -3]),
     lambda a: a[-1:0:-2, -1:1:-1, -1:-3:-3]),
    (dict(begin=[1, 1, 1], end=[2, 3, 4], stride=[1, 1, 2], begin_mask=[True, False, True]),
     lambda a: a[:2, 1:3, :4:2]),
    (dict(begin=[1, 1, 1], end=[2, 3, 4], stride=[1, 1, 2], begin_mask=[True, False, True],
          end_mask=[True, True, False]), lambda a: a[:, 1:, :4:2]),
    (dict(begin=[1, 1, 1], end=[2, 3, 3], stride=[1, 1, 2], begin_mask=[False, False, True],
          end_mask=[True, False, False], squeeze_mask=[False, True, False]),
     lambda a: a[1::1, 1, :3:2]),
    (dict(begin=[0, 0, 0], end=[0, 0, 0], begin_mask=[True] * 3, end_mask=[True] * 3),
     lambda a: a[:, :, :]),
    (dict(begin=[1, 1, 1], end=[2, 2, 0], squeeze_mask=[False, False, True]),
     lambda a: a[1:2, 1:2, 1]),
    (dict(begin=[1, 0, 0], end=[2, 0, 0], begin_mask=[False, True, True],
          end_mask=[False, True, True]), lambda a: a[1:2, ...]),
    (dict(begin=[-1, -1, -1], end=[0, 0, 0], squeeze_mask=[True] * 3), lambda a: a[-1, -1, -1]),
    (dict(begin=[0, 0, 0], end=[0, 0, 0], stride=[-1, -1, -2], begin_mask=[True] * 3,
          end_mask=[True] * 3), lambda a: a[::-1, ::-1, ::-2]),
    (dict(begin=[5, -10, 2], end=[9, 10, 2]), lambda a: a[5:9, -10:10, 2:2]),  # clamps, empty
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", range(len(SLICE_CASES)))
def test_slice_by_index(dtype, case):
    kwargs, expr = SLICE_CASES[case]
    x = X24.astype(dtype) if dtype != np.bool_ else X24 % 3 == 0
    kwargs = {k: np.array(v) for k, v in kwargs.items()}
    same(T.slice_by_index(x, **kwargs), np.asarray(expr(x)))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", range(len(SLICE_CASES)))
def test_slice_update(dtype, case):
    kwargs, expr = SLICE_CASES[case]
    x = X24.astype(dtype) if dtype != np.bool_ else X24 % 3 == 0
    region = np.asarray(expr(x))
    update = rand(region.shape, dtype) if region.ndim else rand((1,), dtype)
    ref = x.copy()
    view = expr(ref)
    if isinstance(view, np.ndarray) and view.base is not None:
        view[...] = update.reshape(view.shape)
    else:  # a scalar index: write through an equivalent tuple index
        ref[-1, -1, -1] = update.reshape(())
    out = T.slice_update(x, update, **{k: np.array(v) for k, v in kwargs.items()})
    same(out, ref)


def test_slice_update_shape_mismatch():
    with pytest.raises(OpError, match="does not fit"):
        T.slice_update(X24, np.zeros((3,), X24.dtype), begin=[0, 0, 0], end=[1, 1, 2])


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("begin,size", [([0, 0, 0], [1, 2, 3]), ([1, -2, 1], [-1, 2, -1]),
                                        ([0, 1, 0], [-1, -1, -1]), ([1, 2, 3], [1, 1, 1])])
def test_slice_by_size(dtype, begin, size):
    x = X24.astype(dtype)
    sl = tuple(slice(b if b >= 0 else b + d, None if s == -1 else (b if b >= 0 else b + d) + s)
               for b, s, d in zip(begin, size, x.shape))
    same(T.slice_by_size(x, begin=np.array(begin), size=np.array(size)), x[sl])


def test_slice_errors():
    with pytest.raises(OpError, match="out of range"):
        T.slice_by_size(X24, begin=[0, 0, 0], size=[3, 1, 1])
    with pytest.raises(OpError, match="rank"):
        T.slice_by_index(X24, begin=[0, 0], end=[1, 1])
    with pytest.raises(OpError, match="must be static"):  # traced begin, output shape unknown
        jax.jit(lambda b: T.slice_by_index(X24, begin=b, end=[1, 1, 1]))(np.zeros(3, np.int32))
    with pytest.raises(OpError, match="explicit sizes"):
        jax.jit(lambda b: T.slice_by_size(X24, b, size=[1, -1, 1]))(np.zeros(3, np.int32))


def _ctx_with_output(shape, dtype="fp32"):
    return OpContext("slice_by_index", "s", 17,
                     output_types=(TensorType(DTYPES[dtype], tuple(shape)),))


@pytest.mark.parametrize("case", range(len(SLICE_CASES)))
def test_slice_by_index_traced_begin(case):
    """begin/end computed from model inputs: the declared (static) output shape gives the size."""
    kwargs, expr = SLICE_CASES[case]
    x = X24.astype(np.float32)
    expected = np.asarray(expr(x))
    begin, end = (np.array(kwargs[k], np.int32) for k in ("begin", "end"))
    rest = {k: np.array(v) for k, v in kwargs.items() if k not in ("begin", "end")}
    ctx = _ctx_with_output(expected.shape)
    out = jax.jit(lambda b, e: T.slice_by_index(x, b, e, ctx=ctx, **rest))(begin, end)
    same(out, expected)


@pytest.mark.parametrize("case", range(len(SLICE_CASES)))
def test_slice_update_traced_begin(case):
    kwargs, expr = SLICE_CASES[case]
    x = X24.astype(np.float32)
    region = np.asarray(expr(x))
    update = rand(region.shape, np.float32)
    begin, end = (np.array(kwargs[k], np.int32) for k in ("begin", "end"))
    rest = {k: np.array(v) for k, v in kwargs.items() if k not in ("begin", "end")}
    expected = T.slice_update(x, update, begin, end, **rest)  # the static path, tested above
    out = jax.jit(lambda b, e: T.slice_update(x, update, b, e, **rest))(begin, end)
    same(out, np.asarray(expected))


def test_slice_by_size_traced_begin():
    x = X24.astype(np.int32)
    out = jax.jit(lambda b: T.slice_by_size(x, b, size=[1, 2, 3]))(np.array([1, -2, 1], np.int32))
    same(out, x[1:2, 1:3, 1:4])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32])
@pytest.mark.parametrize("axis,size,stride", [(0, 2, 1), (1, 3, 2), (-1, 1, 3), (2, 5, 1)])
def test_sliding_windows(dtype, axis, size, stride):
    x = rand((4, 6, 5), dtype)
    view = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)
    ax = axis % 3
    view = np.take(view, np.arange(0, view.shape[ax], stride), axis=ax)
    ref = np.moveaxis(view, -1, ax + 1)
    same(T.sliding_windows(x, axis=axis, size=size, stride=stride), ref)


# ---------------------------------------------------------------- end to end (coremltools models)
def _mb():
    helpers = pytest.importorskip("helpers")
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    return helpers, ct, mb, types


def test_e2e_tensor_transformation_ios17():
    helpers, ct, mb, types = _mb()
    x4, v = rand((1, 8, 4, 6)), rand((3, 4, 5))
    lengths = np.array([5, 0, 3], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x4.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=v.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=lengths.shape, dtype=types.int32)],
                opset_version=ct.target.iOS17)
    def prog(x4, v, lengths):
        r = mb.reshape(x=v, shape=[0, -1], name="reshape")
        s2b = mb.space_to_batch(x=x4, block_shape=[2, 2], paddings=[[0, 0], [1, 1]], name="s2b")
        return (
            r,
            mb.reshape_like(x=v, ref_tensors=(r,), begins=(0,), ends=(2,), end_masks=(False,),
                            name="reshape_like"),
            mb.expand_dims(x=v, axes=[0, -1], name="expand_dims"),
            mb.squeeze(x=x4, axes=[0], name="squeeze"),
            mb.transpose(x=v, perm=[2, 0, 1], name="transpose"),
            mb.reverse(x=v, axes=[0, 2], name="reverse"),
            mb.reverse_sequence(x=v, lengths=lengths, seq_axis=2, batch_axis=0, name="revseq"),
            mb.slice_by_index(x=v, begin=[2, 0, -1], end=[0, 3, 0], stride=[-1, 2, -2],
                              end_mask=[True, False, True], name="slice_by_index"),
            mb.slice_by_size(x=v, begin=[1, 0, 2], size=[-1, 2, 3], name="slice_by_size"),
            mb.sliding_windows(x=v, axis=2, size=3, stride=2, name="sliding"),
            mb.depth_to_space(x=x4, block_size=2, name="d2s"),
            mb.space_to_depth(x=x4, block_size=2, name="s2d"),
            mb.pixel_shuffle(x=x4, upscale_factor=2, name="pshuf"),
            mb.pixel_unshuffle(x=x4, downscale_factor=np.uint32(2), name="punshuf"),
            s2b,
            mb.batch_to_space(x=s2b, block_shape=[2, 2], crops=[[0, 0], [1, 1]], name="b2s"),
        )

    got = helpers.run_mil(prog, {"x4": x4, "v": v, "lengths": lengths})
    tx = torch.from_numpy(x4)
    np.testing.assert_array_equal(got["reshape"], v.reshape(4, 15))  # 0 copies dim 1, right-aligned
    np.testing.assert_array_equal(got["reshape_like"], v.reshape(4, 15))
    np.testing.assert_array_equal(got["expand_dims"], v[None, ..., None])
    np.testing.assert_array_equal(got["squeeze"], x4[0])
    np.testing.assert_array_equal(got["transpose"], v.transpose(2, 0, 1))
    np.testing.assert_array_equal(got["reverse"], v[::-1, :, ::-1])
    np.testing.assert_array_equal(got["revseq"], _ref_reverse_sequence(v, lengths, 2, 0))
    np.testing.assert_array_equal(got["slice_by_index"], v[2::-1, 0:3:2, -1::-2])
    np.testing.assert_array_equal(got["slice_by_size"], v[1:, 0:2, 2:5])
    np.testing.assert_array_equal(got["sliding"], np.stack([v[..., 0:3], v[..., 2:5]], 2))
    np.testing.assert_array_equal(got["d2s"], _ref_depth_to_space(x4, 2))
    np.testing.assert_array_equal(T.depth_to_space(got["s2d"], block_size=2), x4)
    np.testing.assert_array_equal(got["pshuf"], torch.nn.functional.pixel_shuffle(tx, 2).numpy())
    np.testing.assert_array_equal(got["punshuf"],
                                  torch.nn.functional.pixel_unshuffle(tx, 2).numpy())
    np.testing.assert_array_equal(got["s2b"], _ref_space_to_batch(x4, [2, 2], [[0, 0], [1, 1]]))
    np.testing.assert_array_equal(got["b2s"], x4)


def test_e2e_reshape_ios15_and_slice_update_ios18():
    helpers, ct, mb, types = _mb()
    v, u = rand((3, 4, 5)), rand((2, 2, 3))

    @mb.program(input_specs=[mb.TensorSpec(shape=v.shape, dtype=types.fp32)],
                opset_version=ct.target.iOS15)
    def prog15(v):
        return mb.reshape(x=v, shape=[0, -1, 5], name="r")

    got = helpers.run_mil(prog15, {"v": v}, opset="iOS15")
    np.testing.assert_array_equal(got["r"], v.reshape(3, 4, 5))

    @mb.program(input_specs=[mb.TensorSpec(shape=v.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=u.shape, dtype=types.fp32)],
                opset_version=ct.target.iOS18)
    def prog18(v, u):
        return mb.slice_update(x=v, update=u, begin=[0, 1, 0], end=[3, 3, 5], stride=[2, 1, 2],
                               name="su")

    got = helpers.run_mil(prog18, {"v": v, "u": u}, opset="iOS18")
    ref = v.copy()
    ref[0:3:2, 1:3, 0:5:2] = u
    np.testing.assert_array_equal(got["su"], ref)


def test_e2e_slices_with_begin_from_a_model_input():
    """KV-cache style: the slice position is a model input (iOS18 slice_update + slice_by_index)."""
    helpers, ct, mb, types = _mb()
    v, u = rand((3, 4, 5)), rand((3, 1, 5))
    pos = np.array([2], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=v.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=u.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=(1,), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(v, u, pos):
        zero = np.array([0], np.int32)
        begin = mb.concat(values=[zero, pos, zero], axis=0)
        end = mb.concat(values=[np.array([3], np.int32), mb.add(x=pos, y=1),
                                np.array([5], np.int32)], axis=0)
        updated = mb.slice_update(x=v, update=u, begin=begin, end=end, name="su")
        row = mb.slice_by_index(x=updated, begin=begin, end=end, begin_mask=[True, False, True],
                                end_mask=[True, False, True], squeeze_mask=[False, True, False],
                                name="row")
        return updated, row

    got = helpers.run_mil(prog, {"v": v, "u": u, "pos": pos}, opset="iOS18")
    ref = v.copy()
    ref[:, 2:3, :] = u
    np.testing.assert_array_equal(got["su"], ref)
    np.testing.assert_array_equal(got["row"], u[:, 0, :])



def test_e2e_slices_sized_by_model_inputs_run_op_by_op():
    """slice_by_index / slice_by_size whose output size depends on begin/end values fed by the
    model's inputs: each predict gets the slice NumPy takes for those values."""
    import mljax
    helpers, ct, mb, types = _mb()

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 6), dtype=types.fp32),
                             mb.TensorSpec(shape=(2,), dtype=types.int32),
                             mb.TensorSpec(shape=(2,), dtype=types.int32)],
                opset_version=ct.target.iOS17)
    def prog(x, begin, end):
        return (mb.slice_by_index(x=x, begin=begin, end=end, stride=[1, 2], name="by_index"),
                mb.slice_by_size(x=x, begin=begin, size=[-1, 2], name="by_size"))

    model = mljax.MLModel(helpers.convert_mil(prog))
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    for b, e in [([0, 1], [3, 6]), ([1, -4], [4, 5]), ([2, 0], [3, 2])]:
        got = model.predict({"x": x, "begin": np.array(b, np.int32), "end": np.array(e, np.int32)})
        np.testing.assert_array_equal(got["by_index"], x[b[0]:e[0], b[1]:e[1]:2])
        c = b[1] % 6
        np.testing.assert_array_equal(got["by_size"], x[b[0]:, c:c + 2])
