"""Control flow layers: branch, loop, loopBreak, loopContinue, copy.

Nested networks read and write blobs of the enclosing scope.  A branch runs both networks
and selects each blob it changes (a computed condition) or runs one (a constant condition).
A loop is the MIL ``while_loop`` op (:func:`mljax.ops.control_flow.while_loop`) whose loop
variables are an iteration counter and every blob its networks write.  loopBreak / loopContinue set flags that make
the remaining layers of the iteration keep their previous values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mljax.errors import OpError
from mljax.neuralnetwork._base import fail, layer
from mljax.ops._registry import OpContext
from mljax.ops.control_flow import while_loop

_SKIP, _BREAK = "__skip__", "__break__"


def _written(nn) -> list[str]:
    names = []
    for lyr in nn.layers:
        names.extend(lyr.output)
        kind = lyr.WhichOneof("layer")
        if kind == "branch":
            names += _written(lyr.branch.ifBranch) + _written(lyr.branch.elseBranch)
        elif kind == "loop":
            names += _written(lyr.loop.conditionNetwork) + _written(lyr.loop.bodyNetwork)
        elif kind in ("loopBreak", "loopContinue"):
            names += [_SKIP] + ([_BREAK] if kind == "loopBreak" else [])
    return list(dict.fromkeys(names))


def _is_static(v) -> bool:
    return isinstance(v, (np.ndarray, np.generic, bool, int, float))


def _concrete(*trees) -> bool:
    """No traced value among the leaves of ``trees`` (the network runs op by op)."""
    return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(trees))


@layer("branch")
def branch(p, w, xs, ctx):
    """Run ifBranch when the scalar condition is nonzero, else elseBranch."""
    env = ctx.env
    cond = xs[0]
    if _is_static(cond) or _concrete(cond):
        chosen = p.ifBranch if np.asarray(cond).reshape(-1)[0] != 0 else p.elseBranch
        env.update(ctx.run(ctx.weights, env, chosen))
        return ()
    pred = jnp.asarray(cond).reshape(-1)[0] != 0
    then = ctx.run(ctx.weights, env, p.ifBranch)
    other = ctx.run(ctx.weights, env, p.elseBranch)
    for name in dict.fromkeys(_written(p.ifBranch) + _written(p.elseBranch)):
        a, b = then.get(name, env.get(name)), other.get(name, env.get(name))
        if a is None or b is None:
            env[name] = a if b is None else b
            continue
        if jnp.shape(a) != jnp.shape(b):
            fail(ctx, f"blob {name!r} has shape {jnp.shape(a)} in ifBranch and {jnp.shape(b)} in elseBranch")
        env[name] = jnp.where(pred, a, b)
    return ()


@layer("loopBreak")
def loop_break(p, w, xs, ctx):
    ctx.env[_BREAK] = jnp.asarray(True)
    ctx.env[_SKIP] = jnp.asarray(True)
    return ()


@layer("loopContinue")
def loop_continue(p, w, xs, ctx):
    ctx.env[_SKIP] = jnp.asarray(True)
    return ()


def _condition(p, ctx, env):
    if not p.HasField("conditionNetwork") or not p.conditionVar:
        return jnp.asarray(True)
    out = ctx.run(ctx.weights, env, p.conditionNetwork)
    if p.conditionVar not in out:
        fail(ctx, f"conditionNetwork does not produce conditionVar {p.conditionVar!r}")
    return jnp.asarray(out[p.conditionVar]).reshape(-1)[0] != 0


@layer("loop")
def loop(p, w, xs, ctx):
    """for / while loop over bodyNetwork (see LoopLayerParams for the three cases)."""
    env = ctx.env
    has_cond = p.HasField("conditionNetwork") and bool(p.conditionVar)
    if xs:
        count = xs[0] if not _is_static(xs[0]) else int(np.asarray(xs[0]).reshape(-1)[0])
    else:
        count = int(p.maxLoopIterations) if (p.maxLoopIterations or not has_cond) else None
    names = [n for n in _written(p.bodyNetwork) + (_written(p.conditionNetwork) if has_cond else [])
             if n not in (_SKIP, _BREAK)]
    names = list(dict.fromkeys(names))
    probe_env = ctx.run(ctx.weights, env, p.conditionNetwork) if has_cond else dict(env)
    probe_env[_SKIP] = probe_env[_BREAK] = jnp.asarray(False)
    probe = ctx.run(ctx.weights, probe_env, p.bodyNetwork)
    init = {}
    for n in names:
        if n not in probe:   # written only by a branch not taken: local to the iteration
            continue
        ref = jnp.asarray(probe[n])
        start = jnp.asarray(env[n]) if n in env else jnp.zeros_like(ref)
        if start.shape != ref.shape:
            fail(ctx, f"blob {n!r} changes shape in the loop body: {start.shape} -> {ref.shape}")
        init[n] = start.astype(ref.dtype)
    init[_BREAK] = jnp.asarray(False)

    def body(carry):
        e = {**env, **carry, _SKIP: carry[_BREAK]}
        e = ctx.run(ctx.weights, e, p.bodyNetwork)
        return {n: jnp.asarray(e[n]).astype(carry[n].dtype) for n in carry}

    def keep_going(i, carry):
        ok = ~carry[_BREAK]
        if has_cond:
            ok = ok & _condition(p, ctx, {**env, **carry})
        if count is not None:
            ok = ok & (i < count)
        return ok

    names = list(init)

    def cond_block(i, *values):
        return (keep_going(i, dict(zip(names, values))),)

    def body_block(i, *values):
        out = body(dict(zip(names, values)))
        return (i + 1,) + tuple(out[n] for n in names)

    op_ctx = OpContext("while_loop", ctx.name, 15, blocks=(cond_block, body_block))
    try:
        _, *values = while_loop(jnp.asarray(0), *(init[n] for n in names), ctx=op_ctx)
        final = dict(zip(names, values))
    except OpError:
        # a blob changes shape across iterations (a list growing in the body): only a loop over
        # concrete values can run it, one iteration at a time (MLModel retries op by op on OpError)
        if not _concrete(init, env):
            raise
        final, i = dict(init), 0
        while bool(keep_going(i, final)):
            final, i = body(final), i + 1
    final.pop(_BREAK)
    env.update(final)
    if has_cond:
        env.update(ctx.run(ctx.weights, env, p.conditionNetwork))
    return ()
