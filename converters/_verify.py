"""Never silently wrong: run the exported program with mljax and compare with the JAX function.

A mismatch beyond the precision's tolerance is a :class:`ConversionError` naming the first
top-level jaxpr equation whose value differs from the MIL value it was translated into
(the jaxpr evaluated equation by equation against a copy of the program that also returns
every such intermediate).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.extend.core import Literal, jaxpr_as_fun

from mljax.errors import ConversionError
from mljax.mil.ir import Block, Function

__all__ = ["TOLERANCE", "check_outputs", "verify"]

#: compute_precision -> relative tolerance (also absolute, scaled by the output's largest magnitude).
TOLERANCE = {"float32": 1e-3, "float16": 3e-2}
#: fp16 exports may flip this fraction of an integer output (argmax / sort near ties).
_INT_FLIPS_FP16 = 0.05


def _mismatch(got, want, tol: float, precision: str) -> str | None:
    """None when ``got`` matches ``want``; else what differs."""
    want = np.asarray(want)
    got = np.asarray(got)
    if want.dtype == np.bool_:
        want = want.astype(np.int32)
        got = got.astype(np.int32)
    if got.shape != want.shape:
        try:
            got = np.broadcast_to(got, want.shape)
        except ValueError:
            return f"shape {got.shape}, JAX gives {want.shape}"
    if want.dtype.kind in "iub":
        wrong = np.asarray(got).astype(np.int64) != want.astype(np.int64)
        allowed = _INT_FLIPS_FP16 * want.size if precision == "float16" else 0
        if wrong.sum() > allowed:
            return f"{int(wrong.sum())} of {want.size} integer values differ"
        return None
    if want.dtype.kind != "f":
        return None
    g, w = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(w)
    if not np.array_equal(np.isnan(g), np.isnan(w)) or \
            not np.array_equal(g[~finite & ~np.isnan(w)], w[~finite & ~np.isnan(w)]):
        return "non-finite values differ"
    if not finite.any():
        return None
    scale = max(float(np.abs(w[finite]).max()), 1e-6)
    err = np.abs(g[finite] - w[finite])
    bad = err > tol * (scale + np.abs(w[finite]))
    if bad.any():
        return f"max abs error {float(err.max()):.3g} (tolerance {tol:g} x magnitude, values up to {scale:.3g})"
    return None


def check_outputs(got: dict, want: list, names: list[str], precision: str) -> list[str]:
    """The outputs whose values differ, each with what differs."""
    tol = TOLERANCE[precision]
    problems = []
    for name, w in zip(names, want):
        why = _mismatch(got[name], w, tol, precision)
        if why:
            problems.append(f"{name!r}: {why}")
    return problems


def _describe(eqn) -> str:
    text = " ".join(str(eqn).split())
    if len(text) > 160:
        text = text[:157] + "..."
    try:
        from jax._src import source_info_util
        where = source_info_util.summarize(eqn.source_info)
    except Exception:               # private API: the location is a courtesy
        where = ""
    return f"`{text}`" + (f" at {where}" if where else "")


def _flat_eqns(jaxpr, call_of):
    """The equations in order, inlined calls replaced by their bodies' equations."""
    for eqn in jaxpr.eqns:
        sub = call_of(eqn)
        if sub is None:
            yield eqn
        else:
            yield from _flat_eqns(sub.jaxpr, call_of)


def _evaluate(jaxpr, consts, args, call_of, env):
    """Run ``jaxpr`` equation by equation (calls inlined), yielding each equation after it ran."""
    def read(a):
        return np.asarray(a.val) if isinstance(a, Literal) else env[a]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        sub = call_of(eqn)
        if sub is None:
            vals = eqn.primitive.bind(*(read(a) for a in eqn.invars), **eqn.params)
            vals = vals if eqn.primitive.multiple_results else [vals]
            for v, val in zip(eqn.outvars, vals):
                env[v] = val
            yield eqn
        else:
            inner = eqn.invars[len(eqn.invars) - len(sub.jaxpr.invars):]
            yield from _evaluate(sub.jaxpr, sub.consts, [read(a) for a in inner], call_of, env)
            for v, w in zip(eqn.outvars, sub.jaxpr.outvars):
                env[v] = read(w)


def _first_divergence(closed, env_of, call_of, function: Function, args, inputs: dict, precision: str) -> str:
    """The first equation (inside inlined calls too) whose MIL value differs from JAX's."""
    from mljax.lower import LoweredFunction
    produced = {id(v) for op in function.block.operations if op.type != "const" for v in op.outputs}
    probes, seen = [], set()
    for eqn in _flat_eqns(closed.jaxpr, call_of):
        for v in eqn.outvars:
            var = env_of(v)
            if var is not None and id(var) in produced and id(var) not in seen:
                seen.add(id(var))
                probes.append(var)
    debug = Function(function.name, function.inputs, function.opset,
                     Block([], function.block.operations, probes))
    try:
        lowered = LoweredFunction(debug, optimize=False)
        mil_values, _ = lowered(lowered.weights, inputs)
    except Exception as e:          # the program itself fails to run: that is the finding
        return f"the program fails to run in mljax ({type(e).__name__}: {e})"
    tol = TOLERANCE[precision]
    env: dict = {}
    for i, eqn in enumerate(_evaluate(closed.jaxpr, closed.consts, args, call_of, env)):
        for v in eqn.outvars:
            var = env_of(v)
            if var is None or not jax.dtypes.issubdtype(v.aval.dtype, np.number) and v.aval.dtype != np.bool_:
                continue
            got = mil_values.get(var.name) if id(var) in produced else var.value
            if got is None:
                continue
            why = _mismatch(got, env[v], tol, precision)
            if why:
                op = next((op for op in function.block.operations if var in op.outputs), None)
                mil = f"MIL op {op.name!r} ({op.type})" if op is not None else f"MIL constant {var.name!r}"
                return f"equation {i} {_describe(eqn)} -> {mil}: {why}"
    return "no single equation differs beyond tolerance; the error accumulates over several"


def verify(model, closed, env_of, call_of, function: Function, args: list, inputs: dict, names: list[str],
           precision: str) -> None:
    """Raise ConversionError when ``model`` does not predict what ``closed`` computes on ``args``.

    ``env_of`` maps a jaxpr var to the MIL Var it was translated into; ``call_of`` gives the
    closed body of an equation the translator inlined (else None)."""
    want = jax.jit(jaxpr_as_fun(closed))(*args)
    try:
        got = model.predict(inputs)
    except Exception as e:
        raise ConversionError(f"the exported program fails to run on the example inputs in mljax "
                              f"({type(e).__name__}: {e})") from e
    problems = check_outputs(got, list(want), names, precision)
    if not problems:
        return
    where = _first_divergence(closed, env_of, call_of, function, args, inputs, precision)
    raise ConversionError(
        f"the exported program does not compute what the JAX function computes on the example inputs "
        f"({precision}): output {'; '.join(problems)}. First divergence: {where}. This is a converter "
        f"bug; please report it (verify=False skips this check)")
