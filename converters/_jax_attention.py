"""``jax.nn.dot_product_attention`` -> the iOS18 fused ``scaled_dot_product_attention`` op.

JAX traces the attention into its decomposition (dot_general, softmax), which exports on every
target.  For iOS18 targets, :func:`marked_attention` wraps ``jax.nn.dot_product_attention``
during tracing so that each call becomes a ``jit`` equation with a recognizable name; the
translator turns it into one MIL op (``[B, T, N, H]`` -> ``[B, N, T, H]``; a boolean mask and
``is_causal`` become a float mask of JAX's large negative value, so fully masked rows stay finite
as in JAX).  Forms the fused op does not take (grouped key/value heads, sequence lengths, local
windows, an explicit implementation) stay decomposed.
"""
from __future__ import annotations

import functools
import re
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np

from converters._jax_rules import Unsupported, _like, _reshape_to, _t, _transpose_to
from mljax.mil.types import TensorType

__all__ = ["MARK", "marked_attention", "fused_attention", "is_marked"]

MARK = "mljax_dot_product_attention"
_MASKED = float(np.finfo(np.float32).min) * 0.7          # JAX's masked score (finite)


@functools.lru_cache(maxsize=None)
def _marked(has_bias: bool, has_mask: bool, is_causal: bool, original):
    def call(query, key, value, *extra):
        it = iter(extra)
        bias = next(it) if has_bias else None
        mask = next(it) if has_mask else None
        return original(query, key, value, bias, mask, is_causal=is_causal)
    call.__name__ = f"{MARK}_b{int(has_bias)}_m{int(has_mask)}_c{int(is_causal)}"
    return jax.jit(call)


@contextmanager
def marked_attention(enabled: bool):
    """While tracing, make each plain ``jax.nn.dot_product_attention`` call a named ``jit``."""
    if not enabled:
        yield
        return
    original = jax.nn.dot_product_attention

    def wrapper(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                implementation=None, **more):
        plain = query_seq_lengths is None and key_value_seq_lengths is None and local_window_size is None \
            and implementation is None and not more and jnp.ndim(query) == 4 \
            and jnp.shape(query)[2] == jnp.shape(key)[2]
        if not plain:
            return original(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                            query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, implementation=implementation, **more)
        if scale is not None:        # the fused op scales by 1/sqrt(H): fold the rest into the query
            query = query * jnp.asarray(scale * np.sqrt(jnp.shape(query)[-1]), jnp.result_type(query))
        extra = [a for a in (bias, mask) if a is not None]
        return _marked(bias is not None, mask is not None, bool(is_causal), original)(query, key, value, *extra)

    jax.nn.dot_product_attention = wrapper
    try:
        yield
    finally:
        jax.nn.dot_product_attention = original


def is_marked(eqn) -> bool:
    return str(eqn.params.get("name", "")).startswith(MARK)


def _to_heads_first(t, atom):
    x = t.read(atom)
    return _transpose_to(t, x, [0, 2, 1, 3])


def _score_mask(t, atom):
    """A [B?, N?, T, S] operand (bias or mask) at rank 4."""
    x = t.read(atom)
    rank = len(x.type.shape)
    if rank > 4:
        raise Unsupported("an attention bias/mask of rank > 4")
    return _reshape_to(t, x, [1] * (4 - rank) + list(x.type.shape))


def fused_attention(t, eqn) -> list | None:
    """The MIL op for a marked call, or None (then the call is inlined)."""
    found = re.fullmatch(MARK + r"_b([01])_m([01])_c([01])", str(eqn.params.get("name", "")))
    if found is None:
        return None
    flags = dict(zip("bmc", found.groups()))
    q_atom, k_atom, v_atom, *extra = eqn.invars
    if not q_atom.aval.dtype == k_atom.aval.dtype == v_atom.aval.dtype or q_atom.aval.dtype.kind != "f":
        return None
    q, k, v = (_to_heads_first(t, a) for a in (q_atom, k_atom, v_atom))
    b_, n_, tq, _ = q.type.shape
    s_ = k.type.shape[2]
    dtype = q.type.dtype
    it = iter(extra)
    bias = _score_mask(t, next(it)) if flags["b"] == "1" else None
    keep = None
    if flags["m"] == "1":
        keep = _score_mask(t, next(it))
    if flags["c"] == "1":
        causal = t.b.const(np.tril(np.ones((tq, s_), bool))[None, None], name="causal_mask")
        if keep is None:
            keep = causal
        else:
            both = np.broadcast_shapes(keep.type.shape, causal.type.shape)
            keep = t.b.op("logical_and", _t("bool", both), x=keep, y=causal)
    mask = bias
    if keep is not None:
        # (1 - keep) * masked: a select of two scalars would be typed as a scalar by coremltools
        dropped = t.b.op("cast", _tensor(dtype, keep.type.shape), x=t.b.op("logical_not", keep.type, x=keep),
                         dtype=dtype.name)
        penalty = t.b.op("mul", dropped.type, x=dropped, y=np.asarray(_MASKED, dtype.numpy))
        if mask is None:
            mask = penalty
        else:
            both = np.broadcast_shapes(mask.type.shape, penalty.type.shape)
            mask = t.b.op("add", _tensor(dtype, both), x=mask, y=penalty)
    y = t.b.op("scaled_dot_product_attention", _like(q, (b_, n_, tq, v.type.shape[-1])),
               query=q, key=k, value=v, attn_mask=mask)
    return [_transpose_to(t, y, [0, 2, 1, 3])]


def _tensor(dtype, shape) -> TensorType:
    return TensorType(dtype, tuple(int(d) for d in shape))
