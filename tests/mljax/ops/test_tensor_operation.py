"""tensor_operation ops against independent NumPy / torch references, plus end-to-end models."""
from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import torch

from mljax.errors import OpError
from mljax.ops import _registry
from mljax.ops import tensor_operation as T

RNG = np.random.default_rng(0)
DTYPES = [np.float32, np.float16, np.int32]
TOL = {np.float32: 1e-6, np.float16: 1e-2, np.int32: 0, np.bool_: 0}


def rand(shape, dtype=np.float32, lo=-5, hi=5):
    if dtype == np.bool_:
        return RNG.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        return RNG.integers(lo, hi, size=shape).astype(dtype)
    return RNG.uniform(lo, hi, size=shape).astype(dtype)


def check(actual, expected, dtype=None):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if dtype is not None:
        assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    tol = TOL.get(np.dtype(dtype or expected.dtype).type, 1e-6)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               rtol=tol, atol=tol)


def test_registered_opsets():
    reg = _registry.registry()
    expect = {"band_part": [15], "cumsum": [15], "fill": [15], "fill_like": [16],
              "non_maximum_suppression": [15, 17], "non_zero": [15], "one_hot": [15],
              "pad": [15], "range_1d": [15], "tile": [15], "argsort": [15],
              "topk": [15, 16, 17], "flatten2d": [15], "shape": [15], "concat": [15],
              "split": [15], "stack": [15], "identity": [15]}
    for op, versions in expect.items():
        assert sorted(reg[op]) == versions, op


# ---------------------------------------------------------------- band_part / cumsum
@pytest.mark.parametrize("dtype", DTYPES + [np.bool_])
@pytest.mark.parametrize("lower,upper", [(-1, -1), (0, -1), (-1, 0), (0, 0), (1, 2), (2, 0)])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 6, 4)])
def test_band_part(dtype, lower, upper, shape):
    x = rand(shape, dtype)
    m, n = shape[-2:]
    ref = x.copy()
    for i, j in itertools.product(range(m), range(n)):
        if not ((lower < 0 or i - j <= lower) and (upper < 0 or j - i <= upper)):
            ref[..., i, j] = 0
    check(T.band_part(x, lower=lower, upper=upper), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("exclusive,reverse", itertools.product([False, True], repeat=2))
def test_cumsum(dtype, axis, exclusive, reverse):
    x = rand((3, 4, 5), dtype, -2, 2)
    t = torch.from_numpy(x.astype(np.float64))
    if reverse:
        t = t.flip(axis)
    ref = t.cumsum(axis)
    if exclusive:
        ref = ref - t
    if reverse:
        ref = ref.flip(axis)
    check(T.cumsum(x, axis=axis, exclusive=exclusive, reverse=reverse),
          ref.numpy().astype(dtype), dtype)


# ---------------------------------------------------------------- fill / one_hot / range / tile
@pytest.mark.parametrize("value", [0.0, 2.5, 7, True])
def test_fill_and_fill_like(value):
    out = np.asarray(T.fill(shape=np.array([2, 3, 1]), value=value))
    np.testing.assert_array_equal(out, np.full((2, 3, 1), value))
    like = np.asarray(T.fill_like(rand((4, 2), np.int32), value=value))
    np.testing.assert_array_equal(like, np.full((4, 2), value))


@pytest.mark.parametrize("axis", [-1, 0, 1, -2])
@pytest.mark.parametrize("on,off", [(1, 0), (2.5, -1.0), (True, False)])
def test_one_hot(axis, on, off):
    idx = np.array([[0, 3, 1], [4, 2, -1]], np.int32)  # 4 and -1 are out of range
    depth = 4
    ref = np.where(idx[..., None] == np.arange(depth), on, off)
    ref = np.moveaxis(ref, -1, axis if axis >= 0 else idx.ndim + 1 + axis)
    out = T.one_hot(idx, one_hot_vector_size=depth, axis=axis, on_value=on, off_value=off)
    np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.parametrize("start,end,step", [(0, 10, 1), (3, -7, -2), (0.5, 4.0, 0.75),
                                            (5, 5, 1), (-3.0, 3.0, 1.5)])
def test_range_1d(start, end, step):
    out = np.asarray(T.range_1d(end=end, start=start, step=step))
    np.testing.assert_allclose(out, np.arange(start, end, step), rtol=1e-6)


def test_range_1d_traced_bound_fails():
    with pytest.raises(OpError, match="before tracing"):
        jax.jit(lambda e: T.range_1d(end=e, start=0, step=1))(5)


@pytest.mark.parametrize("dtype", DTYPES + [np.bool_])
@pytest.mark.parametrize("shape,reps", [((3,), [2]), ((2, 3), [1, 3]), ((2, 1, 3), [2, 2, 1])])
def test_tile(dtype, shape, reps):
    x = rand(shape, dtype)
    check(T.tile(x, reps=np.array(reps)), np.tile(x, reps), dtype)


def test_tile_wrong_reps():
    with pytest.raises(OpError, match="reps"):
        T.tile(np.zeros((2, 2)), reps=[2])


# ---------------------------------------------------------------- pad
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("pads", [[1, 2], [0, 1, 2, 0], [1, 1, 2, 2, 0, 1]])
def test_pad(dtype, mode, pads):
    x = rand((2, 3, 4), dtype)
    tmode = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}[mode]
    kwargs = {"value": 1.5} if mode == "constant" else {}
    t = torch.from_numpy(x.astype(np.float32))
    # torch's pad list starts at the last dim; MIL's starts at the first padded dim
    tpad = [p for pair in reversed(list(zip(pads[::2], pads[1::2]))) for p in pair]
    if mode != "constant" and len(pads) // 2 == 3:  # torch needs a batch dim for 3-D reflect
        ref = torch.nn.functional.pad(t[None], tpad, mode=tmode)[0]
    else:
        ref = torch.nn.functional.pad(t, tpad, mode=tmode, **kwargs)
    out = T.pad(x, pad=np.array(pads), mode=mode, constant_val=1.5)
    check(out, ref.numpy().astype(dtype), dtype)


def test_pad_errors():
    with pytest.raises(OpError, match="mode"):
        T.pad(np.zeros((2, 2), np.float32), pad=[1, 1], mode="wrap")
    with pytest.raises(OpError, match="pad amounts"):
        T.pad(np.zeros((2, 2), np.float32), pad=[1, 1, 1])


# ---------------------------------------------------------------- argsort / topk
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("ascending", [False, True])
def test_argsort(dtype, axis, ascending):
    x = rand((4, 6, 3), dtype, -3, 3)  # small range: ties exercise stability
    ref = np.argsort(x if ascending else -x.astype(np.float64), axis=axis, kind="stable")
    out = T.argsort(x, axis=axis, ascending=ascending)
    np.testing.assert_array_equal(np.asarray(out), ref)


def _ref_topk(x, k, axis, ascending):
    order = np.argsort(x if ascending else -x.astype(np.float64), axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,axis", [(1, -1), (3, -1), (2, 0), (4, 1)])
@pytest.mark.parametrize("ascending", [False, True])
def test_topk(dtype, k, axis, ascending):
    x = rand((4, 5, 6), dtype, -4, 4)
    ref_v, ref_i = _ref_topk(x, k, axis, ascending)
    v, i = T.topk(x, k=k, axis=axis, ascending=ascending)
    check(v, ref_v, dtype)
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    assert np.asarray(i).dtype == np.int32


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int16])
def test_topk_ascending_integers_extremes(dtype):
    info = np.iinfo(dtype)
    x = np.array([[info.max, info.min, 0, 1, info.min]], dtype)
    v, i = T.topk(x, k=3, ascending=True)
    ref_v, ref_i = _ref_topk(x, 3, -1, True)
    np.testing.assert_array_equal(np.asarray(v), ref_v)
    np.testing.assert_array_equal(np.asarray(i), ref_i)


def test_topk_ios16_ios17_options():
    x = rand((3, 7))
    only_values = T.topk_ios16(x, k=2, return_indices=False, sort=False)
    check(only_values, _ref_topk(x, 2, -1, False)[0])
    v, i = T.topk_ios17(x, k=-1, output_indices_dtype="uint16")
    ref_v, ref_i = _ref_topk(x, 7, -1, False)
    check(v, ref_v)
    assert np.asarray(i).dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(i), ref_i)
    with pytest.raises(OpError, match="output_indices_dtype"):
        T.topk_ios17(x, output_indices_dtype="int8")
    with pytest.raises(OpError, match="k must be"):
        T.topk(x, k=9)


# ---------------------------------------------------------------- shape ops
@pytest.mark.parametrize("shape,axis,expected", [((3,), -1, (1, 3)), ((3,), 1, (3, 1)),
                                                 ((4, 3), -1, (4, 3)), ((2, 3, 2), -1, (6, 2)),
                                                 ((5, 5, 2), 1, (5, 10)), ((2, 3, 4), 0, (1, 24))])
def test_flatten2d(shape, axis, expected):
    x = rand(shape)
    out = np.asarray(T.flatten2d(x, axis=axis))
    np.testing.assert_array_equal(out, x.reshape(expected))


def test_shape_and_identity():
    x = rand((2, 3, 5))
    out = jax.jit(lambda a: T.identity(a) * 0 + T.shape(a)[1])(x)
    np.testing.assert_array_equal(np.asarray(out), np.full(x.shape, 3.0))
    s = T.shape(x)
    assert s.dtype == np.int32 and s.tolist() == [2, 3, 5]
    assert T.shape(np.float32(1.0)).shape == (0,)


@pytest.mark.parametrize("dtype", DTYPES + [np.bool_])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat(dtype, axis):
    a, b = rand((2, 3, 4), dtype), rand((2, 3, 4), dtype)
    c = rand((2, 3, 4), dtype)
    check(T.concat(a, b, c, axis=axis), np.concatenate([a, b, c], axis=axis), dtype)
    inter = np.stack([a, b, c], axis=(axis % 3) + 1).reshape(
        [d * 3 if i == axis % 3 else d for i, d in enumerate(a.shape)])
    check(T.concat(a, b, c, axis=axis, interleave=True), inter, dtype)


def test_concat_interleave_doc_example():
    in1 = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    in2 = np.array([[7, 8], [9, 10], [11, 12]], np.int32)
    out = T.concat(in1, in2, axis=0, interleave=True)
    np.testing.assert_array_equal(np.asarray(out), [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]])
    uneven = T.concat(in1, in2[:2], axis=0)
    np.testing.assert_array_equal(np.asarray(uneven), np.concatenate([in1, in2[:2]]))
    with pytest.raises(OpError, match="interleave"):
        T.concat(in1, in2[:2], axis=0, interleave=True)


@pytest.mark.parametrize("dtype", DTYPES + [np.bool_])
def test_split(dtype):
    x = rand((4, 6, 2), dtype)
    parts = T.split(x, num_splits=3, axis=1)
    assert isinstance(parts, tuple) and len(parts) == 3
    for p, r in zip(parts, np.split(x, 3, axis=1)):
        check(p, r, dtype)
    parts = T.split(x, split_sizes=np.array([1, 3]), axis=0)
    for p, r in zip(parts, np.split(x, [1], axis=0)):
        check(p, r, dtype)
    with pytest.raises(OpError, match="divide"):
        T.split(x, num_splits=4, axis=1)
    with pytest.raises(OpError, match="sum"):
        T.split(x, split_sizes=[1, 1], axis=0)


@pytest.mark.parametrize("dtype", DTYPES + [np.bool_])
@pytest.mark.parametrize("axis", [0, 2, -1, -3])
def test_stack(dtype, axis):
    vals = [rand((2, 3), dtype) for _ in range(3)]
    check(T.stack(*vals, axis=axis), np.stack(vals, axis=axis), dtype)


@pytest.mark.parametrize("dtype", DTYPES + [np.bool_])
def test_non_zero(dtype):
    x = rand((3, 4, 2), dtype, -1, 2)
    out = T.non_zero(x)
    np.testing.assert_array_equal(out, np.transpose(np.nonzero(x)))
    assert out.dtype == np.int32


def test_non_zero_traced_fails():
    with pytest.raises(OpError, match="data-dependent"):
        jax.jit(T.non_zero)(np.ones((2, 2), np.float32))


# ---------------------------------------------------------------- non-maximum suppression
def _ref_iou(a, b):
    ax0, ax1 = a[0] - a[2] / 2, a[0] + a[2] / 2
    ay0, ay1 = a[1] - a[3] / 2, a[1] + a[3] / 2
    bx0, bx1 = b[0] - b[2] / 2, b[0] + b[2] / 2
    by0, by1 = b[1] - b[3] / 2, b[1] + b[3] / 2
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _ref_nms(boxes, scores, iou_thr, score_thr, max_boxes, per_class):
    """Plain-Python greedy NMS, one batch item at a time (Core ML semantics)."""
    n = boxes.shape[0]
    out = (np.zeros((n, max_boxes, 4)), np.zeros((n, max_boxes, scores.shape[-1])),
           -np.ones((n, max_boxes), np.int64), np.zeros(n, np.int64))
    for b in range(n):
        best = scores[b].max(-1)
        cls = scores[b].argmax(-1)
        kept = []
        for i in sorted(range(len(best)), key=lambda i: (-best[i], i)):
            if best[i] < score_thr:
                continue
            if any(_ref_iou(boxes[b, i], boxes[b, j]) > iou_thr and
                   (not per_class or cls[i] == cls[j]) for j in kept):
                continue
            kept.append(i)
        kept = (kept or [int(np.argmax(best))])[:max_boxes]
        for slot, i in enumerate(kept):
            out[0][b, slot], out[1][b, slot], out[2][b, slot] = boxes[b, i], scores[b, i], i
        out[3][b] = len(kept)
    return out


def _random_boxes(n, nb, k, dtype=np.float32):
    boxes = np.concatenate([RNG.uniform(0, 10, (n, nb, 2)), RNG.uniform(1, 5, (n, nb, 2))], -1)
    scores = RNG.permutation(n * nb * k).reshape(n, nb, k) / (n * nb * k)
    return boxes.astype(dtype), scores.astype(dtype)


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("iou_thr,score_thr", [(0.3, 0.2), (0.0, 0.5), (0.7, 0.0), (0.5, 2.0)])
@pytest.mark.parametrize("max_boxes", [3, 30])
def test_nms_ios15(per_class, iou_thr, score_thr, max_boxes):
    boxes, scores = _random_boxes(2, 12, 3)
    ref = _ref_nms(boxes, scores, iou_thr, score_thr, max_boxes, per_class)
    out = T.non_maximum_suppression(boxes, scores, iou_threshold=iou_thr,
                                    score_threshold=score_thr, max_boxes=max_boxes,
                                    per_class_suppression=per_class)
    for o, r in zip(out, ref):
        np.testing.assert_allclose(np.asarray(o), r, rtol=1e-6, atol=1e-6)


def test_nms_coremltools_smoke_example():
    boxes = np.array([[[0.0] * 4, [1.0] * 4, [2.0] * 4, [3.0] * 4]], np.float32)
    scores = np.array([[[-3.5], [9.4], [2.3], [0.7]]], np.float32)
    b, s, i, c = T.non_maximum_suppression(boxes, scores, iou_threshold=0.2, score_threshold=0.4,
                                           max_boxes=2, per_class_suppression=True)
    np.testing.assert_allclose(np.asarray(b), [[[1.0] * 4, [2.0] * 4]])
    np.testing.assert_allclose(np.asarray(s), [[[9.4], [2.3]]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(i), [[1, 2]])
    np.testing.assert_array_equal(np.asarray(c), [2])


@pytest.mark.parametrize("dtype,per_class", [(np.float32, False), (np.float32, True),
                                             (np.float16, True)])
def test_nms_ios17(dtype, per_class):
    boxes, scores = _random_boxes(2, 12, 3, dtype)  # same shapes as above: reuses compilations
    ref = _ref_nms(boxes.astype(np.float32), scores.astype(np.float32), 0.25, -np.inf, 30, per_class)
    out = T.non_maximum_suppression_ios17(np.swapaxes(boxes, 1, 2), np.swapaxes(scores, 1, 2),
                                          iou_threshold=0.25, max_boxes=30,
                                          per_class_suppression=per_class)
    assert len(out) == 3
    np.testing.assert_allclose(np.asarray(out[0], np.float32), np.swapaxes(ref[0], 1, 2), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(out[1], np.float32), np.swapaxes(ref[1], 1, 2), rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(out[2]), ref[2])


def test_nms_jits():
    boxes, scores = _random_boxes(1, 5, 2)
    f = jax.jit(lambda b, s: T.non_maximum_suppression(
        b, s, iou_threshold=0.3, score_threshold=0.1, max_boxes=4))
    ref = _ref_nms(boxes, scores, 0.3, 0.1, 4, False)
    np.testing.assert_array_equal(np.asarray(f(boxes, scores)[2]), ref[2])


# ---------------------------------------------------------------- end to end (coremltools models)
def _mb():
    helpers = pytest.importorskip("helpers")
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    return helpers, ct, mb, types


def test_e2e_tensor_operation_ios17():
    helpers, ct, mb, types = _mb()
    x = rand((3, 4, 5), np.float32)
    idx = np.array([[0, 3, 1], [2, 5, -1]], np.int32)
    boxes, scores = _random_boxes(1, 8, 2)
    boxes_t, scores_t = np.swapaxes(boxes, 1, 2).copy(), np.swapaxes(scores, 1, 2).copy()

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=idx.shape, dtype=types.int32),
                             mb.TensorSpec(shape=boxes_t.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=scores_t.shape, dtype=types.fp32)],
                opset_version=ct.target.iOS17)
    def prog(x, idx, boxes, scores):
        outs = [
            mb.band_part(x=x, lower=1, upper=0, name="band"),
            mb.cumsum(x=x, axis=1, exclusive=True, reverse=True, name="cumsum"),
            mb.fill_like(ref_tensor=x, value=3.0, name="fill_like"),
            mb.one_hot(indices=idx, one_hot_vector_size=4, axis=1, on_value=1.0, off_value=-1.0,
                       name="one_hot"),
            mb.pad(x=x, pad=[1, 1, 2, 0], mode="reflect", name="pad_reflect"),
            mb.pad(x=x, pad=[0, 2], mode="constant", constant_val=-7.0, name="pad_const"),
            mb.tile(x=x, reps=[1, 2, 1], name="tile"),
            mb.argsort(x=x, axis=-1, ascending=True, name="argsort"),
            mb.flatten2d(x=x, axis=2, name="flatten2d"),
            mb.concat(values=[x, mb.mul(x=x, y=2.0)], axis=2, interleave=True, name="concat"),
            mb.stack(values=[x, x], axis=1, name="stack"),
            mb.range_1d(end=mb.gather(x=mb.shape(x=x), indices=2), start=0, step=1, name="range"),
        ]
        outs += list(mb.topk(x=x, k=2, axis=1, name="topk"))
        outs += list(mb.split(x=x, num_splits=2, axis=1, name="split"))
        outs += list(mb.non_maximum_suppression(boxes=boxes, scores=scores, iou_threshold=0.3,
                                                max_boxes=5, name="nms"))
        return tuple(outs)

    got = helpers.run_mil(prog, {"x": x, "idx": idx, "boxes": boxes_t, "scores": scores_t})
    m, n = np.arange(4)[:, None], np.arange(5)[None]
    np.testing.assert_allclose(got["band"], np.where((m - n <= 1) & (n - m <= 0), x, 0))
    rev = np.flip(x, 1)
    excl = np.flip(np.cumsum(rev, 1) - rev, 1)
    np.testing.assert_allclose(got["cumsum"], excl, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["fill_like"], np.full(x.shape, 3.0))
    ref_oh = np.moveaxis(np.where(idx[..., None] == np.arange(4), 1.0, -1.0), -1, 1)
    np.testing.assert_array_equal(got["one_hot"], ref_oh)
    np.testing.assert_array_equal(got["pad_reflect"],
                                  np.pad(x, [(0, 0), (1, 1), (2, 0)], mode="reflect"))
    np.testing.assert_array_equal(got["pad_const"],
                                  np.pad(x, [(0, 0), (0, 0), (0, 2)], constant_values=-7.0))
    np.testing.assert_array_equal(got["tile"], np.tile(x, [1, 2, 1]))
    np.testing.assert_array_equal(got["argsort"], np.argsort(x, -1))
    np.testing.assert_array_equal(got["flatten2d"], x.reshape(12, 5))
    np.testing.assert_array_equal(got["concat"], np.stack([x, 2 * x], 3).reshape(3, 4, 10))
    np.testing.assert_array_equal(got["stack"], np.stack([x, x], 1))
    np.testing.assert_array_equal(got["range"], np.arange(5))
    ref_v, ref_i = _ref_topk(x, 2, 1, False)
    np.testing.assert_array_equal(got["topk_0"], ref_v)
    np.testing.assert_array_equal(got["topk_1"], ref_i)
    np.testing.assert_array_equal(got["split_0"], x[:, :2])
    np.testing.assert_array_equal(got["split_1"], x[:, 2:])
    ref = _ref_nms(boxes, scores, 0.3, -np.inf, 5, False)
    np.testing.assert_allclose(got["nms_0"], np.swapaxes(ref[0], 1, 2), rtol=1e-6)
    np.testing.assert_allclose(got["nms_1"], np.swapaxes(ref[1], 1, 2), rtol=1e-6)
    np.testing.assert_array_equal(got["nms_2"], ref[2])


def test_e2e_tensor_operation_ios15():
    helpers, ct, mb, types = _mb()
    x = rand((2, 6), np.float32)
    boxes, scores = _random_boxes(2, 6, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=boxes.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=scores.shape, dtype=types.fp32)],
                opset_version=ct.target.iOS15)
    def prog(x, boxes, scores):
        outs = list(mb.topk(x=x, k=3, ascending=True, name="topk"))
        outs += list(mb.non_maximum_suppression(
            boxes=boxes, scores=scores, iou_threshold=0.2, score_threshold=0.3, max_boxes=4,
            per_class_suppression=True, name="nms"))
        outs.append(mb.fill(shape=mb.shape(x=x), value=1.5, name="fill"))
        return tuple(outs)

    got = helpers.run_mil(prog, {"x": x, "boxes": boxes, "scores": scores}, opset="iOS15")
    ref_v, ref_i = _ref_topk(x, 3, -1, True)
    np.testing.assert_array_equal(got["topk_0"], ref_v)
    np.testing.assert_array_equal(got["topk_1"], ref_i)
    ref = _ref_nms(boxes, scores, 0.2, 0.3, 4, True)
    for i, r in enumerate(ref):
        np.testing.assert_allclose(got[f"nms_{i}"], r, rtol=1e-6)
    np.testing.assert_array_equal(got["fill"], np.full(x.shape, 1.5))


def test_e2e_non_zero_of_a_model_input_is_data_dependent():
    """Traced, non_zero refuses (its shape depends on the data); MLModel then runs op by op."""
    import jax
    helpers, ct, mb, types = _mb()

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)],
                opset_version=ct.target.iOS17)
    def prog(x):
        return mb.non_zero(x=x, name="nz")

    x = np.eye(2, 3, dtype=np.float32)
    with pytest.raises(OpError, match="data-dependent"):
        jax.jit(lambda v: T.non_zero(v))(x)
    out = helpers.run_mil(prog, {"x": x})
    np.testing.assert_array_equal(out["nz"], np.argwhere(x))
