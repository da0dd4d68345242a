"""Network primitives: convolutions (transposed too), window reductions (pooling), cumulative ops.

``conv_general_dilated`` with input dilation is a transposed convolution: MIL
``conv_transpose`` with the kernel flipped and in/out swapped when the forward padding fits
(``0 <= pad <= K_eff - 1``, unit window strides, one group), else the input is dilated with
reshape + pad and convolved.  ``reduce_window_{max,min,sum}`` over at most three window dims
become ``max_pool`` / ``avg_pool`` on a [N, C, *spatial] view.  ``cumprod``/``cummax``/
``cummin`` are log-step (Hillis-Steele) scans of shifted copies.
"""
from __future__ import annotations

import numpy as np

from converters._jax_rules import Unsupported, rule_table, _cast_to, _like, _reshape_to, _t, _transpose_to
from mljax.mil.types import TensorType

__all__ = ["PARTIAL", "RULES"]

RULES, rule = rule_table()

#: primitive -> the forms that are not translated.
PARTIAL = {
    "conv_general_dilated": "batch_group_count 1 (feature groups, input and kernel dilation, negative pads are fine)",
    **{p: "no base/window dilation; at most 3 windowed dims; non-negative padding"
       for p in ("reduce_window_max", "reduce_window_min", "reduce_window_sum")},
}


def _dilate(t, x, factors):
    """Insert ``f - 1`` zeros between neighbours along spatial dims 2.. of [N, C, *S]."""
    for k, f in enumerate(factors):
        if f == 1:
            continue
        ax = 2 + k
        s = list(x.type.shape)
        n = s[ax]
        x = _reshape_to(t, x, [*s[:ax + 1], 1, *s[ax + 1:]])
        pads = [0, 0] * len(x.type.shape)
        pads[2 * (ax + 1) + 1] = f - 1
        x = t.b.op("pad", _like(x, [*s[:ax + 1], f, *s[ax + 1:]]), x=x, pad=pads, mode="constant",
                   constant_val=np.asarray(0, x.type.dtype.numpy))
        x = _reshape_to(t, x, [*s[:ax], n * f, *s[ax + 1:]])
        keep = (n - 1) * f + 1
        x = t.b.op("slice_by_index", _like(x, [*s[:ax], keep, *s[ax + 1:]]), x=x, begin=[0] * len(s),
                   end=[*s[:ax], keep, *s[ax + 1:]])
    return x


def _crop_negative(t, x, pads):
    """Apply the negative entries of [lo0, hi0, lo1, ...] (spatial) as a crop; return the rest."""
    if all(v >= 0 for v in pads):
        return x, pads
    s = list(x.type.shape)
    begin, end = [0] * len(s), list(s)
    for k in range(len(pads) // 2):
        lo, hi = pads[2 * k], pads[2 * k + 1]
        begin[2 + k] = -min(lo, 0)
        end[2 + k] = s[2 + k] + min(hi, 0)
    x = t.b.op("slice_by_index", _like(x, [e - b for b, e in zip(begin, end)]), x=x, begin=begin, end=end)
    return x, [max(v, 0) for v in pads]


@rule("conv_general_dilated")
def _conv(t, eqn):
    p = eqn.params
    if int(p["batch_group_count"]) != 1:
        raise Unsupported("batch_group_count > 1")
    dn = p["dimension_numbers"]
    x = _transpose_to(t, t.read(eqn.invars[0]), dn.lhs_spec)
    w = _transpose_to(t, t.read(eqn.invars[1]), dn.rhs_spec)
    out = t.out_type(eqn)
    mil_shape = [out.shape[d] for d in dn.out_spec]
    pads = [int(v) for pair in p["padding"] for v in pair]
    lhs_dil = [int(d) for d in p["lhs_dilation"]]
    rhs_dil = [int(d) for d in p["rhs_dilation"]]
    strides = [int(s) for s in p["window_strides"]]
    groups = int(p["feature_group_count"])
    kernel = w.type.shape[2:]
    k_eff = [d * (k - 1) + 1 for d, k in zip(rhs_dil, kernel)]
    if any(f != 1 for f in lhs_dil):
        t_pads = [k_eff[i // 2] - 1 - v for i, v in enumerate(pads)]
        if all(s == 1 for s in strides) and groups == 1 and all(v >= 0 for v in t_pads) \
                and all(v >= 0 for v in pads):
            spatial = list(range(2, 2 + len(kernel)))
            wt = t.b.op("reverse", w.type, x=w, axes=spatial)
            wt = _transpose_to(t, wt, [1, 0, *spatial])
            y = t.b.op("conv_transpose", _like(x, mil_shape), x=x, weight=wt, pad_type="custom", pad=t_pads,
                       strides=lhs_dil, dilations=rhs_dil, groups=1, output_shape=list(mil_shape))
            return [_cast_to(t, _transpose_to(t, y, np.argsort(dn.out_spec)), out)]
        x = _dilate(t, x, lhs_dil)
    x, pads = _crop_negative(t, x, pads)
    y = t.b.op("conv", _like(x, mil_shape), x=x, weight=w, strides=strides, pad_type="custom", pad=pads,
               dilations=rhs_dil, groups=groups)
    return [_cast_to(t, _transpose_to(t, y, np.argsort(dn.out_spec)), out)]


def _window_rule(kind: str):
    def translate(t, eqn):
        p = eqn.params
        if any(int(d) != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            raise Unsupported("dilated windows")
        window = [int(w) for w in p["window_dimensions"]]
        strides = [int(s) for s in p["window_strides"]]
        padding = [(int(lo), int(hi)) for lo, hi in p["padding"]]
        if any(lo < 0 or hi < 0 for lo, hi in padding):
            raise Unsupported("negative window padding")
        x = t.read(eqn.invars[0])
        rank = len(window)
        spatial = [d for d in range(rank) if window[d] != 1 or strides[d] != 1 or padding[d] != (0, 0)]
        if not spatial:
            return [x]
        if len(spatial) > 3:
            raise Unsupported(f"windows over {len(spatial)} dims (pooling takes at most 3)")
        other = [d for d in range(rank) if d not in spatial]
        shape = x.type.shape
        lead = int(np.prod([shape[d] for d in other])) if other else 1
        y = _transpose_to(t, x, [*other, *spatial])
        y = _reshape_to(t, y, [1, lead, *(shape[d] for d in spatial)])
        out = t.out_type(eqn)
        dtype = y.type.dtype
        if not dtype.is_float:
            y = t.b.op("cast", _t("fp32", y.type.shape), x=y, dtype="fp32")
        if kind == "min":
            y = t.b.op("mul", y.type, x=y, y=np.asarray(-1, y.type.dtype.numpy))
        pooled_shape = [1, lead, *(out.shape[d] for d in spatial)]
        common = dict(kernel_sizes=[window[d] for d in spatial], strides=[strides[d] for d in spatial],
                      pad_type="custom", pad=[v for d in spatial for v in padding[d]], ceil_mode=False)
        if kind == "sum":
            z = t.b.op("avg_pool", _like(y, pooled_shape), x=y, exclude_padding_from_average=False, **common)
            z = t.b.op("mul", z.type, x=z, y=np.asarray(np.prod(common["kernel_sizes"]), z.type.dtype.numpy))
        else:
            z = t.b.op("max_pool", _like(y, pooled_shape), x=y, **common)
            if kind == "min":
                z = t.b.op("mul", z.type, x=z, y=np.asarray(-1, z.type.dtype.numpy))
        if not dtype.is_float:
            if kind == "sum":
                z = t.b.op("round", z.type, x=z)
            z = t.b.op("cast", TensorType(dtype, z.type.shape), x=z, dtype=dtype.name)
        z = _reshape_to(t, z, [*(shape[d] for d in other), *(out.shape[d] for d in spatial)])
        return [_transpose_to(t, z, list(np.argsort([*other, *spatial])))]
    return translate


RULES["reduce_window_max"] = _window_rule("max")
RULES["reduce_window_min"] = _window_rule("min")
RULES["reduce_window_sum"] = _window_rule("sum")


def _cumulative(mil_op: str, identity):
    def translate(t, eqn):
        x = t.read(eqn.invars[0])
        axis = int(eqn.params["axis"])
        reverse = bool(eqn.params.get("reverse", False))
        if reverse:
            x = t.b.op("reverse", x.type, x=x, axes=[axis])
        n = x.type.shape[axis]
        rank = len(x.type.shape)
        fill = identity(np.dtype(x.type.dtype.numpy))
        shift = 1
        while shift < n:
            head = list(x.type.shape)
            head[axis] = shift
            kept = list(x.type.shape)
            kept[axis] = n - shift
            front = t.b.const(np.full(head, fill, x.type.dtype.numpy), name="cumulative_fill")
            rest = t.b.op("slice_by_index", _like(x, kept), x=x, begin=[0] * rank, end=kept)
            moved = t.b.op("concat", x.type, values=[front, rest], axis=axis, interleave=False)
            x = t.b.op(mil_op, x.type, x=x, y=moved)
            shift *= 2
        if reverse:
            x = t.b.op("reverse", x.type, x=x, axes=[axis])
        return [x]
    return translate


def _lowest(dt: np.dtype):
    return -np.inf if dt.kind == "f" else np.iinfo(dt).min


def _highest(dt: np.dtype):
    return np.inf if dt.kind == "f" else np.iinfo(dt).max


RULES["cumprod"] = _cumulative("mul", lambda dt: 1)
RULES["cummax"] = _cumulative("maximum", _lowest)
RULES["cummin"] = _cumulative("minimum", _highest)
