"""Activation ops against NumPy/PyTorch references, over dtypes."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from mljax.errors import OpError
from mljax.ops._registry import lookup

# Every activation has one implementation for iOS15-iOS18 (the iOS17 versions only widen the
# parameter dtypes); numeric tests run at iOS17, test_one_implementation_serves_all_opsets
# checks the lookup.
OPSET = 17
DTYPES = (np.float32, np.float16)
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float16: dict(rtol=5e-3, atol=5e-3)}


def run(op, opset, *args, **static):
    """Call the registered implementation inside ``jax.jit`` (as the lowering does)."""
    fn = lookup(op, opset).fn
    return np.asarray(jax.jit(lambda *a: fn(*a, **static))(*args))


def sample(shape, dtype, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def check(out, ref, dtype):
    assert out.dtype == dtype, f"dtype {out.dtype}, expected {dtype}"
    np.testing.assert_allclose(out.astype(np.float64), ref, **TOL[dtype])


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


_erf = np.vectorize(math.erf)

# op -> (static kwargs, float64 NumPy reference)
ELEMENTWISE = {
    "relu": ({}, lambda x: np.maximum(x, 0)),
    "relu6": ({}, lambda x: np.minimum(np.maximum(x, 0), 6)),
    "sigmoid": ({}, _sigmoid),
    "silu": ({}, lambda x: x * _sigmoid(x)),
    "softplus": ({}, lambda x: np.log1p(np.exp(x))),
    "softsign": ({}, lambda x: x / (1 + np.abs(x))),
    "leaky_relu": ({"alpha": 0.2}, lambda x: np.where(x >= 0, x, 0.2 * x)),
    "elu": ({"alpha": 1.5}, lambda x: np.where(x > 0, x, 1.5 * (np.exp(x) - 1))),
    "thresholded_relu": ({"alpha": 0.5}, lambda x: np.where(x >= 0.5, x, 0)),
    "clamped_relu": ({"alpha": 0.1, "beta": 2.0},
                     lambda x: np.minimum(np.where(x >= 0, x, 0.1 * x), 2.0)),
    "linear_activation": ({"alpha": -1.5, "beta": 0.25}, lambda x: -1.5 * x + 0.25),
    "scaled_tanh": ({"alpha": 2.0, "beta": 0.5}, lambda x: 2.0 * np.tanh(0.5 * x)),
    "sigmoid_hard": ({"alpha": 0.2, "beta": 0.5}, lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    "gelu": ({"mode": "EXACT"}, lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", sorted(ELEMENTWISE))
def test_elementwise_activation(op, dtype):
    static, ref = ELEMENTWISE[op]
    x = sample((2, 3, 5), dtype, seed=len(op))
    check(run(op, OPSET, x, **static), ref(x.astype(np.float64)), dtype)


def test_params_of_another_dtype_keep_x_dtype():
    """iOS17: alpha/beta may be fp32 for an fp16 x; the output stays fp16."""
    x = sample((4, 4), np.float16)
    out = run("clamped_relu", 17, x, alpha=np.float32(0.1), beta=np.float32(2.0))
    check(out, np.minimum(np.where(x >= 0, x, 0.1 * x.astype(np.float64)), 2.0), np.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION"])
def test_gelu_modes_match_torch(mode, dtype):
    x = sample((3, 7), dtype, seed=1)
    t = torch.from_numpy(x.astype(np.float64))
    if mode == "EXACT":
        ref = torch.nn.functional.gelu(t)
    elif mode == "TANH_APPROXIMATION":
        ref = torch.nn.functional.gelu(t, approximate="tanh")
    else:
        ref = t * torch.sigmoid(1.702 * t)
    check(run("gelu", 15, x, mode=mode), ref.numpy(), dtype)


def test_gelu_rejects_unknown_mode():
    with pytest.raises(OpError, match="EXACT"):
        run("gelu", 15, np.ones(3, np.float32), mode="ERF")


def test_softplus_is_stable_for_large_inputs():
    x = np.array([-100.0, 0.0, 100.0], np.float32)
    np.testing.assert_allclose(run("softplus", 15, x), [0.0, math.log(2), 100.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(axis, dtype):
    x = sample((3, 4, 5), dtype)
    ref = torch.softmax(torch.from_numpy(x.astype(np.float64)), dim=axis).numpy()
    check(run("softmax", OPSET, x, axis=axis), ref, dtype)


def test_softmax_default_axis_is_last():
    x = sample((2, 6), np.float32)
    ref = torch.softmax(torch.from_numpy(x.astype(np.float64)), dim=-1).numpy()
    check(run("softmax", 15, x), ref, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 3, 4, 5), (2, 3, 2, 2, 2)])
def test_prelu_matches_torch(shape, dtype):
    x = sample(shape, dtype)
    alpha = np.array([0.1, -0.5, 2.0], dtype)
    ref = torch.nn.functional.prelu(torch.from_numpy(x.astype(np.float64)),
                                    torch.from_numpy(alpha.astype(np.float64))).numpy()
    check(run("prelu", OPSET, x, alpha), ref, dtype)


def test_prelu_rejects_wrong_alpha_length():
    with pytest.raises(OpError, match="length 3"):
        run("prelu", 15, np.ones((1, 3, 4), np.float32), np.ones(4, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softplus_parametric(dtype):
    x = sample((2, 3, 4, 2), dtype, scale=1.0)
    alpha = np.array([1.0, 0.5, 2.0], dtype)
    beta = np.array([1.0, -1.0, 0.5], dtype)
    x64, a, b = x.astype(np.float64), alpha.reshape(1, 3, 1, 1), beta.reshape(1, 3, 1, 1)
    ref = a * np.log1p(np.exp(b * x64))
    check(run("softplus_parametric", OPSET, x, alpha, beta), ref, dtype)


ALL_OPS = sorted(set(ELEMENTWISE) | {"softmax", "prelu", "softplus_parametric"})


@pytest.mark.parametrize("op", ALL_OPS)
def test_one_implementation_serves_all_opsets(op):
    fns = {lookup(op, opset).fn for opset in (15, 16, 17, 18)}
    assert len(fns) == 1 and None not in fns


# -------------------------------------------------------------------------- end to end
def _e2e(prog, inputs, opset, fp16=False):
    helpers = pytest.importorskip("helpers")
    return helpers.run_mil(prog, inputs, opset=opset, fp16=fp16)


E2E_OPS = ["relu", "relu6", "sigmoid", "silu", "softplus", "softsign", "leaky_relu", "elu",
           "thresholded_relu", "clamped_relu", "linear_activation", "scaled_tanh", "sigmoid_hard",
           "gelu"]


@pytest.mark.parametrize("opset, fp16", [("iOS15", False), ("iOS17", True)])
def test_e2e_all_activations_in_one_model(opset, fp16):
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    x = sample((2, 3, 2, 2), np.float32, seed=7)  # prelu: rank 4 for per-channel alpha
    alpha, beta = np.array([0.1, -0.5, 2.0], np.float32), np.array([1.0, 0.5, -1.0], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)],
                opset_version=getattr(ct.target, opset))
    def prog(x):
        outs = [getattr(mb, op)(x=x, **ELEMENTWISE[op][0], name=op) for op in E2E_OPS]
        outs.append(mb.softmax(x=x, axis=1, name="softmax"))
        outs.append(mb.prelu(x=x, alpha=alpha, name="prelu"))
        outs.append(mb.softplus_parametric(x=x, alpha=alpha, beta=beta, name="softplus_parametric"))
        return tuple(outs)

    out = _e2e(prog, {"x": x}, opset, fp16)
    x64 = x.astype(np.float64)
    a, b = alpha.reshape(1, 3, 1, 1), beta.reshape(1, 3, 1, 1)
    refs = {op: ELEMENTWISE[op][1](x64) for op in E2E_OPS}
    refs["softmax"] = torch.softmax(torch.from_numpy(x64), dim=1).numpy()
    refs["prelu"] = np.where(x64 > 0, x64, a * x64)
    refs["softplus_parametric"] = a * np.log1p(np.exp(b * x64))
    tol = dict(rtol=2e-2, atol=2e-2) if fp16 else dict(rtol=1e-5, atol=1e-5)
    for name, ref in refs.items():
        np.testing.assert_allclose(np.asarray(out[name], np.float64), ref, **tol, err_msg=name)
