"""MIL linear-algebra ops (coremltools ``defs/iOS15/linear.py``, ``defs/iOS17/linear.py``).

iOS17 deltas: ``linear``'s weight/bias may have a dtype other than ``x``'s (the output keeps
``x``'s, so they are cast to it in every opset); ``matmul``'s ``x`` and ``y`` may differ in
dtype when one is const (the result takes the non-const one's dtype, which is the declared
output dtype).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from mljax.errors import OpError
from mljax.ops._elementwise_util import jax_dtype_of, like
from mljax.ops._registry import register

__all__ = ["linear", "matmul", "einsum"]


@register("linear")
def linear(x, weight, bias=None, *, ctx=None):
    """``x @ weight.T + bias`` with ``weight: [D_out, D_in]`` and ``bias: [D_out]``.

    With the graph layer's hint ``bias_in_product`` (:func:`mljax.optimize.passes.bias_into_product`)
    ``weight`` is ``[D_out, D_in + 1]``, its last column the bias, and ``x`` gets a column of ones:
    the product adds the bias instead of a pass over its output.  With the hint ``weight_in_out``
    (:func:`mljax.optimize.passes.loop_weights_in_out`) ``weight`` is ``[D_in, D_out]``."""
    if ctx is not None and ctx.hints.get("bias_in_product"):
        x = jnp.asarray(x)
        x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)
    w = jnp.asarray(like(weight, x))
    in_out = ctx is not None and bool(ctx.hints.get("weight_in_out"))
    if w.ndim != 2 or w.shape[0 if in_out else 1] != jnp.shape(x)[-1]:
        expected = f"[{jnp.shape(x)[-1]}, D_out]" if in_out else f"[D_out, {jnp.shape(x)[-1]}]"
        raise OpError(f"linear: weight must have shape {expected} (x's last dimension); found {tuple(w.shape)}")
    # contract x's last axis with the weight's input axis directly: no transposed copy of the weight
    x = jnp.asarray(x)
    y = lax.dot_general(x, w, (((x.ndim - 1,), (0 if in_out else 1,)), ((), ())))
    if bias is not None:
        y = y + like(bias, x)
    return y


def _matmul_dtype(x, y, ctx):
    """The dtype to multiply in: the declared output dtype when x and y differ (iOS17)."""
    dx, dy = jnp.result_type(x), jnp.result_type(y)
    if dx == dy:
        return dx
    if ctx is not None and ctx.output_types:
        return jax_dtype_of(ctx.compute_dtype(ctx.output_types[0].dtype).numpy)
    return jnp.promote_types(dx, dy)


@register("matmul")
def matmul(x, y, *, transpose_x=False, transpose_y=False, ctx=None):
    """Batched matrix product with NumPy broadcasting of the batch axes (``np.matmul``).

    ``transpose_x``/``transpose_y`` swap the last two axes first (no effect on rank 1).
    """
    dt = _matmul_dtype(x, y, ctx)
    x, y = jnp.asarray(x).astype(dt), jnp.asarray(y).astype(dt)
    if (transpose_x or transpose_y) and x.ndim == y.ndim >= 2 and x.shape[:-2] == y.shape[:-2]:
        # the transposes as the product's contracting axes: XLA:CPU folded a swapaxes into the
        # product only when it read an operand directly, and otherwise materialized the swapped
        # copy (attention's K^T after rotary and the grouped-query repeat, vmapped: a transposing
        # pass per layer)
        nb = x.ndim - 2
        cx, cy = nb + (0 if transpose_x else 1), nb + (1 if transpose_y else 0)
        if x.shape[cx] != y.shape[cy]:
            raise OpError(f"matmul: inner dimensions differ after transposes: x {tuple(x.shape)} "
                          f"(transpose_x={bool(transpose_x)}), y {tuple(y.shape)} (transpose_y={bool(transpose_y)})")
        return lax.dot_general(x, y, (((cx,), (cy,)), (tuple(range(nb)), tuple(range(nb)))))
    if transpose_x and x.ndim >= 2:
        x = jnp.swapaxes(x, -1, -2)
    if transpose_y and y.ndim >= 2:
        y = jnp.swapaxes(y, -1, -2)
    if x.shape[-1] != y.shape[-2 if y.ndim >= 2 else -1]:
        raise OpError(f"matmul: inner dimensions differ after transposes: x {tuple(x.shape)}, "
                      f"y {tuple(y.shape)}")
    return jnp.matmul(x, y)


@register("einsum")
def einsum(*values, equation):
    """``np.einsum(equation, *values)``, broadcasting size-1 dims of shared labels.

    MIL only guarantees ``"nchw,nwhu->nchu"`` and ``"chw,whr->chr"`` (and renamings) but
    any explicit-output equation without ellipsis works here.
    """
    if "->" not in equation or "." in equation:
        raise OpError(f"einsum: equation must be explicit ('ab,bc->ac') without '...'; "
                      f"found {equation!r}")
    lhs, _ = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(values):
        raise OpError(f"einsum: equation {equation!r} has {len(terms)} operands; "
                      f"found {len(values)} values")
    sizes: dict[str, int] = {}
    for term, v in zip(terms, values):
        if len(term) != jnp.ndim(v):
            raise OpError(f"einsum: operand {term!r} has {len(term)} labels but rank {jnp.ndim(v)}")
        for label, n in zip(term, jnp.shape(v)):
            sizes[label] = max(sizes.get(label, 1), int(n))
    dt = jnp.result_type(*values)
    operands = [jnp.broadcast_to(jnp.asarray(v).astype(dt), [sizes[c] for c in term])
                for term, v in zip(terms, values)]
    return jnp.einsum(equation, *operands)
