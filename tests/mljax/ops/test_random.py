"""random_* ops: shapes, dtypes, seeding and sample statistics."""
from __future__ import annotations

import numpy as np
import pytest

from mljax.mil.types import TensorType, dtype_from_name
from mljax.ops import random as rnd
from mljax.ops._registry import OpContext

N = 200_000


def _ctx(dtype="fp32", name="op"):
    return OpContext("random", name, 15, output_types=(TensorType(dtype_from_name(dtype), None),))


@pytest.mark.parametrize("prob", [0.1, 0.5, 0.85])
def test_bernoulli_statistics(prob):
    s = np.asarray(rnd.random_bernoulli(shape=np.array([N // 100, 100]), prob=prob, seed=3))
    assert s.shape == (N // 100, 100)
    assert set(np.unique(s)) <= {0.0, 1.0}
    assert abs(s.mean() - prob) < 5 * np.sqrt(prob * (1 - prob) / N)
    assert abs(s.var() - prob * (1 - prob)) < 0.01


@pytest.mark.parametrize("mean,stddev", [(0.0, 1.0), (3.0, 0.5), (-2.0, 4.0)])
def test_normal_statistics(mean, stddev):
    s = np.asarray(rnd.random_normal(shape=np.array([N]), mean=mean, stddev=stddev, seed=5))
    assert s.shape == (N,)
    assert abs(s.mean() - mean) < 5 * stddev / np.sqrt(N)
    assert abs(s.std() / stddev - 1) < 0.01
    # roughly 68% within one sigma
    assert abs(np.mean(np.abs(s - mean) < stddev) - 0.6827) < 0.01


@pytest.mark.parametrize("low,high", [(0.0, 1.0), (-3.0, 5.0), (2.0, 2.0)])
def test_uniform_statistics(low, high):
    s = np.asarray(rnd.random_uniform(shape=np.array([4, N // 4]), low=low, high=high, seed=7))
    assert s.shape == (4, N // 4)
    if high == low:
        np.testing.assert_array_equal(s, low)
        return
    assert s.min() >= low and s.max() < high
    width = high - low
    assert abs(s.mean() - (low + high) / 2) < 5 * width / np.sqrt(12 * N)
    assert abs(s.var() - width ** 2 / 12) < 0.02 * width ** 2 / 12


@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_categorical_statistics(mode):
    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]], np.float32)
    x = np.log(probs) if mode == "logits" else probs
    s = np.asarray(rnd.random_categorical(x, mode=mode, size=N // 4, seed=11))
    assert s.shape == (2, N // 4) and s.dtype == np.float32
    for row, p in zip(s, probs):
        freq = np.bincount(row.astype(int), minlength=3) / row.size
        np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(0.25 / row.size))


def test_seeding():
    a = np.asarray(rnd.random_normal(shape=[100], seed=1))
    b = np.asarray(rnd.random_normal(shape=[100], seed=1))
    c = np.asarray(rnd.random_normal(shape=[100], seed=2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # seed -1 with no per-call key: two ops in one program still differ from each other
    d = np.asarray(rnd.random_uniform(shape=[100], ctx=_ctx(name="a")))
    e = np.asarray(rnd.random_uniform(shape=[100], ctx=_ctx(name="b")))
    assert not np.allclose(d, e)


def test_seed_minus_one_uses_ctx_rng():
    import jax
    ctx = _ctx()
    ctx.rng = jax.random.PRNGKey(0)
    a = np.asarray(rnd.random_normal(shape=[50], ctx=ctx))
    ctx.rng = jax.random.PRNGKey(1)
    b = np.asarray(rnd.random_normal(shape=[50], ctx=ctx))
    assert not np.allclose(a, b)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_declared_dtype(dtype):
    s = rnd.random_uniform(shape=[3, 2], seed=0, ctx=_ctx(dtype))
    assert np.asarray(s).dtype == dtype_from_name(dtype).numpy


def test_e2e_random_uniform():
    import coremltools as ct  # noqa: F401
    from coremltools.converters.mil.mil import Builder as mb, types
    from tests.helpers import only, run_mil, target

    @mb.program(input_specs=[mb.TensorSpec((1000, 10), types.fp32)], opset_version=target("iOS17"))
    def prog(x):
        return mb.add(x=x, y=mb.random_uniform(shape=np.array([1000, 10], np.int32), low=1.0,
                                                high=3.0, seed=4))

    out = only(run_mil(prog, {"x": np.zeros((1000, 10), np.float32)}))
    assert out.shape == (1000, 10)
    assert out.min() >= 1.0 and out.max() < 3.0
    assert abs(out.mean() - 2.0) < 0.03


def test_call_key_scope_draws_per_key_and_seeds_ignore_it():
    import jax

    def with_key(k, seed=-1, name="op"):
        with rnd.call_key_scope(np.array([5, k], np.uint32)):
            return np.asarray(jax.jit(lambda: rnd.random_uniform(
                shape=np.array([64]), seed=seed, ctx=_ctx(name=name)))())
    a, b, a2 = with_key(1), with_key(2), with_key(1)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, with_key(1, name="other"))    # each op its own stream
    np.testing.assert_array_equal(with_key(1, seed=4), with_key(2, seed=4))


def test_with_call_key_takes_the_key_as_an_input():
    import jax

    def stage_fn(weights, inputs, states):
        return {"u": rnd.random_normal(shape=np.array([8]), seed=-1, ctx=_ctx())}, states

    run = jax.jit(rnd.with_call_key(stage_fn))
    one = run({}, {rnd.CALL_KEY_INPUT: np.array([0, 1], np.uint32)}, {})[0]["u"]
    two = run({}, {rnd.CALL_KEY_INPUT: np.array([0, 2], np.uint32)}, {})[0]["u"]
    assert not np.array_equal(np.asarray(one), np.asarray(two))
