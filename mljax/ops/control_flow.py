"""Control flow: cond, while_loop, select as lax control flow (the list ops are in mljax.ops.list)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mljax.errors import OpError
from mljax.mil.types import ListType
from mljax.ops._registry import register
from mljax.ops.list import is_list, list_cond, list_while_loop


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


@register("cond")
def cond(pred, *, ctx):
    """Run ``_true_fn`` or ``_false_fn``; a concrete predicate picks the branch at trace time."""
    true_fn, false_fn = ctx.blocks
    if _concrete(pred):
        return true_fn() if bool(jnp.asarray(pred).reshape(())) else false_fn()
    if any(isinstance(t, ListType) for t in ctx.output_types):
        return list_cond(jnp.asarray(pred).reshape(()), true_fn, false_fn)
    return lax.cond(jnp.asarray(pred).reshape(()), lambda: true_fn(), lambda: false_fn())


@register("while_loop")
def while_loop(*loop_vars, ctx):
    """``_cond`` and ``_body`` blocks over ``loop_vars``; shapes must stay fixed (lax.while_loop).

    Loops over MIL lists go through :func:`mljax.ops.list.list_while_loop`."""
    cond_fn, body_fn = ctx.blocks
    if any(is_list(v) for v in loop_vars):
        return list_while_loop(cond_fn, body_fn, loop_vars)
    init = tuple(jnp.asarray(v) for v in loop_vars)

    def body(vals):
        out = body_fn(*vals)
        return tuple(jnp.asarray(o).astype(v.dtype) for o, v in zip(out, vals))

    def check(vals):
        return jnp.asarray(cond_fn(*vals)[0]).reshape(())

    for v, o in zip(init, jax.eval_shape(body, init)):
        if v.shape != o.shape:
            raise OpError(f"while_loop body changes a loop variable's shape from {v.shape} to "
                          f"{o.shape}; only fixed-shape loops are supported")
    return lax.while_loop(check, body, init)


@register("select")
def select(cond, a, b):
    """Elementwise ``a if cond else b`` with broadcasting."""
    return jnp.where(jnp.asarray(cond).astype(bool), a, b)
