"""Elementwise unary and binary ops against NumPy references, over dtypes and opsets."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from mljax.errors import OpError
from mljax.mil.types import DTYPES
from mljax.ops._registry import OpContext, lookup

TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float16: dict(rtol=2e-3, atol=2e-3)}
FLOATS = (np.float32, np.float16)


def run(op, opset, *args, **static):
    """Call the registered implementation inside ``jax.jit`` (as the lowering does)."""
    fn = lookup(op, opset).fn
    return np.asarray(jax.jit(lambda *a: fn(*a, **static))(*args))


def check(out, ref, dtype):
    assert out.dtype == np.dtype(dtype), f"dtype {out.dtype}, expected {np.dtype(dtype)}"
    if np.dtype(dtype).kind in "iub":
        np.testing.assert_array_equal(out, ref.astype(dtype))
    else:
        np.testing.assert_allclose(out.astype(np.float64), ref, **TOL[np.dtype(dtype).type])


def sample(shape, dtype, low=-3.0, high=3.0, seed=0):
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


# --- unary ---------------------------------------------------------------------------------
# op -> (NumPy float64 reference, input range)
UNARY = {
    "abs": (np.abs, (-3, 3)), "acos": (np.arccos, (-0.99, 0.99)),
    "asin": (np.arcsin, (-0.99, 0.99)), "atan": (np.arctan, (-3, 3)),
    "atanh": (np.arctanh, (-0.9, 0.9)), "ceil": (np.ceil, (-3, 3)), "cos": (np.cos, (-3, 3)),
    "cosh": (np.cosh, (-3, 3)), "erf": (np.vectorize(math.erf), (-3, 3)),
    "exp": (np.exp, (-3, 3)), "exp2": (np.exp2, (-3, 3)), "floor": (np.floor, (-3, 3)),
    "round": (np.round, (-3, 3)), "sign": (np.sign, (-3, 3)), "sin": (np.sin, (-3, 3)),
    "sinh": (np.sinh, (-3, 3)), "sqrt": (np.sqrt, (0, 9)), "square": (np.square, (-3, 3)),
    "tan": (np.tan, (-1.2, 1.2)), "tanh": (np.tanh, (-3, 3)),
}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_float(op, dtype):
    ref, (low, high) = UNARY[op]
    x = sample((3, 4), dtype, low, high, seed=len(op))
    check(run(op, 17, x), ref(x.astype(np.float64)), dtype)


@pytest.mark.parametrize("op", ["abs", "sign", "square", "exp2"])
def test_unary_int32(op):
    x = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    # exp2 of a negative int is a fraction that truncates to 0 (NumPy's astype)
    ref = UNARY[op][0](x.astype(np.float64)).astype(np.int32)
    check(run(op, 15, x), ref, np.int32)


def test_round_ties_to_even():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, 0.6], np.float32)
    check(run("round", 15, x), np.array([-2, -2, 0, 0, 2, 2, 0, 1.0]), np.float32)


@pytest.mark.parametrize("opset", (15, 17))
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op, default, ref", [
    ("inverse", 1e-4, lambda x, e: 1 / (x + e)),
    ("log", 1e-45, lambda x, e: np.log(x + e)),
    ("rsqrt", 1e-12, lambda x, e: 1 / np.sqrt(x + e)),
])
def test_epsilon_ops(op, default, ref, dtype, opset):
    x = sample((2, 5), dtype, 0.5, 4.0)
    x64 = x.astype(np.float64)
    check(run(op, opset, x), ref(x64, default), dtype)
    # iOS17 allows an epsilon of another dtype; the output keeps x's dtype
    check(run(op, opset, x, epsilon=0.1), ref(x64, 0.1), dtype)


def test_clip_and_threshold():
    x = sample((4, 5), np.float32)
    check(run("clip", 15, x, alpha=-1.0, beta=0.5), np.clip(x, -1, 0.5), np.float32)
    check(run("threshold", 15, x, alpha=0.25), np.maximum(x, 0.25), np.float32)
    xi = np.arange(-5, 5, dtype=np.int32)
    check(run("threshold", 15, xi, alpha=2), np.maximum(xi, 2), np.int32)


def test_clip_ios17_requires_alpha_below_beta():
    x = np.zeros(3, np.float32)
    check(run("clip", 15, x, alpha=1.0, beta=1.0), np.ones(3), np.float32)
    with pytest.raises(OpError, match="alpha must be smaller than beta"):
        run("clip", 17, x, alpha=1.0, beta=1.0)


def test_logical_not():
    x = np.array([True, False, True])
    check(run("logical_not", 15, x), np.array([False, True, False]), np.bool_)


CAST_VALUES = np.array([-2.7, -1.0, -0.5, 0.0, 0.4, 1.5, 2.9, 100.0], np.float32)


@pytest.mark.parametrize("dtype", ["int32", "fp16", "fp32", "bool"])
def test_cast_ios15(dtype):
    target = DTYPES[dtype].numpy
    check(run("cast", 15, CAST_VALUES, dtype=dtype), CAST_VALUES.astype(target), target)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
def test_cast_ios17_small_ints(dtype):
    x = np.array([0.0, 1.9, 7.0, 100.2], np.float32)
    target = DTYPES[dtype].numpy
    check(run("cast", 17, x, dtype=dtype), x.astype(target), target)
    with pytest.raises(OpError, match="iOS15"):
        run("cast", 15, x, dtype=dtype)


def test_cast_int_to_float_and_bool():
    x = np.array([-3, 0, 2], np.int32)
    check(run("cast", 15, x, dtype="fp16"), x.astype(np.float16), np.float16)
    check(run("cast", 15, x, dtype="bool"), x.astype(bool), np.bool_)


def test_cast_honours_compute_precision():
    """With an fp32 compute precision, a cast to fp16 computes in fp32."""
    ctx = OpContext("cast", "c", 17, compute_dtype=lambda d: DTYPES["fp32"] if d.name == "fp16" else d)
    out = lookup("cast", 17).fn(np.array([1, 2], np.int32), dtype="fp16", ctx=ctx)
    assert np.asarray(out).dtype == np.float32


# --- binary --------------------------------------------------------------------------------
ARITH = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum,
    "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.remainder,
}
COMPARE = {
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
}
SHAPES = [((2, 3), (2, 3)), ((2, 1, 4), (3, 1)), ((), (2, 2)), ((4,), (3, 1))]


def _nonzero(y):
    return np.where(np.abs(y) < 0.5, 1, y).astype(y.dtype)


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op", sorted(ARITH))
def test_arith_float_broadcast(op, dtype, shapes):
    x = sample(shapes[0], dtype, seed=1)
    y = _nonzero(sample(shapes[1], dtype, seed=2))
    ref = ARITH[op](x.astype(np.float64), y.astype(np.float64))
    out = run(op, 17, x, y)
    if op in ("floor_div", "mod") and dtype == np.float16:
        # fp16 rounding of x / y can move a quotient across an integer: compare x == q*y + r
        q = run("floor_div", 17, x, y).astype(np.float64)
        r = run("mod", 17, x, y).astype(np.float64)
        np.testing.assert_allclose(q * y + r, np.broadcast_to(x, q.shape), atol=1e-2)
        assert out.dtype == dtype
        return
    check(out, ref, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_real_div_and_pow_float(dtype):
    x = sample((3, 4), dtype, 0.5, 3, seed=3)
    y = _nonzero(sample((4,), dtype, -2, 2, seed=4))
    check(run("real_div", 15, x, y), x.astype(np.float64) / y, dtype)
    check(run("pow", 15, x, y), np.power(x.astype(np.float64), y.astype(np.float64)), dtype)


@pytest.mark.parametrize("op", sorted(ARITH) + ["pow"])
def test_arith_int32(op):
    x = np.array([[-7, -6, -1, 0, 1, 5, 7, 9]], np.int32)
    y = np.array([[2], [-3], [4]], np.int32)
    ref_fn = ARITH.get(op, np.power)
    yy = np.abs(y) if op == "pow" else y
    check(run(op, 15, x, yy), ref_fn(x.astype(np.int64), yy.astype(np.int64)), np.int32)


def test_floor_div_and_mod_follow_python_for_negative_ints():
    x = np.array([-7, 7, -7, 7], np.int32)
    y = np.array([2, -2, -2, 2], np.int32)
    check(run("floor_div", 15, x, y), np.array([a // b for a, b in zip(x.tolist(), y.tolist())]),
          np.int32)
    check(run("mod", 15, x, y), np.array([a % b for a, b in zip(x.tolist(), y.tolist())]), np.int32)
    xf, yf = x.astype(np.float32), y.astype(np.float32)
    ref = np.array([a % b for a, b in zip(xf.tolist(), yf.tolist())])
    check(run("mod", 15, xf, yf), ref, np.float32)


def test_real_div_int32_truncates_towards_zero():
    x = np.array([7, -7, 5, -5, 60], np.int32)
    y = np.array([2, 2, -3, -3, 16], np.int32)
    check(run("real_div", 15, x, y), np.trunc(x / y), np.int32)


@pytest.mark.parametrize("dtype", (np.float32, np.float16, np.int32))
@pytest.mark.parametrize("op", sorted(COMPARE))
def test_comparisons(op, dtype):
    x = np.array([[-1, 0, 2, 3]], dtype)
    y = np.array([[0], [2], [3]], dtype)
    check(run(op, 15, x, y), COMPARE[op](x, y), np.bool_)


@pytest.mark.parametrize("op, ref", [("logical_and", np.logical_and),
                                     ("logical_or", np.logical_or),
                                     ("logical_xor", np.logical_xor)])
def test_logical_binary(op, ref):
    x = np.array([[True, False, True, False]])
    y = np.array([[True], [False]])
    check(run(op, 15, x, y), ref(x, y), np.bool_)


def test_mixed_numpy_const_and_traced_input():
    """A NumPy constant operand (as the lowering passes small consts) works with a traced one."""
    x = sample((2, 3), np.float16)
    out = run("add", 17, x, np.array(1.5, np.float16))
    check(out, x.astype(np.float64) + 1.5, np.float16)


ALL_UNARY = sorted(UNARY) + ["inverse", "log", "rsqrt", "logical_not", "threshold"]
ALL_BINARY = sorted(ARITH) + sorted(COMPARE) + ["real_div", "pow", "logical_and", "logical_or",
                                               "logical_xor"]


@pytest.mark.parametrize("op", ALL_UNARY + ALL_BINARY)
def test_one_implementation_serves_all_opsets(op):
    fns = {lookup(op, opset).fn for opset in (15, 16, 17, 18)}
    assert len(fns) == 1 and None not in fns


@pytest.mark.parametrize("op", ["cast", "clip"])
def test_ios17_deltas_are_registered(op):
    assert lookup(op, 15).fn is lookup(op, 16).fn
    assert lookup(op, 17).fn is lookup(op, 18).fn
    assert lookup(op, 15).fn is not lookup(op, 17).fn


# -------------------------------------------------------------------------- end to end
def _e2e(prog, inputs, opset, fp16=False):
    helpers = pytest.importorskip("helpers")
    return helpers.run_mil(prog, inputs, opset=opset, fp16=fp16)


def _mb():
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    return ct, mb, types


@pytest.mark.parametrize("opset", ["iOS15", "iOS17"])
def test_e2e_float_unary_and_binary(opset):
    ct, mb, types = _mb()
    x = sample((3, 4), np.float32, -0.9, 0.9, seed=5)   # inside every unary op's domain
    y = _nonzero(sample((4,), np.float32, -2, 2, seed=6))
    unary = [op for op in sorted(UNARY) if op != "sqrt"]
    binary = sorted(ARITH) + ["real_div"]

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32),
                             mb.TensorSpec(shape=y.shape, dtype=types.fp32)],
                opset_version=getattr(ct.target, opset))
    def prog(x, y):
        outs = [getattr(mb, op)(x=x, name=op) for op in unary]
        outs += [getattr(mb, op)(x=x, y=y, name=op) for op in binary]
        outs.append(mb.rsqrt(x=mb.abs(x=x), epsilon=0.5, name="rsqrt"))
        outs.append(mb.clip(x=x, alpha=-0.5, beta=0.25, name="clip"))
        less = mb.less(x=x, y=y)
        outs.append(mb.cast(x=mb.logical_not(x=less), dtype="fp32", name="not_less"))
        return tuple(outs)

    out = _e2e(prog, {"x": x, "y": y}, opset)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    refs = {op: UNARY[op][0](x64) for op in unary}
    refs.update({op: ARITH[op](x64, y64) for op in ARITH})
    refs["real_div"] = x64 / y64
    refs["rsqrt"] = 1 / np.sqrt(np.abs(x64) + 0.5)
    refs["clip"] = np.clip(x64, -0.5, 0.25)
    refs["not_less"] = (x64 >= y64).astype(np.float64)
    for name, ref in refs.items():
        np.testing.assert_allclose(np.asarray(out[name], np.float64), ref, rtol=1e-5, atol=1e-5,
                                   err_msg=name)


def test_e2e_int32_division_semantics():
    ct, mb, types = _mb()
    x = np.array([[-7, 7, -7, 7, 9, -1]], np.int32)
    y = np.array([[2, -2, -2, 2, 4, 3]], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.int32),
                             mb.TensorSpec(shape=y.shape, dtype=types.int32)],
                opset_version=ct.target.iOS17)
    def prog(x, y):
        return (mb.floor_div(x=x, y=y, name="floor_div"), mb.mod(x=x, y=y, name="mod"),
                mb.real_div(x=x, y=y, name="real_div"),
                mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32", name="as_float"))

    out = _e2e(prog, {"x": x, "y": y}, "iOS17")
    pairs = list(zip(x.ravel().tolist(), y.ravel().tolist()))
    np.testing.assert_array_equal(out["floor_div"].ravel(), [a // b for a, b in pairs])
    np.testing.assert_array_equal(out["mod"].ravel(), [a % b for a, b in pairs])
    np.testing.assert_array_equal(out["real_div"].ravel(), [int(a / b) for a, b in pairs])
    np.testing.assert_array_equal(out["as_float"], x.astype(np.float32))
