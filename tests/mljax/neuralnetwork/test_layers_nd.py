"""Rank-N NeuralNetwork layers (EXACT_ARRAY_MAPPING) and control flow, built with NeuralNetworkBuilder."""
from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402

import mljax  # noqa: E402
from mljax.neuralnetwork.weights import decode_weights  # noqa: E402
from mljax.proto import NeuralNetwork_pb2  # noqa: E402

RNG = np.random.default_rng(1)


def _r(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _builder(inputs, outputs):
    return NeuralNetworkBuilder([(n, datatypes.Array(*s)) for n, s in inputs], [(n, None) for n in outputs],
                                disable_rank5_shape_mapping=True)


def test_shape_and_reduction_layers():
    b = _builder([("x", (2, 3, 4)), ("y", (2, 3, 4))],
                 ["mm", "rs", "tr", "rsum", "rmax", "cat", "s0", "s1", "g", "sq", "ex", "sl", "topv", "cs",
                  "wh", "dyn"])
    w = _r(4, 5)
    b.add_batched_mat_mul("mm", ["x"], "mm", weight_matrix_rows=4, weight_matrix_columns=5, W=w)
    b.add_reshape_static("rs", "x", "rs", (4, 6))
    b.add_transpose("tr", (2, 0, 1), "x", "tr")
    b.add_reduce_sum("rsum", "x", "rsum", axes=[1], keepdims=False)
    b.add_reduce_max("rmax", "x", "rmax", axes=[-1, 0], keepdims=True)
    b.add_concat_nd("cat", ["x", "y"], "cat", axis=-1)
    b.add_split_nd("split", "x", ["s0", "s1"], axis=2, split_sizes=[1, 3])
    b.add_load_constant_nd("idx", "idx", constant_value=np.array([2, 0], np.float32), shape=(2,))
    b.add_gather("g", ["x", "idx"], "g", axis=1)
    b.add_expand_dims("ex0", "x", "ex0", axes=[0, 3])
    b.add_squeeze("sq", "ex0", "sq", axes=[0, 3])
    b.add_expand_dims("ex", "x", "ex", axes=[-1])
    b.add_slice_static("sl", "x", "sl", begin_ids=[0, 1, 0], end_ids=[2, 3, 4], strides=[1, 1, 2],
                       begin_masks=[False, False, False], end_masks=[False, True, False])
    b.add_topk("top", ["x"], ["topv", "topi"], k=2, axis=-1)
    b.add_cumsum("cs", ["x"], "cs", axis=1, reverse=True, exclusive=True)
    b.add_greater_than("gt", ["x", "y"], "gt")
    b.add_where_broadcastable("wh", ["gt", "x", "y"], "wh")
    b.add_get_shape("shape", "y", "shape")
    b.add_reshape_dynamic("dyn", ["rs", "shape"], "dyn")
    m = mljax.MLModel(b.spec)
    x, y = _r(2, 3, 4), _r(2, 3, 4)
    out = m.predict({"x": x, "y": y})
    np.testing.assert_allclose(out["mm"], x @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["rs"], x.reshape(4, 6))
    np.testing.assert_array_equal(out["tr"], x.transpose(2, 0, 1))
    np.testing.assert_allclose(out["rsum"], x.sum(1), rtol=1e-6)
    np.testing.assert_array_equal(out["rmax"], x.max(axis=(0, 2), keepdims=True))
    np.testing.assert_array_equal(out["cat"], np.concatenate([x, y], -1))
    np.testing.assert_array_equal(out["s0"], x[:, :, :1])
    np.testing.assert_array_equal(out["s1"], x[:, :, 1:])
    np.testing.assert_array_equal(out["g"], x[:, [2, 0]])
    np.testing.assert_array_equal(out["sq"], x)
    np.testing.assert_array_equal(out["ex"], x[..., None])
    np.testing.assert_array_equal(out["sl"], x[0:2, 1:, 0:4:2])
    np.testing.assert_array_equal(out["topv"], -np.sort(-x, axis=-1)[..., :2])
    ref_cs = np.flip(np.cumsum(np.flip(x, 1), 1), 1) - x
    np.testing.assert_allclose(out["cs"], ref_cs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["wh"], np.where(x > y, x, y))
    np.testing.assert_array_equal(out["dyn"], x)


def test_branch_with_computed_condition():
    b = _builder([("x", (3,)), ("c", (1,))], ["y"])
    branch = b.add_branch("branch", "c")
    if_b = NeuralNetworkBuilder(nn_spec=branch.branch.ifBranch, disable_rank5_shape_mapping=True)
    if_b.add_activation("double", "LINEAR", "x", "y", params=[2.0, 0.0])
    else_b = NeuralNetworkBuilder(nn_spec=branch.branch.elseBranch, disable_rank5_shape_mapping=True)
    else_b.add_activation("neg", "LINEAR", "x", "y", params=[-1.0, 0.0])
    m = mljax.MLModel(b.spec)
    x = _r(3)
    np.testing.assert_allclose(m.predict({"x": x, "c": np.array([1.0], np.float32)})["y"], 2 * x, rtol=1e-6)
    np.testing.assert_allclose(m.predict({"x": x, "c": np.array([0.0], np.float32)})["y"], -x, rtol=1e-6)


def test_while_loop_with_condition_network():
    """y = x; while y < 10: y = y * 2 (a while loop whose condition network reads the body's blob)."""
    b = _builder([("x", (1,))], ["y"])
    b.add_copy("init", "x", "y")
    loop = b.add_loop("loop", condition="cond")
    cond = NeuralNetworkBuilder(nn_spec=loop.loop.conditionNetwork, disable_rank5_shape_mapping=True)
    cond.add_less_than("lt", ["y"], "cond", alpha=10.0)
    body = NeuralNetworkBuilder(nn_spec=loop.loop.bodyNetwork, disable_rank5_shape_mapping=True)
    body.add_elementwise("mul", ["y"], "y2", "MULTIPLY", alpha=2.0)
    body.add_copy("update", "y2", "y")
    m = mljax.MLModel(b.spec)
    for start in (0.7, 3.0, 12.0):
        y, ref = m.predict({"x": np.array([start], np.float32)})["y"], start
        while ref < 10:
            ref *= 2
        np.testing.assert_allclose(np.asarray(y).reshape(-1), [ref], rtol=1e-6)


def test_quantized_weights_decode():
    wp = NeuralNetwork_pb2.WeightParams()
    q = np.array([0, 3, 1, 2, 3, 0], np.uint8)             # 2-bit values, packed MSB first
    bits = np.unpackbits(q[:, None], axis=1)[:, -2:].reshape(-1)
    wp.rawValue = np.packbits(bits).tobytes()
    wp.quantization.numberOfBits = 2
    wp.quantization.linearQuantization.scale.extend([0.5, 2.0])
    wp.quantization.linearQuantization.bias.extend([1.0, -1.0])
    got = decode_weights(wp, (2, 3))
    np.testing.assert_allclose(got, q.reshape(2, 3) * np.array([[0.5], [2.0]]) + np.array([[1.0], [-1.0]]))
    lut = NeuralNetwork_pb2.WeightParams()
    lut.rawValue = np.packbits(bits).tobytes()
    lut.quantization.numberOfBits = 2
    lut.quantization.lookupTableQuantization.floatValue.extend([-1.0, 0.0, 0.5, 4.0])
    np.testing.assert_allclose(decode_weights(lut, (6,)), np.array([-1.0, 0.0, 0.5, 4.0])[q])
    half = NeuralNetwork_pb2.WeightParams(float16Value=np.array([1.5, -2.25], "<f2").tobytes())
    np.testing.assert_array_equal(decode_weights(half, (2,)), [1.5, -2.25])


def test_loop_growing_a_list_runs_op_by_op():
    """coremltools' MIL list-in-a-while-loop test written as a NeuralNetwork: the body appends
    ``update * i`` to a list that grows (a branch concatenates rows), so the loop cannot keep fixed
    shapes; it runs one iteration at a time on concrete values."""
    from coremltools.converters.mil import Builder as mb

    def body(i, n, ls, update):
        value = mb.mul(x=update, y=mb.cast(x=i, dtype="fp32"))
        return mb.add(x=i, y=1), n, mb.list_write(ls=ls, index=i, value=value), update

    def cond(i, n, ls, update):
        return mb.less(x=mb.cast(x=i, dtype="fp32"), y=n)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,)), mb.TensorSpec(shape=(2,))])
    def prog(n, update):
        ls = mb.make_list(init_length=1, elem_shape=(2,))
        _, _, grown, _ = mb.while_loop(_cond=cond, _body=body, loop_vars=(0, n, ls, update))
        return mb.list_gather(ls=grown, indices=mb.range_1d(start=0, end=mb.list_length(ls=grown), step=1))

    spec = ct.convert(prog, convert_to="neuralnetwork").get_spec()
    assert any(lyr.WhichOneof("layer") == "loop" for lyr in spec.neuralNetwork.layers)
    m = mljax.MLModel(spec)
    update = np.array([1.0, 2.0], np.float32)
    for n in (3, 5):
        (got,) = m.predict({"n": np.array([n], np.float32), "update": update}).values()
        np.testing.assert_allclose(np.asarray(got), np.arange(n)[:, None] * update[None, :])
