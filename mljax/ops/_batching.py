"""A batching rule shared by ops whose best form depends on the batch: a list predict's ``vmap``
folds its samples into the op's own batch axis instead of mapping the op."""
from __future__ import annotations

import jax
from jax.custom_batching import custom_vmap

__all__ = ["folding_batch"]


def folding_batch(plain, at_folded_batch, derivatives: bool = True):
    """``plain(x, *rest)`` (``x`` batch-major), whose ``vmap`` over ``x`` alone folds the mapped
    axis into ``x``'s batch and calls ``at_folded_batch`` (which may pick another path for the
    larger batch); a vmap over other arguments maps ``plain``.  Reverse-mode derivatives come
    from ``plain`` (``custom_vmap`` has none of its own), or none with ``derivatives=False``."""
    @custom_vmap
    def folded(*args):
        return plain(*args)

    @folded.def_vmap
    def _rule(axis_size, in_batched, x, *rest):
        if in_batched[0] and not any(in_batched[1:]):
            y = at_folded_batch(x.reshape((-1,) + x.shape[2:]), *rest)
            return y.reshape((axis_size, -1) + y.shape[1:]), True
        return jax.vmap(plain, in_axes=tuple(0 if b else None for b in in_batched))(x, *rest), True

    if not derivatives:
        return folded

    @jax.custom_vjp
    def fn(*args):
        return folded(*args)

    fn.defvjp(lambda *args: (folded(*args), args), lambda res, ct: jax.vjp(plain, *res)[1](ct))
    return fn
