"""Normalization ops against PyTorch / NumPy references, over ranks and dtypes."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from mljax.errors import OpError
from mljax.ops._registry import lookup

TOL = {np.float32: dict(rtol=1e-4, atol=1e-5), np.float16: dict(rtol=1e-2, atol=1e-2)}
DTYPES = (np.float32, np.float16)


def run(op, opset, *args, **static):
    """Call the registered implementation inside ``jax.jit`` (as the lowering does)."""
    fn = lookup(op, opset).fn
    return np.asarray(jax.jit(lambda *a: fn(*a, **static))(*args))


def check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    np.testing.assert_allclose(out.astype(np.float64), ref, **TOL[dtype])


def sample(shape, dtype, seed=0, scale=2.0, shift=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale + shift).astype(dtype)


def t64(a):
    return None if a is None else torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 3, 2, 3, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_matches_torch(dtype, shape, with_affine):
    x = sample(shape, dtype)
    mean, var = sample(3, dtype, 1), np.abs(sample(3, dtype, 2)) + 0.1
    gamma, beta = (sample(3, dtype, 3), sample(3, dtype, 4)) if with_affine else (None, None)
    ref = torch.nn.functional.batch_norm(t64(x), t64(mean), t64(var), t64(gamma), t64(beta),
                                         training=False, eps=1e-3).numpy()
    check(run("batch_norm", 17, x, mean, var, gamma, beta, epsilon=1e-3), ref, dtype)


def test_batch_norm_params_of_another_dtype():
    """iOS17: fp32 statistics for an fp16 x; the output stays fp16."""
    x = sample((2, 3, 4), np.float16)
    mean, var = sample(3, np.float32, 1), np.abs(sample(3, np.float32, 2)) + 0.1
    ref = torch.nn.functional.batch_norm(t64(x), t64(mean), t64(var), training=False).numpy()
    check(run("batch_norm", 17, x, mean, var), ref, np.float16)


@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_matches_torch(dtype, shape, with_affine):
    x = sample(shape, dtype)
    gamma, beta = (sample(3, dtype, 3), sample(3, dtype, 4)) if with_affine else (None, None)
    ref = torch.nn.functional.instance_norm(t64(x), weight=t64(gamma), bias=t64(beta),
                                            eps=1e-5).numpy()
    check(run("instance_norm", 17, x, gamma, beta), ref, dtype)


def _np_l2_norm(x, eps):
    lead = x.shape[:-3]
    flat = x.reshape(int(np.prod(lead)) if lead else 1, -1)
    out = flat / np.sqrt(np.sum(flat * flat, axis=1, keepdims=True) + eps)
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5), (2, 2, 3, 2, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_norm_over_last_three_axes(dtype, shape):
    x = sample(shape, dtype)
    check(run("l2_norm", 17, x, epsilon=1e-4), _np_l2_norm(x.astype(np.float64), 1e-4), dtype)


def test_l2_norm_default_epsilon_and_rank_check():
    x = sample((2, 2, 2), np.float32)
    check(run("l2_norm", 15, x), _np_l2_norm(x.astype(np.float64), 1e-6), np.float32)
    with pytest.raises(OpError, match="rank >= 3"):
        run("l2_norm", 15, np.ones((2, 2), np.float32))


def _np_layer_norm(x, axes, gamma, beta, eps):
    axes = tuple(a % x.ndim for a in axes)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    pshape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if gamma is not None:
        y = y * gamma.reshape(pshape)
    if beta is not None:
        y = y + beta.reshape(pshape)
    return y


@pytest.mark.parametrize("with_affine", [False, True])
@pytest.mark.parametrize("axes", [[-1], [2, 3], [1, 3], [0, 1, 2, 3]], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype, axes, with_affine):
    x = sample((2, 3, 4, 5), dtype)
    pshape = [x.shape[a] for a in sorted(a % 4 for a in axes)]
    gamma, beta = (sample(pshape, dtype, 3), sample(pshape, dtype, 4)) if with_affine else (None, None)
    f64 = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    ref = _np_layer_norm(x.astype(np.float64), axes, f64(gamma), f64(beta), 1e-5)
    check(run("layer_norm", 17, x, gamma, beta, axes=axes), ref, dtype)


def test_layer_norm_matches_torch_and_defaults_to_all_axes():
    x = sample((3, 4, 6), np.float32)
    gamma, beta = sample((4, 6), np.float32, 3), sample((4, 6), np.float32, 4)
    ref = torch.nn.functional.layer_norm(t64(x), (4, 6), t64(gamma), t64(beta), eps=1e-5).numpy()
    check(run("layer_norm", 15, x, gamma, beta, axes=[-2, -1]), ref, np.float32)
    check(run("layer_norm", 15, x), _np_layer_norm(x.astype(np.float64), [0, 1, 2], None, None, 1e-5),
          np.float32)


def test_layer_norm_rejects_wrong_gamma_shape():
    with pytest.raises(OpError, match="gamma"):
        run("layer_norm", 15, np.ones((2, 3), np.float32), np.ones(2, np.float32), axes=[-1])


def test_local_response_norm_matches_coremltools_reference_values():
    """coremltools' smoke-test values: a rank-3 input normalizes across axis -3 (= axis 0)."""
    x = np.array([[[1.0, -7.0], [5.0, -6.0], [-3.0, -5.0]]], np.float32)
    expected = np.array([[[0.99996257, -6.98716545], [4.99531746, -5.99191284],
                          [-2.99898791, -4.99531746]]])
    check(run("local_response_norm", 15, x, size=2), expected, np.float32)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_local_response_norm_rank4_matches_torch(dtype, size):
    x = sample((2, 6, 3, 4), dtype, scale=3.0)
    lrn = torch.nn.LocalResponseNorm(size, alpha=0.01, beta=0.75, k=2.0)
    ref = lrn(t64(x)).numpy()
    check(run("local_response_norm", 17, x, size=size, alpha=0.01, beta=0.75, k=2.0), ref, dtype)


def test_local_response_norm_rank5_uses_axis_minus_3():
    x = sample((2, 2, 5, 3, 3), np.float32, scale=3.0)
    lrn = torch.nn.LocalResponseNorm(3, alpha=0.1)
    merged = x.reshape(4, 5, 3, 3)  # leading axes are batch
    ref = lrn(t64(merged)).numpy().reshape(x.shape)
    check(run("local_response_norm", 17, x, size=3, alpha=0.1), ref, np.float32)


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm", "l2_norm", "layer_norm",
                                "local_response_norm"])
def test_one_implementation_serves_all_opsets(op):
    fns = {lookup(op, opset).fn for opset in (15, 16, 17, 18)}
    assert len(fns) == 1 and None not in fns


# -------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("opset, fp16", [("iOS15", False), ("iOS17", True)])
def test_e2e_all_normalizations_in_one_model(opset, fp16):
    helpers = pytest.importorskip("helpers")
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    x = sample((2, 3, 4, 5), np.float32)
    mean, var = sample(3, np.float32, 1), np.abs(sample(3, np.float32, 2)) + 0.1
    gamma, beta = sample(3, np.float32, 3), sample(3, np.float32, 4)
    ln_gamma, ln_beta = sample((4, 5), np.float32, 5), sample((4, 5), np.float32, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)],
                opset_version=getattr(ct.target, opset))
    def prog(x):
        return (mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta,
                              epsilon=1e-3, name="bn"),
                mb.instance_norm(x=x, gamma=gamma, beta=beta, name="inorm"),
                mb.l2_norm(x=x, name="l2"),
                mb.layer_norm(x=x, axes=[2, 3], gamma=ln_gamma, beta=ln_beta, name="ln"),
                mb.local_response_norm(x=x, size=3, alpha=0.1, beta=0.75, k=2.0, name="lrn"))

    out = helpers.run_mil(prog, {"x": x}, opset=opset, fp16=fp16)
    F = torch.nn.functional
    refs = {
        "bn": F.batch_norm(t64(x), t64(mean), t64(var), t64(gamma), t64(beta), eps=1e-3),
        "inorm": F.instance_norm(t64(x), weight=t64(gamma), bias=t64(beta)),
        "l2": t64(_np_l2_norm(x.astype(np.float64), 1e-6)),
        "ln": F.layer_norm(t64(x), (4, 5), t64(ln_gamma), t64(ln_beta)),
        "lrn": torch.nn.LocalResponseNorm(3, alpha=0.1, beta=0.75, k=2.0)(t64(x)),
    }
    tol = dict(rtol=2e-2, atol=2e-2) if fp16 else dict(rtol=1e-4, atol=1e-5)
    for name, ref in refs.items():
        np.testing.assert_allclose(np.asarray(out[name], np.float64), ref.numpy(), **tol,
                                   err_msg=name)
