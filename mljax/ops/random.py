"""MIL random ops: random_bernoulli, random_categorical, random_normal, random_uniform.

Samples come from ``jax.random`` (threefry), so they follow the same distributions as Core ML's
but are not bit-identical to it.  ``seed >= 0`` gives the same values on every call;
``seed == -1`` (the default) draws fresh values per call, as Core ML does: from ``ctx.rng``
when the lowering sets it, else from the call key of :func:`call_key_scope` (``MLModel``
passes one per prediction as an argument of the jitted function, see :func:`with_call_key`),
else from a key fixed per op at trace time (values then repeat across calls of one compiled
function).  ``shape`` must be known before tracing.
"""
from __future__ import annotations

import contextlib
import contextvars
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from mljax.errors import OpError
from mljax.ops._registry import register

__all__ = ["random_bernoulli", "random_categorical", "random_normal", "random_uniform",
           "CALL_KEY_INPUT", "call_key_scope", "uses_call_key", "with_call_key"]

#: The name under which a stage function wrapped by :func:`with_call_key` takes its call key.
CALL_KEY_INPUT = "__mljax_random_call_key__"
_CALL_KEY: contextvars.ContextVar = contextvars.ContextVar("mljax_random_call_key", default=None)
_RANDOM_OPS = frozenset(("random_bernoulli", "random_categorical", "random_normal", "random_uniform"))


@contextlib.contextmanager
def call_key_scope(key):
    """Inside this scope, random ops with ``seed=-1`` draw from ``key`` (a raw uint32[2] PRNG
    key, possibly a tracer) folded with the op's name."""
    token = _CALL_KEY.set(key)
    try:
        yield
    finally:
        _CALL_KEY.reset(token)


def with_call_key(fn):
    """A stage function ``(weights, inputs, states)`` that takes its call key as the input
    ``CALL_KEY_INPUT`` (so a jitted caller passes a fresh key per call without retracing);
    called without one, it runs as ``fn``."""
    def run(weights, inputs, states):
        inputs = dict(inputs)
        key = inputs.pop(CALL_KEY_INPUT, None)
        if key is None:
            return fn(weights, inputs, states)
        with call_key_scope(key):
            return fn(weights, inputs, states)
    return run


def uses_call_key(function) -> bool:
    """Whether a MIL function has random ops that draw fresh values per call (``seed == -1``)."""
    for op in function.block.walk():
        if op.type in _RANDOM_OPS:
            seed = op.input("seed")
            value = op.attributes.get("seed", -1) if seed is None else seed.value
            if value is None or int(np.asarray(value)) < 0:
                return True
    return False


def _key(seed, ctx):
    """The PRNG key for one op: from ``seed`` when >= 0, else ctx's per-call key."""
    seed = int(seed)
    if seed >= 0:
        return jax.random.PRNGKey(seed)
    name = getattr(ctx, "name", "") or ""
    salt = zlib.crc32(name.encode())
    rng = getattr(ctx, "rng", None)
    if rng is None:
        rng = _CALL_KEY.get()
    if rng is not None:
        return jax.random.fold_in(rng, salt)
    return jax.random.fold_in(jax.random.PRNGKey(np.random.SeedSequence().entropy % (2**31)), salt)


def _shape(shape, op: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in np.atleast_1d(np.asarray(shape)))
    if any(d < 0 for d in dims):
        raise OpError(f"{op}: shape must have non-negative dims; found {list(dims)}")
    return dims


def _out_dtype(ctx, default=jnp.float32):
    """The declared output dtype (the lowering casts to it anyway) as a JAX float dtype."""
    types = getattr(ctx, "output_types", ()) or ()
    if types and getattr(types[0], "dtype", None) is not None and types[0].dtype.is_float:
        return jax.dtypes.canonicalize_dtype(types[0].dtype.numpy)
    return default


@register("random_bernoulli")
def random_bernoulli(*, shape, prob=0.5, seed=-1, ctx=None):
    """1 with probability ``prob``, else 0, as floats of ``prob``'s dtype."""
    sample = jax.random.bernoulli(_key(seed, ctx), float(prob), _shape(shape, "random_bernoulli"))
    return sample.astype(_out_dtype(ctx))


@register("random_categorical")
def random_categorical(x, *, mode="logits", size=1, seed=-1, ctx=None):
    """``size`` draws (with replacement) of a class index per distribution on ``x``'s last axis.

    ``mode="probs"`` takes ``x`` as probabilities (their log is used as logits).  The indices
    are returned as ``x``'s float dtype, shape ``x.shape[:-1] + [size]``.
    """
    x = jnp.asarray(x)
    if mode == "logits":
        logits = x.astype(jnp.float32)
    elif mode == "probs":
        logits = jnp.log(x.astype(jnp.float32))
    else:
        raise OpError(f"random_categorical: mode must be 'logits' or 'probs'; found {mode!r}")
    size = int(size)
    draws = jax.random.categorical(_key(seed, ctx), logits, axis=-1, shape=(size, *x.shape[:-1]))
    return jnp.moveaxis(draws, 0, -1).astype(x.dtype)


@register("random_normal")
def random_normal(*, shape, mean=0.0, stddev=1.0, seed=-1, ctx=None):
    """Normal samples ``mean + stddev * N(0, 1)``."""
    dtype = _out_dtype(ctx)
    z = jax.random.normal(_key(seed, ctx), _shape(shape, "random_normal"), jnp.float32)
    return (float(mean) + float(stddev) * z).astype(dtype)


@register("random_uniform")
def random_uniform(*, shape, low=0.0, high=1.0, seed=-1, ctx=None):
    """Uniform samples on ``[low, high)``; ``low`` everywhere when ``high == low``."""
    dtype = _out_dtype(ctx)
    u = jax.random.uniform(_key(seed, ctx), _shape(shape, "random_uniform"), jnp.float32)
    return (float(low) + (float(high) - float(low)) * u).astype(dtype)
