"""MIL transformer ops (iOS18): scaled_dot_product_attention."""
from __future__ import annotations

import jax.numpy as jnp
from jax import nn

from mljax.errors import OpError
from mljax.ops._registry import register

__all__ = ["scaled_dot_product_attention"]


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
    scale = jnp.asarray(1.0 / (query.shape[-1] ** 0.5), dtype)
    scores = jnp.einsum("...le,...se->...ls", query * scale, key.astype(dtype))
    if attn_mask is not None:
        mask = jnp.asarray(attn_mask)
        if mask.dtype == jnp.bool_:
            scores = jnp.where(mask, scores, jnp.asarray(-jnp.inf, dtype))
        else:
            scores = scores + mask.astype(dtype)
    weights = nn.softmax(scores, axis=-1)
    return jnp.einsum("...ls,...sv->...lv", weights, value.astype(dtype))
