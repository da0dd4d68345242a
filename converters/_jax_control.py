"""Control flow: ``scan`` (unrolled when short, else a MIL ``while_loop``), ``while`` and ``cond``.

The sub-jaxprs become nested MIL blocks that read outer values by name (MIL scoping); a
loop's carried values are its ``loop_vars`` and the block inputs of its condition and body.
"""
from __future__ import annotations

import numpy as np

from converters._jax_rules import Unsupported, rule_table, _t, _like
from mljax.mil.ir import Block
from mljax.mil.types import TensorType

__all__ = ["PARTIAL", "RULES", "UNROLL_STEPS"]

RULES, rule = rule_table()

#: scans of at most this many steps are unrolled (static slices, no loop in the program).
UNROLL_STEPS = 16

#: primitive -> the forms that are not translated.
PARTIAL = {
    "scan": f"boolean stacked outputs only when unrolled (at most {UNROLL_STEPS} steps); "
            "bodies of supported primitives",
    "while": "bodies of supported primitives; loop values keep fixed shapes",
    "cond": "branches of supported primitives",
}



def _step_slice(t, x, k: int):
    """``x[k]`` by a static slice."""
    shape = x.type.shape
    begin = [k] + [0] * (len(shape) - 1)
    end = [k + 1, *shape[1:]]
    return t.b.op("slice_by_index", _like(x, shape[1:]), x=x, begin=begin, end=end,
                  squeeze_mask=np.array([True] + [False] * (len(shape) - 1)))


def _stack(t, values, out: TensorType):
    if len(values) == 1:
        return t.b.op("expand_dims", out, x=values[0], axes=[0])
    return t.b.op("stack", out, values=values, axis=0)


def _scan_operands(t, eqn, read_carry):
    """A scan's length, carry count and body, its consts (lazy), its carry (``read_carry``) and its
    scanned inputs (read), taken in operand order."""
    p = eqn.params
    n, nc, nk = int(p["length"]), int(p["num_consts"]), int(p["num_carry"])
    consts = [t.lazy(a) for a in eqn.invars[:nc]]
    carry = [read_carry(a) for a in eqn.invars[nc:nc + nk]]
    xs = [t.read(a) for a in eqn.invars[nc + nk:]]
    return n, nk, p["jaxpr"], consts, carry, xs


def _scan_unrolled(t, eqn):
    p = eqn.params
    n, nk, closed, consts, carry, xs = _scan_operands(t, eqn, t.lazy)
    ys: list[list] = [[None] * n for _ in eqn.outvars[nk:]]
    steps = range(n - 1, -1, -1) if p["reverse"] else range(n)
    for k in steps:
        outs = t.run(closed.jaxpr, list(closed.consts), [*consts, *carry, *(_step_slice(t, x, k) for x in xs)])
        t.require(outs)
        carry = outs[:nk]
        for j, (y, v) in enumerate(zip(outs[nk:], closed.jaxpr.outvars[nk:])):
            ys[j][k] = t.materialize(y, tuple(v.aval.shape))
    stacked = [_stack(t, col, t.out_type(eqn, nk + j)) for j, col in enumerate(ys)]
    return [*carry, *stacked]


def _scan_loop(t, eqn):
    """A MIL while_loop over (step, carry..., ys...); each step's ys are scattered into place."""
    p = eqn.params
    n, nk, closed, consts, carry, xs = _scan_operands(t, eqn, t.read)
    y_types = [t.out_type(eqn, nk + j) for j in range(len(eqn.outvars) - nk)]
    if any(yt.dtype.name == "bool" for yt in y_types):
        raise Unsupported(f"a scan of {n} steps (more than {UNROLL_STEPS}) stacking boolean outputs")
    accs = [t.b.op("fill", yt, shape=list(yt.shape), value=np.asarray(0, yt.dtype.numpy)) for yt in y_types]
    init = [t.b.const(np.int32(0), name="step"), *carry, *accs]
    types = [v.type for v in init]

    def inputs(tag):
        return [t.block_input(f"{tag}_{k}", typ) for k, typ in enumerate(types)]

    c_in = inputs("scan_cond")
    with t.scope() as ops:
        more = t.b.op("less", _t("bool", ()), x=c_in[0], y=np.int32(n))
    cond = Block(c_in, ops, [more])
    b_in = inputs("scan_body")
    with t.scope() as ops:
        step = b_in[0]
        idx = t.b.op("sub", _t("int32", ()), x=np.int32(n - 1), y=step) if p["reverse"] else step
        idx1 = t.b.op("reshape", _t("int32", (1,)), x=idx, shape=[1])
        x_t = [t.b.op("reshape", _like(x, x.type.shape[1:]), shape=list(x.type.shape[1:]),
                      x=t.b.op("gather", _like(x, (1, *x.type.shape[1:])), x=x, indices=idx1, axis=0))
               for x in xs]
        outs = t.run(closed.jaxpr, list(closed.consts), [*consts, *b_in[1:1 + nk], *x_t])
        t.require(outs)
        outs = [t.materialize(o, tuple(v.aval.shape)) for o, v in zip(outs, closed.jaxpr.outvars)]
        new_accs = []
        for acc, y in zip(b_in[1 + nk:], outs[nk:]):
            upd = t.b.op("reshape", _like(y, (1, *y.type.shape)), x=y, shape=[1, *y.type.shape])
            new_accs.append(t.b.op("scatter", acc.type, data=acc, indices=idx1, updates=upd, axis=0,
                                   mode="update"))
        nxt = t.b.op("add", _t("int32", ()), x=step, y=np.int32(1))
        body_out = t.block_outputs(ops, [nxt, *outs[:nk], *new_accs])
    body = Block(b_in, ops, body_out)
    results = t.b.op("while_loop", types, loop_vars=init, blocks=[cond, body])
    return results[1:]


@rule("scan")
def _scan(t, eqn):
    if int(eqn.params["length"]) <= UNROLL_STEPS:
        return _scan_unrolled(t, eqn)
    return _scan_loop(t, eqn)


@rule("while")
def _while(t, eqn):
    p = eqn.params
    cn, bn = int(p["cond_nconsts"]), int(p["body_nconsts"])
    c_consts = [t.lazy(a) for a in eqn.invars[:cn]]
    b_consts = [t.lazy(a) for a in eqn.invars[cn:cn + bn]]
    init = [t.read(a) for a in eqn.invars[cn + bn:]]
    types = [v.type for v in init]
    c_in = [t.block_input(f"while_cond_{k}", typ) for k, typ in enumerate(types)]
    cond = t.block(p["cond_jaxpr"], [*c_consts, *c_in], c_in)
    b_in = [t.block_input(f"while_body_{k}", typ) for k, typ in enumerate(types)]
    body = t.block(p["body_jaxpr"], [*b_consts, *b_in], b_in)
    return t.b.op("while_loop", types, loop_vars=init, blocks=[cond, body])


@rule("cond")
def _cond(t, eqn):
    """``branches[clamp(index)]``: a chain of MIL conds ``index <= k`` (JAX clamps the index)."""
    branches = eqn.params["branches"]
    index, *operands = eqn.invars
    known = t.known(index)
    args = [t.lazy(a) for a in operands]
    if known is not None:
        k = int(np.clip(int(known), 0, len(branches) - 1))
        closed = branches[k]
        return t.run(closed.jaxpr, list(closed.consts), args)
    types = [t.out_type(eqn, i) for i in range(len(eqn.outvars))]
    idx = t.read(index)
    if idx.type.dtype.name == "bool":
        idx = t.b.op("cast", _t("int32", ()), x=idx, dtype="int32")

    def chain(k):
        if k == len(branches) - 1:
            return None
        pred = t.b.op("less_equal", _t("bool", ()), x=idx, y=np.int32(k))
        true = t.block(branches[k], args)
        rest = chain(k + 1)
        if rest is None:
            false = t.block(branches[k + 1], args)
        else:
            with t.scope() as ops:
                outs = rest()
            false = Block([], ops, outs)
        return lambda: t.b.op("cond", types, pred=pred, blocks=[true, false])

    return chain(0)()
