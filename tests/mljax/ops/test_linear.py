"""linear, matmul and einsum against NumPy references, over shapes, dtypes and opsets."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from mljax.errors import OpError
from mljax.mil.types import DTYPES, TensorType
from mljax.ops._registry import OpContext, lookup

TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float16: dict(rtol=1e-2, atol=2e-2)}


def run(op, opset, *args, **static):
    """Call the registered implementation inside ``jax.jit`` (as the lowering does)."""
    fn = lookup(op, opset).fn
    return np.asarray(jax.jit(lambda *a: fn(*a, **static))(*args))


def sample(shape, dtype, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(dtype)


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    if np.dtype(dtype).kind == "i":
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out.astype(np.float64), ref, **TOL[dtype])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("x_shape", [(5,), (3, 5), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("dtype", (np.float32, np.float16))
def test_linear(dtype, x_shape, with_bias):
    x, w = sample(x_shape, dtype), sample((4, 5), dtype, 1)
    b = sample(4, dtype, 2) if with_bias else None
    ref = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b.astype(np.float64))
    check(run("linear", 17, x, w, b), ref, dtype)


def test_linear_int32():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    w = np.array([[1, -1, 2], [0, 3, -2]], np.int32)
    check(run("linear", 15, x, w, np.array([5, -5], np.int32)), x @ w.T + [5, -5], np.int32)


def test_linear_ios17_weight_of_another_dtype():
    x, w = sample((3, 5), np.float16), sample((4, 5), np.float32, 1)
    check(run("linear", 17, x, w), x.astype(np.float64) @ w.T.astype(np.float64), np.float16)


def test_linear_rejects_mismatched_weight():
    with pytest.raises(OpError, match="weight"):
        run("linear", 15, np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))


MATMUL_SHAPES = [
    ((4,), (4,)), ((4,), (10, 4, 3)), ((10, 3, 4), (4,)), ((4, 3), (3, 2)),
    ((10, 4, 3), (5, 10, 3, 2)), ((1, 2, 3), (4, 3, 5)),
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", (np.float32, np.float16))
def test_matmul_broadcasting(dtype, shapes):
    x, y = sample(shapes[0], dtype), sample(shapes[1], dtype, 1)
    check(run("matmul", 17, x, y), np.matmul(x.astype(np.float64), y.astype(np.float64)), dtype)


@pytest.mark.parametrize("tx, ty", [(False, True), (True, False), (True, True)])
def test_matmul_transposes(tx, ty):
    x = sample((2, 4, 3) if tx else (2, 3, 4), np.float32)
    y = sample((5, 4) if ty else (4, 5), np.float32, 1)
    xr = np.swapaxes(x, -1, -2) if tx else x
    yr = y.T if ty else y
    ref = np.matmul(xr.astype(np.float64), yr.astype(np.float64))
    check(run("matmul", 15, x, y, transpose_x=tx, transpose_y=ty), ref, np.float32)


@pytest.mark.parametrize("tx, ty", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", (np.float32, np.float16))
def test_matmul_transposes_of_equal_batches(tx, ty, dtype):
    """Operands with the same batch axes (attention's Q K^T) run as one product whose contracting
    axes are the transposed ones; values as NumPy's, a mismatch reported with the flags."""
    x = sample((2, 3, 4, 6) if tx else (2, 3, 6, 4), dtype)
    y = sample((2, 3, 5, 4) if ty else (2, 3, 4, 5), dtype, 1)
    ref = np.matmul((np.swapaxes(x, -1, -2) if tx else x).astype(np.float64),
                    (np.swapaxes(y, -1, -2) if ty else y).astype(np.float64))
    check(run("matmul", 15, x, y, transpose_x=tx, transpose_y=ty), ref, dtype)
    with pytest.raises(OpError, match="inner dimensions differ"):
        run("matmul", 15, x, y[..., :3] if ty else y[..., :3, :], transpose_x=tx, transpose_y=ty)


def test_matmul_transpose_has_no_effect_on_rank1():
    x, y = sample((4,), np.float32), sample((5, 4), np.float32, 1)
    check(run("matmul", 15, x, y, transpose_x=True, transpose_y=True),
          y.astype(np.float64) @ x.astype(np.float64), np.float32)


def test_matmul_int32():
    x = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    y = np.arange(8, dtype=np.int32).reshape(4, 2) - 3
    check(run("matmul", 15, x, y), x @ y, np.int32)


def test_matmul_ios17_mixed_dtypes_use_declared_output_dtype():
    x, y = sample((3, 4), np.float16), sample((4, 2), np.float32, 1)
    ctx = OpContext("matmul", "m", 17, output_types=(TensorType(DTYPES["fp16"], (3, 2)),))
    out = np.asarray(lookup("matmul", 17).fn(x, y, ctx=ctx))
    check(out, x.astype(np.float64) @ y.astype(np.float64), np.float16)


def test_matmul_rejects_mismatched_inner_dims():
    with pytest.raises(OpError, match="inner dimensions"):
        run("matmul", 15, np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))


@pytest.mark.parametrize("equation, shapes", [
    ("nchw,nwhu->nchu", ((2, 3, 4, 5), (2, 5, 4, 6))),
    ("nchw,nwhu->nchu", ((1, 3, 4, 5), (2, 5, 1, 6))),   # broadcast n and h
    ("chw,whr->chr", ((3, 4, 5), (5, 4, 2))),
    ("chw,whr->chr", ((3, 1, 5), (5, 4, 2))),            # broadcast h
    ("abcd,adce->abce", ((2, 3, 4, 5), (2, 5, 4, 6))),   # a renaming
])
@pytest.mark.parametrize("dtype", (np.float32, np.float16))
def test_einsum(dtype, equation, shapes):
    x, y = sample(shapes[0], dtype), sample(shapes[1], dtype, 1)
    lhs = equation.split("->")[0].split(",")
    sizes = {}
    for term, arr in zip(lhs, (x, y)):
        for c, n in zip(term, arr.shape):
            sizes[c] = max(sizes.get(c, 1), n)
    xb = np.broadcast_to(x.astype(np.float64), [sizes[c] for c in lhs[0]])
    yb = np.broadcast_to(y.astype(np.float64), [sizes[c] for c in lhs[1]])
    fn = lookup("einsum", 17).fn
    out = np.asarray(jax.jit(lambda a, b: fn(a, b, equation=equation))(x, y))
    check(out, np.einsum(equation, xb, yb), dtype)


def test_einsum_rejects_implicit_output():
    with pytest.raises(OpError, match="explicit"):
        lookup("einsum", 15).fn(np.ones((2, 2)), np.ones((2, 2)), equation="ij,jk")


@pytest.mark.parametrize("op", ["linear", "matmul", "einsum"])
def test_one_implementation_serves_all_opsets(op):
    fns = {lookup(op, opset).fn for opset in (15, 16, 17, 18)}
    assert len(fns) == 1 and None not in fns


# -------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("opset", ["iOS15", "iOS17"])
def test_e2e_linear_matmul_einsum(opset):
    helpers = pytest.importorskip("helpers")
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    x, y = sample((2, 3, 5), np.float32), sample((2, 4, 5), np.float32, 1)
    a, b = sample((2, 3, 4, 5), np.float32, 2), sample((2, 5, 4, 6), np.float32, 3)
    w, bias = sample((6, 5), np.float32, 4), sample(6, np.float32, 5)

    @mb.program(input_specs=[mb.TensorSpec(shape=s.shape, dtype=types.fp32) for s in (x, y, a, b)],
                opset_version=getattr(ct.target, opset))
    def prog(x, y, a, b):
        return (mb.linear(x=x, weight=w, bias=bias, name="linear"),
                mb.matmul(x=x, y=y, transpose_y=True, name="matmul"),
                mb.einsum(values=(a, b), equation="nchw,nwhu->nchu", name="einsum"))

    out = helpers.run_mil(prog, {"x": x, "y": y, "a": a, "b": b}, opset=opset)
    f = lambda v: v.astype(np.float64)  # noqa: E731
    refs = {"linear": f(x) @ f(w).T + f(bias), "matmul": f(x) @ np.swapaxes(f(y), -1, -2),
            "einsum": np.einsum("nchw,nwhu->nchu", f(a), f(b))}
    for name, ref in refs.items():
        np.testing.assert_allclose(np.asarray(out[name], np.float64), ref, rtol=1e-5, atol=1e-5,
                                   err_msg=name)
