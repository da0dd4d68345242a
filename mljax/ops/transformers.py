"""MIL transformer ops (iOS18): scaled_dot_product_attention; and the internal op
``mljax.attention``, the same computation recognised in older programs by the graph pass
:func:`mljax.optimize.passes.fuse_attention`."""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax, nn

from mljax.errors import OpError
from mljax.ops._registry import register, register_internal

__all__ = ["scaled_dot_product_attention", "attention"]


@register("scaled_dot_product_attention", "iOS18")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    """``softmax(Q K^T / sqrt(E) + mask) V`` over ``[B, *?, L|S, E]`` tensors (torch's SDPA).

    A bool ``attn_mask`` marks the positions that take part (False -> ``-inf``); a float mask
    is added to the scores.  No dropout and no ``is_causal`` (MIL has neither).
    """
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    if not query.ndim == key.ndim == value.ndim or query.ndim < 3:
        raise OpError(f"scaled_dot_product_attention: query, key, value must share a rank >= 3; "
                      f"found shapes {query.shape}, {key.shape}, {value.shape}")
    dtype = query.dtype
    return _attention(query, key.astype(dtype), value.astype(dtype), attn_mask, 1.0 / math.sqrt(query.shape[-1]))


@register_internal("mljax.attention")
def attention(x, y, value, mask=None, *, transpose_x=False, transpose_y=False, transpose_value=False, scale=1.0):
    """``matmul(softmax(scale * matmul(x, y) + mask), value)``, each ``matmul`` with MIL's
    transpose flags (``transpose_x``/``transpose_y`` for the scores, ``transpose_value`` for the
    value): the chain a converted ``torch`` attention writes, which
    :func:`mljax.optimize.passes.fuse_attention` replaces by this op."""
    x, y, value = jnp.asarray(x), jnp.asarray(y), jnp.asarray(value)
    swap = lambda a: jnp.swapaxes(a, -1, -2)   # noqa: E731
    query = swap(x) if transpose_x else x                   # [..., L, E]
    key = y if transpose_y else swap(y)                     # [..., S, E]
    return _attention(query, key, swap(value) if transpose_value else value, mask, float(scale))


def _attention(query, key, value, mask, scale: float):
    """``softmax(scale * Q K^T + mask) V`` for ``query [..., L, E]``, ``key [..., S, E]``,
    ``value [..., S, Ev]`` (leading axes broadcasting as in ``matmul``).

    The scale multiplies the query (``[L, E]``, not the ``[L, S]`` scores).  Where the leading
    axes agree they are flattened into one, so that XLA:CPU sees a product with one batch axis
    and no size-1 axes: with a list predict's sample axis beside a program's batch of 1, XLA
    copied the scores into another order of the size-1 axis between the two products, and its
    library ran them as two fusions instead of one.  In fp32 the softmax is normalized after the
    second product (``(e V) / sum(e)`` with ``e = exp(s - max s)``: the division over ``[L, Ev]``
    instead of ``[L, S]``); in lower precision the weights are normalized first, as the unfused
    chain does, since ``e V`` can exceed fp16's range.
    """
    mask = None if mask is None else jnp.asarray(mask)
    lead = jnp.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2],
                                () if mask is None else mask.shape[:-2])
    L, S = query.shape[-2], key.shape[-2]
    flat = query.shape[:-2] == key.shape[:-2] == value.shape[:-2] == lead and len(lead) != 1
    if flat:
        n = math.prod(lead)
        query, key, value = (a.reshape((n,) + a.shape[-2:]) for a in (query, key, value))
    scores = jnp.einsum("...le,...se->...ls", query * jnp.asarray(scale, query.dtype), key)
    if mask is not None:
        if flat:
            mask = jnp.broadcast_to(mask, lead + (L, S)).reshape((-1, L, S))
        scores = (jnp.where(mask, scores, jnp.asarray(-jnp.inf, scores.dtype)) if mask.dtype == jnp.bool_
                  else scores + mask.astype(scores.dtype))
    if scores.dtype == jnp.float32:
        e = jnp.exp(scores - lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        out = jnp.einsum("...ls,...sv->...lv", e, value) / e.sum(axis=-1, keepdims=True)
    else:
        out = jnp.einsum("...ls,...sv->...lv", nn.softmax(scores, axis=-1), value)
    return out.reshape(lead + out.shape[-2:]) if flat else out
