"""conv / conv_transpose against torch.nn.functional (CPU, float64), plus end-to-end models."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mljax.errors import OpError
from mljax.ops import _registry
from mljax.ops.conv import conv, conv_transpose

RNG = np.random.default_rng(0)
TOL = {np.float32: 2e-5, np.float16: 2e-2}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def rand(shape, dtype=np.float32):
    return RNG.uniform(-1, 1, size=shape).astype(dtype)


def t64(a):
    return None if a is None else torch.tensor(np.asarray(a, np.float64))


def check(actual, expected, dtype):
    actual = np.asarray(actual)
    assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    tol = TOL[dtype]
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol)


def same_pads(sizes, kernel, strides, dilations, lower=False):
    """TF SAME: out = ceil(in / s); the odd element goes after (before for same_lower)."""
    pads = []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        first = total - total // 2 if lower else total // 2
        pads.append((first, total - first))
    return pads


def torch_pad(x, pads):
    """[(before, after), ...] per spatial dim -> F.pad, which lists the last dim first."""
    flat = [p for pair in reversed(pads) for p in pair]
    return F.pad(x, flat)


def test_registered_opsets():
    reg = _registry.registry()
    assert sorted(reg["conv"]) == [15]
    assert sorted(reg["conv_transpose"]) == [15]


CONV_CASES = [
    # n, in_sizes, kernel, strides, dilations, groups, c_in, c_out
    (1, (11,), (3,), (1,), (1,), 1, 3, 4),
    (1, (12,), (4,), (2,), (2,), 3, 6, 6),
    (2, (9, 10), (3, 3), (1, 1), (1, 1), 1, 3, 5),
    (2, (9, 10), (3, 2), (2, 3), (1, 2), 2, 4, 6),
    (2, (8, 7), (3, 3), (2, 2), (1, 1), 4, 4, 8),  # depthwise, multiplier 2
    (2, (9, 8), (3, 3), (2, 1), (2, 2), 5, 5, 5),  # depthwise, dilated and strided
    (1, (13,), (5,), (3,), (1,), 3, 3, 3),         # depthwise 1-D
    (3, (4, 5, 6), (2, 2, 3), (1, 1, 2), (1, 2, 1), 3, 3, 6),  # depthwise 3-D, multiplier 2
    (2, (6, 6), (1, 1), (1, 1), (1, 1), 1, 5, 3),  # pointwise
    (2, (7, 6), (1, 1), (2, 3), (1, 1), 1, 4, 6),  # pointwise, strided
    (1, (9,), (1,), (1,), (1,), 1, 3, 2),          # pointwise 1-D
    (3, (5, 6, 7), (2, 3, 3), (1, 2, 1), (2, 1, 1), 2, 4, 2),
]


def _with_fp16(cases, modes, fp16_mode):
    """Every case x mode in fp32, and every case once in fp16 (keeps the file fast)."""
    return ([(c, m, np.float32) for c in cases for m in modes]
            + [(c, fp16_mode, np.float16) for c in cases])


@pytest.mark.parametrize("case,pad_type,dtype",
                         _with_fp16(CONV_CASES, ["valid", "same", "same_lower", "custom"], "same"))
def test_conv_matches_torch(case, pad_type, dtype):
    n, sizes, kernel, strides, dilations, groups, c_in, c_out = case
    x = rand((2, c_in) + sizes, dtype)
    w = rand((c_out, c_in // groups) + kernel, dtype)
    b = rand((c_out,), dtype) if groups != 2 else None
    custom = [p for i in range(n) for p in (i + 1, i % 2)]
    if pad_type == "valid":
        pads = [(0, 0)] * n
    elif pad_type == "custom":
        pads = [(custom[2 * i], custom[2 * i + 1]) for i in range(n)]
    else:
        pads = same_pads(sizes, kernel, strides, dilations, lower=pad_type == "same_lower")
    y = conv(x, w, b, strides=np.array(strides), pad_type=pad_type, pad=np.array(custom),
             dilations=np.array(dilations), groups=groups)
    ref = CONV[n](torch_pad(t64(x), pads), t64(w), t64(b), stride=strides,
                  dilation=dilations, groups=groups).numpy()
    check(y, ref, dtype)
    if pad_type.startswith("same"):
        assert np.asarray(y).shape[2:] == tuple(math.ceil(s / st) for s, st in zip(sizes, strides))


def test_conv_defaults_and_mixed_weight_dtype():
    """iOS17 lets weight/bias be fp32 under fp16 x; the output keeps x's dtype."""
    x, w, b = rand((1, 3, 7, 7), np.float16), rand((4, 3, 3, 3)), rand((4,))
    y = conv(x, w, b)
    ref = F.conv2d(t64(x), t64(w.astype(np.float16)), t64(b)).numpy()
    check(y, ref, np.float16)


def test_conv_rejects_bad_groups_and_pad_type():
    x, w = rand((1, 4, 5, 5)), rand((4, 3, 3, 3))
    with pytest.raises(OpError, match="divisible by groups"):
        conv(x, w, groups=3)
    with pytest.raises(OpError, match="pad_type"):
        conv(x, rand((4, 4, 3, 3)), pad_type="reflect")


TRANSPOSE_CASES = [
    # n, in_sizes, kernel, strides, dilations, groups, c_in, c_out
    (1, (7,), (3,), (2,), (1,), 1, 3, 4),
    (2, (5, 6), (3, 3), (2, 2), (1, 1), 1, 3, 2),
    (2, (5, 6), (3, 4), (2, 3), (1, 2), 2, 4, 6),
    (2, (4, 4), (2, 2), (3, 3), (1, 1), 1, 2, 2),  # stride > kernel
    (3, (3, 4, 3), (2, 3, 2), (2, 1, 2), (1, 1, 1), 1, 2, 3),
]


@pytest.mark.parametrize("case,mode,dtype", _with_fp16(
    TRANSPOSE_CASES, ["valid", "custom", "same", "output_padding"], "output_padding"))
def test_conv_transpose_matches_torch(case, mode, dtype):
    n, sizes, kernel, strides, dilations, groups, c_in, c_out = case
    x = rand((2, c_in) + sizes, dtype)
    w = rand((c_in, c_out // groups) + kernel, dtype)
    b = rand((c_out,), dtype)
    full = CONV_T[n](t64(x), t64(w), t64(b), stride=strides, dilation=dilations,
                     groups=groups).numpy()
    k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    kwargs = dict(strides=np.array(strides), dilations=np.array(dilations), groups=groups)
    if mode == "valid":
        ref = full
        y = conv_transpose(x, w, b, pad_type="valid", **kwargs)
    elif mode == "custom":
        pads = [(min(1, k - 1), min(i % 2, k - 1)) for i, k in enumerate(k_eff)]
        ref = full[(Ellipsis,) + tuple(slice(a, full.shape[2 + i] - c)
                                       for i, (a, c) in enumerate(pads))]
        y = conv_transpose(x, w, b, pad_type="custom", pad=np.array(pads).ravel(), **kwargs)
    elif mode == "same":
        # TF SAME: out = in * stride, cropped from the full result starting at floor(total/2);
        # positions past the full result hold only the bias.
        outs = [size * s for size, s in zip(sizes, strides)]
        starts = [max(f - o, 0) // 2 for f, o in zip(full.shape[2:], outs)]
        bias = b.astype(np.float64).reshape([1, -1] + [1] * n)
        grow = [(0, 0), (0, 0)] + [(0, max(o + st - f, 0))
                                   for o, st, f in zip(outs, starts, full.shape[2:])]
        ext = np.pad(full - bias, grow) + bias
        ref = ext[(Ellipsis,) + tuple(slice(st, st + o) for st, o in zip(starts, outs))]
        y = conv_transpose(x, w, b, pad_type="same", **kwargs)
    else:  # PyTorch padding + output_padding, expressed as custom pads + output_shape
        padding = [min(1, k - 1) for k in k_eff]
        out_pad = [min(1, s - 1) for s in strides]
        ref = CONV_T[n](t64(x), t64(w), t64(b), stride=strides, padding=padding,
                        output_padding=out_pad, dilation=dilations, groups=groups).numpy()
        y = conv_transpose(x, w, b, pad_type="custom", pad=np.repeat(padding, 2),
                           output_shape=np.array(ref.shape), **kwargs)
    check(y, ref, dtype)


# -------------------------------------------------------------------------- end to end
def _e2e(build, inputs, opset, fp16=False):
    helpers = pytest.importorskip("helpers")
    return helpers.only(helpers.run_mil(build, inputs, opset=opset, fp16=fp16))


@pytest.mark.parametrize("opset", ["iOS15", "iOS17"])
def test_e2e_conv_depthwise_same(opset):
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    w, b = rand((8, 1, 3, 3)), rand((8,))
    x = rand((1, 4, 9, 8))

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)],
                opset_version=getattr(ct.target, opset))
    def prog(x):
        return mb.conv(x=x, weight=w, bias=b, pad_type="same", strides=[2, 2], groups=4)

    ref = F.conv2d(torch_pad(t64(x), same_pads((9, 8), (3, 3), (2, 2), (1, 1))), t64(w), t64(b),
                   stride=2, groups=4).numpy()
    check(_e2e(prog, {"x": x}, opset), ref, np.float32)


def test_e2e_conv_transpose_fp16_model():
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    w, b = rand((3, 2, 3, 3)), rand((2,))
    x = rand((1, 3, 5, 6))

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)],
                opset_version=ct.target.iOS16)
    def prog(x):
        return mb.conv_transpose(x=x, weight=w, bias=b, pad_type="custom", pad=[1, 1, 1, 1],
                                 strides=[2, 2])

    ref = F.conv_transpose2d(t64(x), t64(w), t64(b), stride=2, padding=1).numpy()
    out = _e2e(prog, {"x": x}, "iOS16", fp16=True)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=2e-2, atol=2e-2)


def test_pointwise_conv_is_a_matrix_product():
    import jax
    x, w = rand((3, 5, 4, 6)), rand((7, 5, 1, 1))
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv(a, b, strides=np.array([2, 1])))(x, w))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr
    check(conv(x, w, strides=np.array([2, 1])), F.conv2d(t64(x), t64(w), stride=(2, 1)).numpy(), np.float32)


def test_depthwise_conv_avoids_grouped_convolution():
    """Depthwise layers run as fused shifted products (no grouped conv for XLA:CPU), same values."""
    import jax
    x, w = rand((2, 6, 10, 10)), rand((6, 1, 3, 3))
    kw = dict(strides=np.array([2, 2]), pad_type="same", groups=6)
    jaxpr = str(jax.make_jaxpr(lambda a, b: conv(a, b, **kw))(x, w))
    assert "conv_general_dilated" not in jaxpr
    ref = F.conv2d(torch_pad(t64(x), same_pads((10, 10), (3, 3), (2, 2), (1, 1))), t64(w), stride=2,
                   groups=6).numpy()
    check(conv(x, w, **kw), ref, np.float32)
