"""Translation rules: one small function per JAX primitive, kept in the ``RULES`` table.

A rule takes the :class:`~converters.jax.Translator` and the equation and returns the
MIL Vars of the equation's outputs.  A rule that meets a form it cannot express raises
:class:`Unsupported` with the reason (collected and reported together).
"""
from __future__ import annotations

import numpy as np

from mljax.mil.ir import Var
from mljax.mil.types import DTYPES, TensorType

__all__ = ["RULES", "Unsupported", "rule_table"]


class Unsupported(Exception):
    """This primitive's parameters have no MIL translation."""


def rule_table():
    """A new (table, decorator) pair: ``@rule("a", "b")`` registers a function for primitives."""
    table: dict = {}

    def rule(*names):
        def deco(fn):
            for n in names:
                table[n] = fn
            return fn
        return deco
    return table, rule


RULES, rule = rule_table()

#: primitive -> the forms that are not translated (docs/converters.md lists them as partial).
PARTIAL = {
    "and": "booleans only (MIL has no bitwise integer ops)", "or": "booleans only", "xor": "booleans only",
    "not": "booleans only",
    "reshape": "no `dimensions` permutation",
    "pad": "constant padding value only; no interior (dilating) padding",
    "argmax": "one axis", "argmin": "one axis",
    "convert_element_type": "int8/uint8/int16/uint16 casts need minimum_deployment_target iOS17 or later",
}


def _t(dtype_name: str, shape) -> TensorType:
    return TensorType(DTYPES[dtype_name], tuple(int(d) for d in shape))


def _like(var: Var, shape) -> TensorType:
    return TensorType(var.type.dtype, tuple(int(d) for d in shape))


def _is_float(var: Var) -> bool:
    return var.type.dtype.is_float


# --- elementwise ------------------------------------------------------------------------
_ARITHMETIC = {"fp16", "fp32", "int32", "bool"}


def _check_arithmetic(t, eqn):
    """MIL arithmetic takes fp16/fp32/int32 (and bool logic); narrower integers only cast and move."""
    for a in eqn.invars:
        name = t.out_type_of(a).dtype.name
        if name not in _ARITHMETIC:
            raise Unsupported(f"arithmetic on {name} (MIL computes in fp16/fp32/int32: cast to int32 first)")


def _binary(mil_op):
    def translate(t, eqn):
        _check_arithmetic(t, eqn)
        out = t.out_type(eqn)
        x, y = t.fit([t.lazy(eqn.invars[0]), t.lazy(eqn.invars[1])], out.shape)
        return [t.b.op(mil_op, out, x=x, y=y)]
    return translate


for _jax, _mil in {"add": "add", "add_any": "add", "sub": "sub", "mul": "mul", "max": "maximum", "min": "minimum",
                   "pow": "pow", "lt": "less", "le": "less_equal", "gt": "greater",
                   "ge": "greater_equal"}.items():
    RULES[_jax] = _binary(_mil)


def _equality(mil_op, negate):
    """``equal``/``not_equal``; on bools (which MIL compares only logically) via ``logical_xor``."""
    numeric = _binary(mil_op)

    def translate(t, eqn):
        if eqn.invars[0].aval.dtype != np.bool_:
            return numeric(t, eqn)
        out = t.out_type(eqn)
        x, y = t.fit([t.lazy(eqn.invars[0]), t.lazy(eqn.invars[1])], out.shape)
        differ = t.b.op("logical_xor", out, x=x, y=y)
        return [differ if negate else t.b.op("logical_not", out, x=differ)]
    return translate


RULES["eq"], RULES["ne"] = _equality("equal", False), _equality("not_equal", True)


def _logical(mil_op):
    binary = _binary(mil_op)

    def translate(t, eqn):
        if eqn.outvars[0].aval.dtype != np.bool_:
            raise Unsupported("bitwise operations on integers")
        return binary(t, eqn)
    return translate


RULES["and"], RULES["or"], RULES["xor"] = (_logical("logical_and"), _logical("logical_or"),
                                           _logical("logical_xor"))


def _int_fix(t, x: Var, y: Var, out: TensorType):
    """Floor quotient/remainder and where truncation differs from flooring (signs differ, r != 0)."""
    b = _t("bool", out.shape)
    r = t.b.op("mod", out, x=x, y=y)
    q = t.b.op("floor_div", out, x=x, y=y)
    signs = t.b.op("logical_xor", b, x=t.b.op("less", b, x=x, y=np.int32(0)),
                   y=t.b.op("less", b, x=y, y=np.int32(0)))
    fix = t.b.op("logical_and", b, x=signs, y=t.b.op("not_equal", b, x=r, y=np.int32(0)))
    return q, r, fix


@rule("div")
def _div(t, eqn):
    """Float: ``real_div``; integers truncate toward zero (C semantics), unlike ``floor_div``."""
    out = t.out_type(eqn)
    x, y = t.fit([t.lazy(eqn.invars[0]), t.lazy(eqn.invars[1])], out.shape)
    if out.dtype.is_float:
        return [t.b.op("real_div", out, x=x, y=y)]
    x, y = (t.materialize(v, tuple(out.shape)) for v in (x, y))
    q, _, fix = _int_fix(t, x, y, out)
    return [t.b.op("select", out, cond=fix, a=t.b.op("add", out, x=q, y=np.int32(1)), b=q)]


@rule("rem")
def _rem(t, eqn):
    """C fmod: the remainder has the sign of the dividend."""
    out = t.out_type(eqn)
    x, y = t.fit([t.lazy(eqn.invars[0]), t.lazy(eqn.invars[1])], out.shape)
    if out.dtype.is_float:
        q = t.b.op("real_div", out, x=x, y=y)
        mag = t.b.op("floor", out, x=t.b.op("abs", out, x=q))
        trunc = t.b.op("mul", out, x=t.b.op("sign", out, x=q), y=mag)
        return [t.b.op("sub", out, x=x, y=t.b.op("mul", out, x=trunc, y=y))]
    x, y = (t.materialize(v, tuple(out.shape)) for v in (x, y))
    _, r, fix = _int_fix(t, x, y, out)
    return [t.b.op("select", out, cond=fix, a=t.b.op("sub", out, x=r, y=y), b=r)]


def _unary(mil_op):
    def translate(t, eqn):
        _check_arithmetic(t, eqn)
        return [t.b.op(mil_op, t.out_type(eqn), x=t.read(eqn.invars[0]))]
    return translate


for _jax, _mil in {"exp": "exp", "log": "log", "tanh": "tanh", "sqrt": "sqrt", "rsqrt": "rsqrt",
                   "erf": "erf", "logistic": "sigmoid", "abs": "abs", "sign": "sign", "floor": "floor",
                   "ceil": "ceil", "sin": "sin", "cos": "cos", "tan": "tan", "asin": "asin",
                   "acos": "acos", "atan": "atan", "sinh": "sinh", "cosh": "cosh", "atanh": "atanh",
                   "exp2": "exp2", "square": "square"}.items():
    RULES[_jax] = _unary(_mil)


@rule("not")
def _not(t, eqn):
    if eqn.outvars[0].aval.dtype != np.bool_:
        raise Unsupported("bitwise not on integers")
    return [t.b.op("logical_not", t.out_type(eqn), x=t.read(eqn.invars[0]))]


@rule("neg")
def _neg(t, eqn):
    x = t.read(eqn.invars[0])
    return [t.b.op("mul", x.type, x=x, y=np.asarray(-1, x.type.dtype.numpy))]


@rule("log1p")
def _log1p(t, eqn):
    x = t.read(eqn.invars[0])
    return [t.b.op("log", x.type, x=t.b.op("add", x.type, x=x, y=np.asarray(1, x.type.dtype.numpy)))]


@rule("expm1")
def _expm1(t, eqn):
    x = t.read(eqn.invars[0])
    return [t.b.op("sub", x.type, x=t.b.op("exp", x.type, x=x), y=np.asarray(1, x.type.dtype.numpy))]


@rule("erfc")
def _erfc(t, eqn):
    x = t.read(eqn.invars[0])
    return [t.b.op("sub", x.type, x=np.asarray(1, x.type.dtype.numpy), y=t.b.op("erf", x.type, x=x))]


@rule("is_finite")
def _is_finite(t, eqn):
    """x - x is 0 exactly for finite x (NaN for inf and NaN)."""
    x = t.read(eqn.invars[0])
    diff = t.b.op("sub", x.type, x=x, y=x)
    return [t.b.op("equal", t.out_type(eqn), x=diff, y=np.asarray(0, x.type.dtype.numpy))]


@rule("cbrt")
def _cbrt(t, eqn):
    x = t.read(eqn.invars[0])
    mag = t.b.op("pow", x.type, x=t.b.op("abs", x.type, x=x), y=np.asarray(1 / 3, x.type.dtype.numpy))
    return [t.b.op("mul", x.type, x=t.b.op("sign", x.type, x=x), y=mag)]


@rule("asinh", "acosh")
def _inverse_hyperbolic(t, eqn):
    """log(x + sqrt(x^2 +- 1)); asinh of negative x by symmetry (no cancellation)."""
    x = t.read(eqn.invars[0])
    one = np.asarray(1, x.type.dtype.numpy)
    if eqn.primitive.name == "acosh":
        root = t.b.op("sqrt", x.type, x=t.b.op("sub", x.type, x=t.b.op("mul", x.type, x=x, y=x), y=one))
        return [t.b.op("log", x.type, x=t.b.op("add", x.type, x=x, y=root))]
    a = t.b.op("abs", x.type, x=x)
    root = t.b.op("sqrt", x.type, x=t.b.op("add", x.type, x=t.b.op("mul", x.type, x=a, y=a), y=one))
    mag = t.b.op("log", x.type, x=t.b.op("add", x.type, x=a, y=root))
    return [t.b.op("mul", x.type, x=t.b.op("sign", x.type, x=x), y=mag)]


@rule("atan2")
def _atan2(t, eqn):
    """atan(y / x), moved by +-pi into the left half plane; atan2(0, 0) = 0 as in JAX."""
    out = t.out_type(eqn)
    y, x = (t.materialize(v, tuple(out.shape)) for v in (t.lazy(eqn.invars[0]), t.lazy(eqn.invars[1])))
    b = _t("bool", out.shape)
    zero = np.asarray(0, out.dtype.numpy)
    base = t.b.op("atan", out, x=t.b.op("real_div", out, x=y, y=x))
    upper = t.b.op("cast", out, x=t.b.op("greater_equal", b, x=y, y=zero), dtype=out.dtype.name)
    turn = t.b.op("mul", out, x=t.b.op("sub", out, x=t.b.op("mul", out, x=upper, y=np.asarray(2, out.dtype.numpy)),
                                      y=np.asarray(1, out.dtype.numpy)), y=np.asarray(np.pi, out.dtype.numpy))
    left = t.b.op("mul", out, x=turn, y=t.b.op("cast", out, x=t.b.op("less", b, x=x, y=zero),
                                                dtype=out.dtype.name))
    angle = t.b.op("add", out, x=base, y=left)
    origin = t.b.op("logical_and", b, x=t.b.op("equal", b, x=x, y=zero), y=t.b.op("equal", b, x=y, y=zero))
    return [t.b.op("select", out, cond=origin, a=zero, b=angle)]


@rule("round")
def _round(t, eqn):
    x = t.read(eqn.invars[0])
    if int(eqn.params.get("rounding_method", 0)) == 1:      # to nearest even: MIL round
        return [t.b.op("round", x.type, x=x)]
    half = t.b.op("add", x.type, x=t.b.op("abs", x.type, x=x), y=np.asarray(0.5, x.type.dtype.numpy))
    return [t.b.op("mul", x.type, x=t.b.op("sign", x.type, x=x), y=t.b.op("floor", x.type, x=half))]


@rule("stop_gradient", "copy", "copy_p", "reduce_precision", "optimization_barrier", "device_put",
      "sharding_constraint")
def _identity(t, eqn):
    return [t.lazy(a) for a in eqn.invars]


@rule("integer_pow")
def _integer_pow(t, eqn):
    """Exponentiation by squaring with ``mul`` (exact, fine for negative bases)."""
    x, y = t.read(eqn.invars[0]), int(eqn.params["y"])
    if y == 0:
        return [t.b.const(np.ones(x.type.shape, x.type.dtype.numpy), name="ones")]
    result, base, n = None, x, abs(y)
    while n:
        if n & 1:
            result = base if result is None else t.b.op("mul", x.type, x=result, y=base)
        n >>= 1
        if n:
            base = t.b.op("mul", x.type, x=base, y=base)
    if y < 0:
        result = t.b.op("real_div", x.type, x=np.asarray(1, x.type.dtype.numpy), y=result)
    return [result]


_CAST_IOS15 = {"int32", "fp16", "fp32", "bool"}


@rule("convert_element_type")
def _convert(t, eqn):
    out = t.out_type(eqn)
    x = t.lazy(eqn.invars[0])
    if x.type.dtype == out.dtype:
        return [x]
    if t.ios < 17 and not {x.type.dtype.name, out.dtype.name} <= _CAST_IOS15:
        raise Unsupported(f"casts between {x.type.dtype.name} and {out.dtype.name} before iOS17 "
                          f"(MIL cast then takes only {sorted(_CAST_IOS15)})")
    return [t.b.op("cast", TensorType(out.dtype, x.type.shape), x=x, dtype=out.dtype.name)]


@rule("select_n")
def _select_n(t, eqn):
    out = t.out_type(eqn)
    pred, *cases = [t.lazy(a) for a in eqn.invars]
    if len(cases) == 1:
        return [cases[0]]
    result = cases[0]
    for i, case in enumerate(cases[1:], start=1):
        if pred.type.dtype.name == "bool":
            cond = pred
        else:
            cond = t.b.op("equal", _t("bool", pred.type.shape), x=pred,
                          y=np.asarray(i, pred.type.dtype.numpy))
        cond, case, result = t.fit([cond, case, result], out.shape)
        if np.broadcast_shapes(case.type.shape, result.type.shape) != tuple(out.shape):
            case = t.materialize(case, tuple(out.shape))      # MIL types select by a and b only
        result = t.b.op("select", out, cond=cond, a=case, b=result)
    return [result]


@rule("clamp")
def _clamp(t, eqn):
    out = t.out_type(eqn)
    lo, x, hi = (t.lazy(a) for a in eqn.invars)
    x, lo = t.fit([x, lo], out.shape)
    y = t.b.op("maximum", out, x=x, y=lo)
    y, hi = t.fit([y, hi], out.shape)
    return [t.b.op("minimum", out, x=y, y=hi)]


# --- shapes -------------------------------------------------------------------------------
@rule("broadcast_in_dim")
def _broadcast_in_dim(t, eqn):
    """A rank-expanding reshape; the consumer broadcasts (or materializes with ``tile``)."""
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    src = eqn.invars[0]
    x = t.lazy(src)
    if len(src.aval.shape) == 0:
        return [x]
    expanded = [1] * len(shape)
    for k, d in enumerate(dims):
        expanded[d] = int(src.aval.shape[k])
    x = t.materialize(x, tuple(src.aval.shape))
    if tuple(expanded) == tuple(x.type.shape):
        return [x]
    known = t.known(src)
    if known is not None and not (known.dtype.kind == "f" and known.size > 1):
        return [t.b.const(known.reshape(expanded), name="broadcast", dtype=x.type.dtype)]
    return [t.b.op("reshape", _like(x, expanded), x=x, shape=expanded)]


@rule("reshape")
def _reshape(t, eqn):
    if eqn.params.get("dimensions") is not None:
        raise Unsupported("reshape with a dimension permutation")
    out = t.out_type(eqn)
    x = t.read(eqn.invars[0])
    if x.type.shape == out.shape:
        return [x]
    return [t.b.op("reshape", out, x=x, shape=list(out.shape))]


@rule("squeeze")
def _squeeze(t, eqn):
    out = t.out_type(eqn)
    x = t.read(eqn.invars[0])
    if not eqn.params["dimensions"]:
        return [x]
    return [t.b.op("squeeze", out, x=x, axes=list(eqn.params["dimensions"]))]


@rule("expand_dims")
def _expand_dims(t, eqn):
    out = t.out_type(eqn)
    return [t.b.op("reshape", out, x=t.read(eqn.invars[0]), shape=list(out.shape))]


@rule("transpose")
def _transpose(t, eqn):
    perm = [int(p) for p in eqn.params["permutation"]]
    x = t.read(eqn.invars[0])
    if perm == sorted(perm):
        return [x]
    return [t.b.op("transpose", t.out_type(eqn), x=x, perm=perm)]


@rule("tile")
def _tile(t, eqn):
    return [t.b.op("tile", t.out_type(eqn), x=t.read(eqn.invars[0]),
                   reps=[int(r) for r in eqn.params["reps"]])]


@rule("rev")
def _rev(t, eqn):
    return [t.b.op("reverse", t.out_type(eqn), x=t.read(eqn.invars[0]),
                   axes=list(eqn.params["dimensions"]))]


def _slice(t, x: Var, begin, end, stride, out: TensorType) -> Var:
    if tuple(x.type.shape) == tuple(out.shape):
        return x
    return t.b.op("slice_by_index", out, x=x, begin=[int(b) for b in begin], end=[int(e) for e in end],
                  stride=[int(s) for s in stride])


@rule("slice")
def _slice_rule(t, eqn):
    x = t.read(eqn.invars[0])
    p = eqn.params
    strides = p["strides"] or (1,) * len(p["start_indices"])
    return [_slice(t, x, p["start_indices"], p["limit_indices"], strides, t.out_type(eqn))]


@rule("concatenate")
def _concatenate(t, eqn):
    values = [t.read(a) for a in eqn.invars if np.prod(a.aval.shape) > 0]
    if len(values) == 1:
        return values
    return [t.b.op("concat", t.out_type(eqn), values=values, axis=int(eqn.params["dimension"]),
                   interleave=False)]


@rule("split")
def _split(t, eqn):
    x = t.read(eqn.invars[0])
    outs = [t.out_type(eqn, i) for i in range(len(eqn.outvars))]
    return t.b.op("split", outs, x=x, split_sizes=[int(s) for s in eqn.params["sizes"]],
                  axis=int(eqn.params["axis"]))


@rule("pad")
def _pad(t, eqn):
    x = t.read(eqn.invars[0])
    value = t.known(eqn.invars[1])
    if value is None:
        raise Unsupported("a padding value that depends on the inputs")
    config = eqn.params["padding_config"]
    if any(int(interior) for _, _, interior in config):
        raise Unsupported("interior (dilating) padding")
    lo = [max(int(c[0]), 0) for c in config]
    hi = [max(int(c[1]), 0) for c in config]
    padded_shape = [d + a + b for d, a, b in zip(x.type.shape, lo, hi)]
    y = x
    if any(lo) or any(hi):
        pads = [v for pair in zip(lo, hi) for v in pair]
        y = t.b.op("pad", _like(x, padded_shape), x=x, pad=pads, mode="constant",
                   constant_val=np.asarray(value, x.type.dtype.numpy))
    begin = [-min(int(c[0]), 0) for c in config]
    end = [d + min(int(c[1]), 0) for d, c in zip(padded_shape, config)]
    return [_slice(t, y, begin, end, [1] * len(begin), t.out_type(eqn))]


@rule("iota")
def _iota(t, eqn):
    p = eqn.params
    out = t.out_type(eqn)
    shape = tuple(p["shape"])
    ramp = np.arange(shape[p["dimension"]]).reshape([-1 if i == p["dimension"] else 1
                                                     for i in range(len(shape))])
    return [t.b.const(np.broadcast_to(ramp, shape).astype(out.dtype.numpy), name="iota")]


# --- reductions ----------------------------------------------------------------------------
def _reduce(mil_op):
    def translate(t, eqn):
        x = t.read(eqn.invars[0])
        axes = [int(a) for a in eqn.params["axes"]]
        if not axes:
            return [x]
        out = t.out_type(eqn)
        if x.type.dtype.name == "bool":       # any / all
            xi = t.b.op("cast", _t("int32", x.type.shape), x=x, dtype="int32")
            r = t.b.op(mil_op, _t("int32", out.shape), x=xi, axes=axes, keep_dims=False)
            return [t.b.op("cast", out, x=r, dtype="bool")]
        return [t.b.op(mil_op, out, x=x, axes=axes, keep_dims=False)]
    return translate


for _jax, _mil in {"reduce_sum": "reduce_sum", "reduce_max": "reduce_max", "reduce_min": "reduce_min",
                   "reduce_prod": "reduce_prod", "reduce_or": "reduce_max",
                   "reduce_and": "reduce_min"}.items():
    RULES[_jax] = _reduce(_mil)


def _arg_reduce(mil_op):
    def translate(t, eqn):
        x = t.read(eqn.invars[0])
        (axis,) = eqn.params["axes"]
        out = t.out_type(eqn)
        r = t.b.op(mil_op, _t("int32", out.shape), x=x, axis=int(axis), keep_dims=False)
        return [r if out.dtype.name == "int32" else t.b.op("cast", out, x=r, dtype=out.dtype.name)]
    return translate


RULES["argmax"], RULES["argmin"] = _arg_reduce("reduce_argmax"), _arg_reduce("reduce_argmin")


@rule("cumsum")
def _cumsum(t, eqn):
    return [t.b.op("cumsum", t.out_type(eqn), x=t.read(eqn.invars[0]), axis=int(eqn.params["axis"]),
                   exclusive=False, reverse=bool(eqn.params["reverse"]))]


# --- linear algebra and convolution ---------------------------------------------------------
def _transpose_to(t, x: Var, perm) -> Var:
    perm = [int(p) for p in perm]
    if perm == list(range(len(perm))):
        return x
    return t.b.op("transpose", _like(x, [x.type.shape[p] for p in perm]), x=x, perm=perm)


def _reshape_to(t, x: Var, shape) -> Var:
    shape = [int(s) for s in shape]
    if list(x.type.shape) == shape:
        return x
    return t.b.op("reshape", _like(x, shape), x=x, shape=shape)


def _matrix(t, x: Var, batch, first, second):
    """``x`` as [batch..., prod(first), prod(second)] (transposed/reshaped as needed)."""
    s = x.type.shape
    x = _transpose_to(t, x, [*batch, *first, *second])
    return _reshape_to(t, x, [*(s[d] for d in batch), int(np.prod([s[d] for d in first])),
                              int(np.prod([s[d] for d in second]))])


def _as_linear(t, eqn, lhs: Var, lc, lb, rc, rb):
    """x @ W with W a constant matrix and x of rank <= 3: MIL ``linear`` (weight [N, K])."""
    w = t.known(eqn.invars[1])
    if w is None or lb or rb or w.ndim != 2 or len(lhs.type.shape) > 3 or \
            list(lc) != [len(lhs.type.shape) - 1] or not _is_float(lhs):
        return None
    weight = t.lazy(eqn.invars[1])
    if list(rc) == [0]:
        weight = _transpose_to(t, weight, [1, 0])
    return t.b.op("linear", t.out_type(eqn), x=lhs, weight=weight)


@rule("dot_general")
def _dot_general(t, eqn):
    """Batch dims first, then [M, K] @ [K, N] (``transpose_x``/``transpose_y`` when the
    operand already has the contracted dims in front / at the back)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = t.read(eqn.invars[0]), t.read(eqn.invars[1])
    out = t.out_type(eqn)
    lin = _as_linear(t, eqn, lhs, lc, lb, rc, rb)
    if lin is not None:
        return [_cast_to(t, lin, out)]
    lrank, rrank = len(lhs.type.shape), len(rhs.type.shape)
    lfree = [d for d in range(lrank) if d not in lc and d not in lb]
    rfree = [d for d in range(rrank) if d not in rc and d not in rb]
    tx = bool(lfree) and bool(lc) and max(lc) < min(lfree)
    ty = bool(rfree) and bool(rc) and max(rfree) < min(rc)
    a = _matrix(t, lhs, lb, lc, lfree) if tx else _matrix(t, lhs, lb, lfree, lc)
    b = _matrix(t, rhs, rb, rfree, rc) if ty else _matrix(t, rhs, rb, rc, rfree)
    batch = [lhs.type.shape[d] for d in lb]
    m = int(np.prod([lhs.type.shape[d] for d in lfree]))
    n = int(np.prod([rhs.type.shape[d] for d in rfree]))
    mm = t.b.op("matmul", _like(a, [*batch, m, n]), x=a, y=b, transpose_x=tx, transpose_y=ty)
    return [_cast_to(t, _reshape_to(t, mm, out.shape), out)]


def _cast_to(t, x: Var, out: TensorType) -> Var:
    if x.type.dtype == out.dtype:
        return x
    return t.b.op("cast", out, x=x, dtype=out.dtype.name)
