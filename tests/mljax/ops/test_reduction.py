"""Reduction ops against NumPy references, over axes, keep_dims, dtypes and opsets."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from mljax.errors import OpError
from mljax.ops._registry import lookup

TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float16: dict(rtol=3e-3, atol=3e-3)}


def run(op, opset, *args, **static):
    """Call the registered implementation inside ``jax.jit`` (as the lowering does)."""
    fn = lookup(op, opset).fn
    return np.asarray(jax.jit(lambda *a: fn(*a, **static))(*args))


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    s = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return s if keepdims else np.squeeze(s, axis=axis)


REFS = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_prod": np.prod, "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": _logsumexp,
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
}
AXES = [None, [1], [-1], [0, 2], [2, 0, 1], 1]


def _input(op, dtype, shape=(2, 3, 4)):
    rng = np.random.default_rng(len(op))
    low = 0.5 if op in ("reduce_log_sum", "reduce_prod") else -2.0
    high = 1.5 if op == "reduce_prod" else 2.0
    return rng.uniform(low, high, shape).astype(dtype)


CONFIGS = [dict(axes=a, keep_dims=k) for a in AXES for k in (False, True)]


@pytest.mark.parametrize("dtype", (np.float32, np.float16))
@pytest.mark.parametrize("op", sorted(REFS))
def test_float_reductions(op, dtype):
    """Every (axes, keep_dims) pair, traced in one jitted function to keep compiles few."""
    x = _input(op, dtype)
    fn = lookup(op, 17).fn
    outs = jax.jit(lambda v: tuple(fn(v, **c) for c in CONFIGS))(x)
    for config, out in zip(CONFIGS, outs):
        axes = config["axes"]
        np_axes = None if axes is None else tuple(np.atleast_1d(axes).tolist())
        ref = REFS[op](x.astype(np.float64), axis=np_axes, keepdims=config["keep_dims"])
        out = np.asarray(out)
        assert out.dtype == dtype and out.shape == np.shape(ref), config
        np.testing.assert_allclose(out.astype(np.float64), ref, **TOL[dtype], err_msg=str(config))


def test_defaults_reduce_all_axes_to_a_scalar():
    x = _input("reduce_sum", np.float32)
    out = run("reduce_sum", 15, x)
    assert out.shape == ()
    np.testing.assert_allclose(out, x.astype(np.float64).sum(), rtol=1e-5)


@pytest.mark.parametrize("op", ["reduce_sum", "reduce_mean", "reduce_prod", "reduce_max",
                                "reduce_min", "reduce_l1_norm", "reduce_sum_square",
                                "reduce_l2_norm"])
def test_int32_reductions_keep_int32(op):
    x = np.array([[-3, 4, 1, 7], [2, -5, 6, 1]], np.int32)
    ref = REFS[op](x.astype(np.float64), axis=(1,), keepdims=False)
    out = run(op, 15, x, axes=[1])
    assert out.dtype == np.int32
    # MIL casts the float result back to int32 (truncation towards zero)
    np.testing.assert_array_equal(out, ref.astype(np.int32))


def test_out_of_range_axis_is_an_op_error():
    with pytest.raises(OpError, match="axes"):
        run("reduce_sum", 15, np.ones((2, 3), np.float32), axes=[2])


@pytest.mark.parametrize("opset", (15, 17))
@pytest.mark.parametrize("dtype", (np.float32, np.float16, np.int32))
@pytest.mark.parametrize("op, ref", [("reduce_argmax", np.argmax), ("reduce_argmin", np.argmin)])
def test_arg_reductions(op, ref, dtype, opset):
    x = np.random.default_rng(0).permutation(24).reshape(2, 3, 4).astype(dtype)
    configs = [dict(axis=a, keep_dims=k) for a in (0, 1, -1) for k in (False, True)]
    fn = lookup(op, opset).fn
    outs = jax.jit(lambda v: tuple(fn(v, **c) for c in configs))(x)
    for config, out in zip(configs, outs):
        out = np.asarray(out)
        assert out.dtype == np.int32, config
        np.testing.assert_array_equal(out, ref(x, axis=config["axis"], keepdims=config["keep_dims"]))


@pytest.mark.parametrize("op, ref", [("reduce_argmax", np.argmax), ("reduce_argmin", np.argmin)])
def test_arg_reductions_default_axis_and_ties(op, ref):
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, -1.0, -1.0]], np.float32)
    np.testing.assert_array_equal(run(op, 15, x), ref(x, axis=-1))  # first index on ties


@pytest.mark.parametrize("op, ref", [("reduce_argmax", np.argmax), ("reduce_argmin", np.argmin)])
def test_ios17_output_dtype(op, ref):
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    out = run(op, 17, x, axis=1, output_dtype="uint16")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, ref(x, axis=1))
    with pytest.raises(OpError, match="output_dtype"):
        run(op, 17, x, output_dtype="int8")
    assert "output_dtype" not in lookup(op, 16).static_inputs
    assert "output_dtype" in lookup(op, 18).static_inputs


@pytest.mark.parametrize("op", sorted(REFS))
def test_one_implementation_serves_all_opsets(op):
    fns = {lookup(op, opset).fn for opset in (15, 16, 17, 18)}
    assert len(fns) == 1 and None not in fns


# -------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("opset", ["iOS15", "iOS17"])
def test_e2e_all_reductions_in_one_model(opset):
    helpers = pytest.importorskip("helpers")
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    x = np.random.default_rng(3).uniform(0.5, 1.5, (2, 3, 4)).astype(np.float32)
    arg_kw = {"output_dtype": "int32"} if opset == "iOS17" else {}

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)],
                opset_version=getattr(ct.target, opset))
    def prog(x):
        outs = [getattr(mb, op)(x=x, axes=[0, 2], keep_dims=True, name=op) for op in sorted(REFS)]
        outs.append(mb.reduce_sum(x=x, name="sum_all"))
        outs.append(mb.reduce_argmax(x=x, axis=1, name="argmax", **arg_kw))
        outs.append(mb.reduce_argmin(x=x, keep_dims=True, name="argmin", **arg_kw))
        return tuple(outs)

    out = helpers.run_mil(prog, {"x": x}, opset=opset)
    x64 = x.astype(np.float64)
    for op in sorted(REFS):
        np.testing.assert_allclose(out[op], REFS[op](x64, axis=(0, 2), keepdims=True),
                                   rtol=1e-5, atol=1e-5, err_msg=op)
    np.testing.assert_allclose(out["sum_all"], x64.sum(), rtol=1e-5)
    np.testing.assert_array_equal(out["argmax"], np.argmax(x, axis=1))
    np.testing.assert_array_equal(out["argmin"], np.argmin(x, axis=-1, keepdims=True))


@pytest.mark.parametrize("mean", [True, False])
def test_spatial_pool_by_product_single_vmapped_and_gradient(mean):
    """The global pool as a product (the graph layer's ``pool_by_product`` hint) equals NumPy's
    mean / sum over H, W: called alone, vmapped over samples as a list predict does (the samples
    folded into its batch), and its gradient (each position gets 1/(H*W), or 1) under vmap too."""
    from mljax.ops.reduction import spatial_pool_by_product
    x = np.random.default_rng(5).standard_normal((4, 2, 3, 5, 7)).astype(np.float32)
    ref = (np.mean if mean else np.sum)(x.astype(np.float64), axis=(2, 3), keepdims=True)
    pool = jax.jit(lambda a: spatial_pool_by_product(a, mean=mean))
    np.testing.assert_allclose(np.asarray(pool(x[0])), ref[0], **TOL[np.float32])
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(pool))(x)), ref, **TOL[np.float32])
    weights = np.random.default_rng(6).standard_normal((7,)).astype(np.float32)

    def loss(a):
        return (spatial_pool_by_product(a, mean=mean) * weights).sum()
    grads = np.asarray(jax.jit(jax.vmap(jax.grad(loss)))(x))
    scale = 1 / (3 * 5) if mean else 1.0
    np.testing.assert_allclose(grads, np.broadcast_to(weights * scale, x.shape), **TOL[np.float32])
