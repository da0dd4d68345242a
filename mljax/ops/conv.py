"""MIL conv family: ``conv`` and ``conv_transpose`` (1-D, 2-D and 3-D, channel-first).

Layouts are MIL's: ``x`` is ``[N, C_in, *D]``; ``conv`` weights are ``[C_out, C_in/groups, *K]``;
``conv_transpose`` weights are ``[C_in, C_out/groups, *K]``.  fp16 inputs are accumulated in
fp32 (as Core ML's GPU does) and the result is cast back to the input dtype.

iOS17 only widens the dtype domains (weight/bias may differ from ``x``'s dtype, and
``conv_transpose``'s weight need not be const); the same implementations serve every opset.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from mljax.errors import OpError
from mljax.ops._registry import register

__all__ = ["conv", "conv_transpose"]

_PAD_TYPES = ("valid", "same", "same_lower", "custom")


def _ints(value, n: int, default: int, name: str) -> tuple[int, ...]:
    """A per-spatial-dimension attribute as a tuple of ``n`` ints (``None`` -> ``default``)."""
    if value is None:
        return (default,) * n
    vals = tuple(int(v) for v in np.asarray(value).reshape(-1))
    if len(vals) == 1 and n > 1:
        vals = vals * n
    if len(vals) != n:
        raise OpError(f"{name} must have {n} values (one per spatial dimension), found {len(vals)}")
    return vals


def _spatial_pads(pad_type: str, pad, in_sizes, kernel, strides, dilations=None):
    """``[(before, after), ...]`` padding per spatial dimension, as MIL's ``pad_type`` defines it.

    ``same`` pads so that ``out = ceil(in / stride)``; when the total is odd the extra element
    goes after (bottom/right), for ``same_lower`` it goes before (top/left).
    """
    n = len(in_sizes)
    dilations = dilations or (1,) * n
    pad_type = str(pad_type).lower()
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        p = _ints(pad, 2 * n, 0, "pad")
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            k_eff = (k - 1) * d + 1
            total = max(0, (math.ceil(size / s) - 1) * s + k_eff - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise OpError(f"pad_type must be one of {_PAD_TYPES}, found {pad_type!r}")


def _dimension_numbers(n_spatial: int):
    if not 1 <= n_spatial <= 3:
        raise OpError(f"expected 1 to 3 spatial dimensions (x of rank 3 to 5), found {n_spatial}")
    sp = "DHW"[3 - n_spatial:]
    return ("NC" + sp, "OI" + sp, "NC" + sp)


def _accumulate_dtype(dtype):
    return jnp.float32 if jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16) else None


def _add_bias(y, bias, n_spatial: int):
    if bias is None:
        return y
    return y + jnp.asarray(bias).astype(y.dtype).reshape((1, -1) + (1,) * n_spatial)


def _check_channels(op: str, c_in: int, groups: int, expected: int, found: int):
    if groups < 1 or c_in % groups:
        raise OpError(f"{op}: input channels ({c_in}) must be divisible by groups ({groups})")
    if expected != found:
        raise OpError(f"{op}: weight has {found} input channels per group, expected "
                      f"C_in / groups = {c_in} / {groups} = {expected}")


@register("conv")
def conv(x, weight, bias=None, *, strides=None, pad_type="valid", pad=None, dilations=None,
         groups=1):
    """N-D convolution of channel-first ``x`` with ``weight [C_out, C_in/groups, *K]``.

    ``same`` / ``same_lower`` padding follows TF's SAME rule (``out = ceil(in / stride)``);
    ``same_lower`` puts the odd padding element first.  iOS15's converter rejects
    ``same_lower``; it is accepted here for every opset.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    n = x.ndim - 2
    groups = int(groups)
    _check_channels("conv", x.shape[1], groups, x.shape[1] // max(groups, 1), weight.shape[1])
    kernel = weight.shape[2:]
    strides = _ints(strides, n, 1, "strides")
    dilations = _ints(dilations, n, 1, "dilations")
    pads = _spatial_pads(pad_type, pad, x.shape[2:], kernel, strides, dilations)
    if _is_depthwise(x.shape, weight.shape, groups, pads, strides, dilations):
        y = _depthwise(x, weight, strides, pads, dilations)
    elif _is_pointwise(weight.shape, groups, pads):
        y = _pointwise(x, weight, strides)
    else:
        y = lax.conv_general_dilated(
            x, weight.astype(x.dtype), window_strides=strides, padding=pads,
            rhs_dilation=dilations, dimension_numbers=_dimension_numbers(n),
            feature_group_count=groups, preferred_element_type=_accumulate_dtype(x.dtype))
    return _add_bias(y, bias, n).astype(x.dtype)


_DEPTHWISE_MAX_TAPS = 64


def _is_pointwise(w_shape, groups, pads) -> bool:
    return groups == 1 and all(k == 1 for k in w_shape[2:]) and all(p == (0, 0) for p in map(tuple, pads))


def _pointwise(x, weight, strides):
    """A 1x1 convolution as one batched matrix product over the flattened spatial positions.

    XLA:CPU runs it as a GEMM instead of a spatial convolution: 1.5-2.7x faster for the
    MobileNet-style pointwise layers of docs/performance.md.
    """
    if any(s != 1 for s in strides):
        x = x[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
    n, c, *spatial = x.shape
    w = jnp.broadcast_to(weight.reshape(weight.shape[:2]).astype(x.dtype), (n,) + tuple(weight.shape[:2]))
    y = lax.dot_general(w, x.reshape(n, c, -1), (((2,), (1,)), ((0,), (0,))),
                        preferred_element_type=_accumulate_dtype(x.dtype))
    return y.reshape((n, weight.shape[0], *spatial))


def _out_sizes(in_sizes, kernel, strides, pads, dilations):
    return [(size + lo + hi - ((k - 1) * d + 1)) // s + 1
            for size, k, s, (lo, hi), d in zip(in_sizes, kernel, strides, pads, dilations)]


def _is_depthwise(x_shape, w_shape, groups, pads, strides, dilations) -> bool:
    """One filter (or a few) per input channel with a small kernel: ``_depthwise`` applies."""
    kernel = w_shape[2:]
    return (groups > 1 and groups == x_shape[1] and w_shape[1] == 1 and w_shape[0] % groups == 0
            and math.prod(kernel) <= _DEPTHWISE_MAX_TAPS
            and min(_out_sizes(x_shape[2:], kernel, strides, pads, dilations)) > 0)


def _depthwise(x, weight, strides, pads, dilations):
    """A depthwise convolution as a sum over kernel taps of strided slices times per-channel weights.

    Same result as a grouped ``conv_general_dilated`` (fp16 accumulated in fp32), but XLA:CPU
    fuses the taps into one loop instead of running a grouped convolution, which it does
    one group at a time: 15-25x faster for 3x3 MobileNet layers on this project's benchmark
    machine (see docs/performance.md).
    """
    mult = weight.shape[0] // x.shape[1]
    if mult > 1:                          # channel multiplier: output o reads input channel o // mult
        x = jnp.repeat(x, mult, axis=1)
    acc = _accumulate_dtype(x.dtype) or x.dtype
    n_sp = x.ndim - 2
    xp = lax.pad(x.astype(acc), jnp.zeros((), acc), [(0, 0, 0)] * 2 + [(lo, hi, 0) for lo, hi in pads])
    kernel = weight.shape[2:]
    outs = _out_sizes(x.shape[2:], kernel, strides, pads, dilations)
    w = weight.astype(acc)
    y = None
    for tap in np.ndindex(*kernel):
        start = tuple(t * d for t, d in zip(tap, dilations))
        limit = tuple(b + (o - 1) * s + 1 for b, o, s in zip(start, outs, strides))
        window = lax.slice(xp, (0, 0) + start, xp.shape[:2] + limit, (1, 1) + tuple(strides))
        term = window * w[(slice(None), 0) + tap].reshape((1, -1) + (1,) * n_sp)
        y = term if y is None else y + term
    return y


def _transpose_out_sizes(pad_type, pad, output_shape, in_sizes, kernel, strides, dilations):
    """Output spatial sizes and the leading crop of the full transposed-conv output."""
    n = len(in_sizes)
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    full = [(i - 1) * s + k for i, s, k in zip(in_sizes, strides, k_eff)]
    pad_type = str(pad_type).lower()
    if pad_type not in _PAD_TYPES:
        raise OpError(f"pad_type must be one of {_PAD_TYPES}, found {pad_type!r}")
    if output_shape is not None:
        shape = [int(v) for v in np.asarray(output_shape).reshape(-1)]
        out = shape[-n:] if len(shape) in (n, n + 2) else None
        if out is None:
            raise OpError(f"output_shape must have {n + 2} (or {n}) values, found {len(shape)}")
    elif pad_type == "same" or pad_type == "same_lower":
        out = [i * s for i, s in zip(in_sizes, strides)]
    elif pad_type == "custom":
        p = _ints(pad, 2 * n, 0, "pad")
        out = [f - p[2 * i] - p[2 * i + 1] for i, f in enumerate(full)]
    else:
        out = list(full)
    if pad_type == "custom":
        before = list(_ints(pad, 2 * n, 0, "pad")[0::2])
    elif pad_type in ("same", "same_lower"):
        totals = [max(0, f - o) for f, o in zip(full, out)]
        before = [t // 2 if pad_type == "same" else t - t // 2 for t in totals]
    else:
        before = [0] * n
    return out, before, k_eff


def _transpose_kernel(weight, groups: int):
    """``[C_in, C_out/g, *K]`` -> the forward-conv kernel ``[C_out, C_in/g, *K]``, flipped."""
    c_in, c_out_g, *k = weight.shape
    w = weight.reshape((groups, c_in // groups, c_out_g, *k))
    w = jnp.swapaxes(w, 1, 2).reshape((groups * c_out_g, c_in // groups, *k))
    return jnp.flip(w, axis=tuple(range(2, w.ndim)))


@register("conv_transpose")
def conv_transpose(x, weight, bias=None, *, pad=None, output_shape=None, pad_type="valid",
                   strides=None, dilations=None, groups=1):
    """Transposed convolution with ``weight [C_in, C_out/groups, *K]``.

    Output size: ``output_shape`` when given, else ``(D-1)*s + K_eff`` minus the custom pads
    (``valid``: no pads; ``same``: ``D*s``).  Output position ``o`` is position
    ``o + pad_before`` of the full (uncropped) result; positions past its end are zero (plus
    bias), which is how an ``output_shape`` larger than the full result (PyTorch's
    ``output_padding``) reads.
    """
    x, weight = jnp.asarray(x), jnp.asarray(weight)
    n = x.ndim - 2
    groups = int(groups)
    c_in = x.shape[1]
    if weight.shape[0] != c_in or c_in % max(groups, 1):
        raise OpError(f"conv_transpose: weight's first dimension ({weight.shape[0]}) must equal "
                      f"the input channels ({c_in}), divisible by groups ({groups})")
    strides = _ints(strides, n, 1, "strides")
    dilations = _ints(dilations, n, 1, "dilations")
    out, before, k_eff = _transpose_out_sizes(pad_type, pad, output_shape, x.shape[2:],
                                              weight.shape[2:], strides, dilations)
    lo = [k - 1 - b for k, b in zip(k_eff, before)]
    hi = [o - (i - 1) * s - 1 + b for o, i, s, b in zip(out, x.shape[2:], strides, before)]
    y = lax.conv_general_dilated(
        x, _transpose_kernel(weight.astype(x.dtype), groups), window_strides=(1,) * n,
        padding=[(max(a, 0), max(b, 0)) for a, b in zip(lo, hi)], lhs_dilation=strides,
        rhs_dilation=dilations, dimension_numbers=_dimension_numbers(n),
        feature_group_count=groups, preferred_element_type=_accumulate_dtype(x.dtype))
    # Negative padding (crop more than the kernel overhang) is applied as a slice afterwards.
    crop = tuple(slice(max(-a, 0), y.shape[2 + i] - max(-b, 0))
                 for i, (a, b) in enumerate(zip(lo, hi)))
    y = y[(slice(None), slice(None)) + crop]
    return _add_bias(y, bias, n).astype(x.dtype)
