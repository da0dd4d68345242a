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


def _check_gradients(f, ref, x, w, ct):
    """d/dx and d/dw of ``sum(f(x, w) * ct)`` equal the reference formula's, with ``f`` called on the
    whole batch and vmapped over its samples (as a list predict runs it)."""
    import jax
    for vmapped in (False, True):
        def loss(a, c, g):
            y = jax.vmap(lambda s: g(s[None], c)[0])(a) if vmapped else g(a, c)
            return (y * ct).sum()
        got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, f)
        want = jax.grad(loss, argnums=(0, 1))(x, w, ref)
        for g, g_ref in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides", [(1, 1), (2, 1)])
def test_pointwise_conv_batched_vmapped_and_differentiated(strides):
    """Several images run one GEMM each (a loop), whether a batch or a list predict's vmapped samples:
    values equal torch's, d/dx and d/dw equal those of the einsum formula, and the weights can be vmapped."""
    import jax
    x, w, b = rand((4, 5, 6, 7)), rand((3, 5, 1, 1)), rand((3,))
    kw = dict(strides=np.array(strides))
    ref = F.conv2d(t64(x), t64(w), t64(b), stride=strides).numpy()
    check(jax.jit(lambda a: conv(a, w, b, **kw))(x), ref, np.float32)
    check(jax.jit(jax.vmap(lambda a: conv(a[None], w, b, **kw)[0]))(x), ref, np.float32)
    ws = np.stack([w, -2 * w])
    check(jax.vmap(lambda c: conv(x, c, b, **kw))(ws),
          np.stack([F.conv2d(t64(x), t64(c), t64(b), stride=strides).numpy() for c in ws]), np.float32)

    def einsum_conv(a, c):
        a = a[:, :, ::strides[0], ::strides[1]]
        return jax.numpy.einsum("kc,nchw->nkhw", c[:, :, 0, 0], a, precision="highest") + b[:, None, None]
    _check_gradients(lambda a, c: conv(a, c, b, **kw), einsum_conv, x, w, rand(ref.shape))


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


@pytest.mark.parametrize("pads,strides", [([(1, 0), (1, 2)], (2, 1)), ([(0, 0), (2, 2)], (1, 1)), ([(1, 1), (0, 0)], (1, 2))])
def test_depthwise_padding_plain_vmapped_and_differentiated(pads, strides):
    """The depthwise taps read a zero-padded input: padded by concatenation when called directly, by
    ``lax.pad`` when vmapped over samples; both give torch's values, and d/dx, d/dw equal those through
    XLA's grouped convolution, vmapped or not."""
    import jax
    from jax import lax
    x, w, b = rand((3, 4, 9, 8)), rand((8, 1, 3, 3)), rand((8,))       # channel multiplier 2
    kw = dict(strides=np.array(strides), pad_type="custom", pad=np.array([p for lh in pads for p in lh]), groups=4)
    (t, bo), (le, r) = pads
    ref = F.conv2d(F.pad(t64(x), (le, r, t, bo)), t64(w), t64(b), stride=strides, groups=4).numpy()
    check(jax.jit(lambda a: conv(a, w, b, **kw))(x), ref, np.float32)
    check(jax.jit(jax.vmap(lambda a: conv(a[None], w, b, **kw)[0]))(x), ref, np.float32)

    def grouped(a, c):
        return lax.conv_general_dilated(a, c, strides, pads, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        feature_group_count=4, precision=lax.Precision.HIGHEST)
    _check_gradients(lambda a, c: conv(a, c, **kw), grouped, x, w, rand(ref.shape))


def _check_channel_last(x, w, b, strides, pads, dilations, groups):
    """A channel-last conv (``[N, H, W, C]`` in and out) equal to torch's convolution of the
    channel-first twin: alone, vmapped over a list predict's samples and in fp16.  Returns the
    keyword arguments and the fp64 reference, for a test's further checks."""
    import jax
    from mljax.ops.conv import convolution
    kw = dict(strides=strides, pad_type="custom", pad=tuple(v for p in pads for v in p), dilations=dilations,
              groups=groups, channels_last=True)
    ref = np.moveaxis(F.conv2d(torch_pad(t64(np.moveaxis(x, -1, 1)), pads), t64(w), t64(b), stride=strides,
                               dilation=dilations, groups=groups).numpy(), 1, -1)
    check(convolution(x, w, b, **kw), ref, np.float32)
    check(jax.jit(jax.vmap(lambda a: convolution(a, w, b, **kw)))(x[:, None]), ref[:, None], np.float32)
    check(convolution(x.astype(np.float16), w.astype(np.float16), b.astype(np.float16), **kw), ref, np.float16)
    return kw, ref


@pytest.mark.parametrize("channels,kernel,strides,pads,dilations", [
    (48, (5, 5), (1, 1), [(2, 2), (2, 2)], (1, 1)),     # three blocks of 16 channels
    (32, (3, 3), (2, 2), [(1, 0), (0, 1)], (1, 1)),     # two blocks, stride 2, uneven padding
    (32, (3, 2), (1, 2), [(2, 1), (1, 1)], (2, 1)),     # dilated, non-square
    (24, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1)),     # not a multiple of 16: unblocked
    (16, (5, 5), (2, 2), [(2, 2), (2, 2)], (1, 1)),     # one block: unblocked
])
def test_channel_last_depthwise_blocked_and_not(channels, kernel, strides, pads, dilations):
    """A channel-last depthwise layer (``[N, H, W, C]`` in and out) sums its taps over blocks of 16
    channels where C splits into several: alone, vmapped over a list predict's samples, in fp16 and
    with the weight laid out HWIO, equal to torch's grouped convolution; d/dx and d/dw equal those
    through XLA's grouped convolution."""
    from jax import lax
    from mljax.ops.conv import convolution
    x, w, b = rand((3, 11, 10, channels)), rand((channels, 1) + kernel), rand((channels,))
    kw, ref = _check_channel_last(x, w, b, strides, pads, dilations, channels)
    check(convolution(x, np.transpose(w, (2, 3, 1, 0)), b, weight_hwio=True, **kw), ref, np.float32)

    def grouped(a, c):
        return lax.conv_general_dilated(a, c, strides, pads, rhs_dilation=dilations, feature_group_count=channels,
                                        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=lax.Precision.HIGHEST)
    _check_gradients(lambda a, c: convolution(a, c, **kw), grouped, x, w, rand(ref.shape))


# -------------------------------------------------------------------------- conv paths
# conv_path picks im2col / Winograd / XLA's convolution by shape (rules measured in
# bench/conv_paths.py); each path must compute the same convolution.  The thresholds are
# lowered here so that small shapes take the fast paths.
FAST_CASES = [
    # batch, c_in, c_out, in_sizes, kernel, strides, dilations
    (1, 3, 4, (9, 11), (3, 3), (1, 1), (1, 1)),
    (3, 5, 6, (8, 7), (3, 3), (1, 1), (1, 1)),
    (2, 2, 3, (13, 10), (3, 3), (2, 2), (1, 1)),
    (2, 3, 5, (11, 12), (5, 3), (2, 3), (1, 1)),
    (1, 2, 3, (12, 9), (3, 3), (1, 2), (2, 1)),
    (2, 3, 4, (7, 6, 5), (2, 2, 2), (1, 2, 1), (1, 1, 1)),  # 3-D im2col
]


@pytest.fixture
def fast_paths(monkeypatch):
    from mljax.ops import conv as conv_mod
    monkeypatch.setattr(conv_mod, "_IM2COL_MAX_ROWS", conv_mod._IM2COL_MAX_ROWS)
    monkeypatch.setattr(conv_mod, "_IM2COL_MAX_POSITIONS", 0)
    monkeypatch.setattr(conv_mod, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_mod, "_WINOGRAD_MIN_TILES", 1)
    monkeypatch.setattr(conv_mod, "_WINOGRAD_F4_MIN_TILES", 1)
    monkeypatch.setattr(conv_mod, "_TEMP_BYTES", 1)    # one image per lax.map'd batch chunk
    return conv_mod


def _pads_for(mode, sizes, kernel, strides, dilations):
    n = len(sizes)
    if mode == "valid":
        return [(0, 0)] * n, None
    if mode == "custom":
        pads = [(i % 2 + 1, (i + 1) % 3) for i in range(n)]
        return pads, np.array(pads).ravel()
    return same_pads(sizes, kernel, strides, dilations, lower=mode == "same_lower"), None


def _conv_ref(x, w, b, pads, strides, dilations):
    return CONV[x.ndim - 2](torch_pad(t64(x), pads), t64(w), t64(b), stride=strides,
                            dilation=dilations).numpy()


@pytest.mark.parametrize("case,pad_type,dtype",
                         _with_fp16(FAST_CASES, ["valid", "same", "same_lower", "custom"], "custom"))
def test_fast_paths_match_torch(fast_paths, case, pad_type, dtype):
    """Through conv(): im2col where the kernel is not 3x3 stride 1, Winograd F(4x4,3x3) where it is."""
    batch, c_in, c_out, sizes, kernel, strides, dilations = case
    x, w, b = rand((batch, c_in) + sizes, dtype), rand((c_out, c_in) + kernel, dtype), rand((c_out,), dtype)
    pads, custom = _pads_for(pad_type, sizes, kernel, strides, dilations)
    kw = dict(strides=np.array(strides), dilations=np.array(dilations), pad_type=pad_type, pad=custom)
    winograd = len(sizes) == 2 and kernel == (3, 3) and strides == (1, 1) and dilations == (1, 1)
    setattr(fast_paths, "_IM2COL_MAX_ROWS", 0 if winograd else 10 ** 6)   # restored by monkeypatch
    assert fast_paths.conv_path(x.shape, w.shape, dtype, strides, pads, dilations, 1) == (
        "winograd" if winograd else "im2col")
    check(conv(x, w, b, **kw), _conv_ref(x, w, b, pads, strides, dilations), dtype)
    if batch > 1:   # one lax.map (scan) iteration per image
        import jax
        assert "scan" in str(jax.make_jaxpr(lambda a, c: conv(a, c, **kw))(x, w))


@pytest.mark.parametrize("c_in,sizes", [(8, (5, 4)), (2, (9, 8))])   # patch rows R 72 > positions P 6; R 18 < P 42
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_im2col_several_images_per_chunk(fast_paths, c_in, sizes, dtype):
    """Chunks of several images take one product: the weight broadcast per image where it is
    smaller than an image's output, else one [K, N, P] product transposed; both forms match
    torch, plain, under vmap (a list predict) and in their gradients."""
    import jax
    fast_paths._TEMP_BYTES = 1 << 30      # the whole batch in one chunk (restored by monkeypatch)
    fast_paths._IM2COL_MAX_ROWS = 10 ** 6
    x, w, b = rand((3, c_in) + sizes, dtype), rand((6, c_in, 3, 3), dtype), rand((6,), dtype)
    kw = dict(strides=np.array([1, 1]), pad_type="valid")
    assert fast_paths.conv_path(x.shape, w.shape, dtype, (1, 1), [(0, 0)] * 2, (1, 1), 1) == "im2col"
    ref = _conv_ref(x, w, b, [(0, 0)] * 2, (1, 1), (1, 1))
    check(conv(x, w, b, **kw), ref, dtype)
    vmapped = jax.vmap(lambda xi: conv(xi, w, b, **kw))(x[:, None])
    check(vmapped[:, 0], ref, dtype)
    if dtype == np.float32:
        loss = lambda a, c: (conv(a, c, b, **kw) ** 2).sum()   # noqa: E731
        got = jax.grad(loss, argnums=(0, 1))(x, w)
        xt, wt = t64(x).requires_grad_(), t64(w).requires_grad_()
        (F.conv2d(xt, wt, t64(b)) ** 2).sum().backward()
        for g, e in zip(got, (xt.grad.numpy(), wt.grad.numpy())):
            np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=1e-4, atol=1e-4)


WINOGRAD_CASES = [  # batch, c_in, c_out, (H, W), pads
    (1, 4, 3, (6, 6), [(1, 1), (1, 1)]),
    (2, 7, 5, (9, 13), [(0, 0), (0, 0)]),
    (3, 3, 8, (10, 7), [(2, 0), (1, 3)]),
    (1, 40, 33, (5, 11), [(1, 1), (0, 1)]),
]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("case", WINOGRAD_CASES)
def test_winograd_matches_torch(tile, case):
    from mljax.ops import conv as conv_mod
    batch, c_in, c_out, sizes, pads = case
    x, w = rand((batch, c_in) + sizes), rand((c_out, c_in, 3, 3)) / np.sqrt(9 * c_in)
    f = {2: conv_mod._WINOGRAD_F2, 4: conv_mod._WINOGRAD_F4}[tile]
    check(conv_mod._winograd(x, w, pads, f), _conv_ref(x, w, None, pads, (1, 1), (1, 1)), np.float32)


def test_winograd_realistic_weights_error():
    """F(4x4,3x3) at a realistic layer (64 -> 64 channels, He-scaled weights): within 1e-4 relative."""
    from mljax.ops import conv as conv_mod
    x = np.maximum(RNG.standard_normal((2, 64, 20, 20)), 0).astype(np.float32)
    w = (RNG.standard_normal((64, 64, 3, 3)) * np.sqrt(2 / (9 * 64))).astype(np.float32)
    ref = _conv_ref(x, w, None, [(1, 1)] * 2, (1, 1), (1, 1))
    y = np.asarray(conv_mod._winograd(x, w, [(1, 1)] * 2, conv_mod._WINOGRAD_F4), np.float64)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("path", ["im2col", "winograd2", "winograd4"])
def test_fast_path_gradients_match_lax(monkeypatch, path, chunked):
    """Weights stay differentiable arguments: d/dx and d/dw through a path equal those through lax.conv."""
    import jax
    from jax import lax

    from mljax.ops import conv as conv_mod
    if chunked:
        monkeypatch.setattr(conv_mod, "_TEMP_BYTES", 1)
    x, w = rand((2, 3, 9, 8)), rand((4, 3, 3, 3))
    pads, strides = [(1, 0), (1, 2)], ((2, 1) if path == "im2col" else (1, 1))
    ct = rand((2, 4) + tuple(conv_mod._out_sizes((9, 8), (3, 3), strides, pads, (1, 1))))
    fast = {"im2col": lambda x, w: conv_mod._im2col(x, w, strides, pads, (1, 1)),
            "winograd2": lambda x, w: conv_mod._winograd(x, w, pads, conv_mod._WINOGRAD_F2),
            "winograd4": lambda x, w: conv_mod._winograd(x, w, pads, conv_mod._WINOGRAD_F4)}[path]

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                        precision=lax.Precision.HIGHEST)

    grads = [jax.jit(jax.grad(lambda x, w, f=f: (f(x, w) * ct).sum(), argnums=(0, 1)))(x, w)
             for f in (fast, ref)]
    for g, g_ref in zip(*grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape,w_shape,strides,groups,dtype,expected", [
    ((32, 3, 64, 64), (32, 3, 3, 3), (1, 1), 1, np.float32, "im2col"),
    ((32, 3, 96, 96), (32, 3, 3, 3), (2, 2), 1, np.float16, "im2col"),
    ((32, 32, 32, 32), (64, 32, 3, 3), (1, 1), 1, np.float32, "winograd"),
    ((32, 64, 16, 16), (128, 64, 3, 3), (1, 1), 1, np.float16, "winograd"),
    ((1, 64, 8, 8), (64, 64, 3, 3), (1, 1), 1, np.float32, "im2col"),      # small map: few tiles
    ((1, 256, 14, 14), (256, 256, 3, 3), (2, 2), 1, np.float32, "im2col"),
    ((1, 64, 20, 20), (64, 64, 3, 3), (1, 1), 1, np.float16, "winograd2"),   # 25 4x4 tiles
    ((32, 512, 4, 4), (512, 512, 3, 3), (1, 1), 1, np.float32, "winograd2"),  # ResNet-18's last stage
    ((32, 256, 8, 8), (256, 256, 3, 3), (1, 1), 1, np.float32, "winograd"),   # 128 4x4 tiles
    ((1, 128, 16, 16), (128, 128, 3, 3), (1, 1), 1, np.float32, "winograd2"),
    ((8, 3, 112, 112), (64, 3, 7, 7), (2, 2), 1, np.float32, "lax"),       # 147-row patches
    ((32, 64, 32, 32), (128, 64, 3, 3), (1, 1), 1, np.float64, "lax"),
    ((32, 64, 32, 32), (128, 64, 3, 3), (2, 2), 1, np.float32, "lax"),     # strided, many channels
    ((32, 32, 32, 32), (64, 16, 3, 3), (1, 1), 2, np.float32, "lax"),      # grouped
    ((32, 32, 32, 32), (32, 1, 3, 3), (1, 1), 32, np.float32, "depthwise"),
    ((32, 64, 24, 24), (128, 64, 1, 1), (1, 1), 1, np.float32, "pointwise"),
])
def test_conv_path_rules(x_shape, w_shape, strides, groups, dtype, expected):
    from mljax.ops.conv import conv_path
    pads = [(w_shape[2] // 2,) * 2] * 2
    assert conv_path(x_shape, w_shape, dtype, strides, pads, (1, 1), groups) == expected


@pytest.mark.parametrize("batch", [1, 3])
def test_winograd2_path_matches_torch(fast_paths, batch):
    """Few 4x4 tiles: conv() takes F(2x2, 3x3), alone and vmapped over a list predict's samples."""
    import jax
    fast_paths._WINOGRAD_F4_MIN_TILES = 10 ** 6   # restored by monkeypatch
    x, w, b = rand((batch, 1, 5, 7, 6)), rand((4, 5, 3, 3)), rand((4,))
    assert fast_paths.conv_path((batch, 5, 7, 6), w.shape, np.float32, (1, 1), [(1, 1)] * 2, (1, 1), 1) == "winograd2"
    kw = dict(strides=np.array([1, 1]), pad_type="custom", pad=np.array([1, 1, 1, 1]))
    ref = np.stack([_conv_ref(x[i], w, b, [(1, 1)] * 2, (1, 1), (1, 1)) for i in range(batch)])
    check(conv(x[:, 0], w, b, **kw), ref[:, 0], np.float32)
    check(jax.jit(jax.vmap(lambda a: conv(a, w, b, **kw)))(x), ref, np.float32)


@pytest.mark.parametrize("c_in,strides,expected", [(5, (1, 1), "winograd"), (3, (2, 2), "im2col")])
def test_fast_paths_under_vmap(fast_paths, c_in, strides, expected):
    """A lowered model's function is vmapped over the samples of a list predict (batch 1 each):
    the fast paths fold the samples into the batch; values and gradients are unchanged, and
    vmapping over the weights works too."""
    import jax
    x, w, b = rand((4, 1, c_in, 9, 8)), rand((6, c_in, 3, 3)), rand((6,))
    assert fast_paths.conv_path((4, c_in, 9, 8), w.shape, np.float32, strides, [(1, 1)] * 2, (1, 1), 1) == expected
    kw = dict(strides=np.array(strides), pad_type="custom", pad=np.array([1, 1, 1, 1]))
    ref = np.stack([_conv_ref(x[i], w, b, [(1, 1)] * 2, strides, (1, 1)) for i in range(4)])
    check(jax.jit(jax.vmap(lambda a: conv(a, w, b, **kw)))(x), ref, np.float32)
    ws = np.stack([w, 2 * w])
    check(jax.vmap(lambda c: conv(x[0], c, b, **kw))(ws),
          np.stack([_conv_ref(x[0], c, b, [(1, 1)] * 2, strides, (1, 1)) for c in ws]), np.float32)

    def loss(w, fast):
        f = (lambda a: conv(a, w, b, **kw)) if fast else (
            lambda a: jax.lax.conv_general_dilated(a, w, strides, [(1, 1)] * 2, dimension_numbers=(
                "NCHW", "OIHW", "NCHW"), precision=jax.lax.Precision.HIGHEST) + b[:, None, None])
        return (jax.vmap(f)(x) ** 2).sum()
    np.testing.assert_allclose(jax.grad(loss)(w, True), jax.grad(loss)(w, False), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("c_in,kernel,strides,pads,dilations", [
    (3, (3, 3), (2, 2), [(1, 0), (1, 1)], (1, 1)),     # an RGB stem, padding partly never read
    (3, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1)),
    (1, (5, 5), (2, 1), [(2, 2), (0, 3)], (1, 1)),
    (2, (3, 2), (1, 2), [(2, 1), (1, 1)], (2, 1)),
])
def test_first_layer_into_channel_last(c_in, kernel, strides, pads, dilations):
    """A channel-last region's first layer reads the channel-first input and returns [N, H', W', C]
    (the tap sum of ``_direct_last``): alone, at batch 1, vmapped over a list predict's samples and
    differentiated, equal to torch's convolution."""
    import jax
    from mljax.ops.conv import convolution
    c_out = 8
    x, w, b = rand((3, c_in, 13, 11)), rand((c_out, c_in) + kernel), rand((c_out,))
    kw = dict(strides=strides, pad_type="custom", pad=tuple(v for p in pads for v in p), dilations=dilations,
              channels_last=True, first_in=True)
    ref = np.moveaxis(F.conv2d(torch_pad(t64(x), pads), t64(w), t64(b), stride=strides, dilation=dilations).numpy(),
                      1, -1)
    check(convolution(x[:1], w, b, **kw), ref[:1], np.float32)
    check(convolution(x, w, b, **kw), ref, np.float32)
    check(jax.jit(jax.vmap(lambda a: convolution(a, w, b, **kw)))(x[:, None]), ref[:, None], np.float32)
    check(convolution(x.astype(np.float16), w.astype(np.float16), b.astype(np.float16), **kw), ref, np.float16)
    # the weight laid out HWIO at load (the graph layer's weight_hwio)
    check(convolution(x, np.transpose(w, (2, 3, 1, 0)), b, weight_hwio=True, **kw), ref, np.float32)

    def loss(w, first):
        y = convolution(x, w, b, **kw) if first else jax.lax.conv_general_dilated(
            x, w, strides, pads, rhs_dilation=dilations, dimension_numbers=("NCHW", "OIHW", "NHWC"),
            precision=jax.lax.Precision.HIGHEST) + b
        return (y ** 2).sum()
    np.testing.assert_allclose(jax.grad(loss)(w, True), jax.grad(loss)(w, False), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("op", ["conv", "conv_transpose"])
def test_xla_convolution_inside_a_loop_runs_channel_last(op):
    """XLA:CPU ran a channel-first convolution inside a while body (``lax.map``, ``lax.scan``, a MIL
    ``while_loop``) as a generic loop, 13-140x slower than outside; mljax issues XLA's convolution
    channel-last.  Values against torch; the compiled loop's convolution is NHWC."""
    import re

    import jax
    from mljax.ops.conv import conv_path
    x = rand((2, 1, 3, 40, 40))
    if op == "conv":
        w = rand((8, 3, 7, 7))
        assert conv_path((1, 3, 40, 40), w.shape, np.float32, (2, 2), [(3, 3)] * 2, (1, 1), 1) == "lax"
        one = lambda xi: conv(xi, w, strides=np.array([2, 2]), pad_type="custom", pad=np.array([3, 3, 3, 3]))   # noqa: E731
        ref = [F.conv2d(t64(xi), t64(w), stride=2, padding=3).numpy() for xi in x]
    else:
        w = rand((3, 4, 3, 3))
        one = lambda xi: conv_transpose(xi, w, strides=np.array([2, 2]))   # noqa: E731
        ref = [F.conv_transpose2d(t64(xi), t64(w), stride=2).numpy() for xi in x]
    looped = jax.jit(lambda a: jax.lax.map(one, a))
    check(looped(x), np.stack(ref), np.float32)
    hlo = looped.lower(x).compile().as_text()
    labels = [re.search(r"dim_labels=([\w>-]+)", line).group(1) for line in hlo.split("\n") if " convolution(" in line]
    assert labels == ["b01f_01io->b01f"], labels


@pytest.mark.parametrize("path,c_in,c_out,groups,kernel,strides,pads,dilations", [
    ("winograd", 5, 6, 1, (3, 3), (1, 1), [(1, 1), (1, 1)], (1, 1)),
    ("winograd", 4, 3, 1, (3, 3), (1, 1), [(2, 0), (0, 1)], (1, 1)),     # uneven padding, cropped tiles
    ("winograd2", 3, 7, 1, (3, 3), (1, 1), [(0, 0), (1, 1)], (1, 1)),
    ("winograd/weights-left", 4, 3, 1, (3, 3), (1, 1), [(2, 0), (0, 1)], (1, 1)),
    ("winograd2/weights-left", 3, 7, 1, (3, 3), (1, 1), [(0, 0), (1, 1)], (1, 1)),
    ("im2col", 2, 4, 1, (3, 2), (2, 1), [(1, 0), (0, 1)], (1, 1)),
    ("lax", 4, 6, 2, (3, 3), (2, 2), [(1, 1), (1, 1)], (1, 1)),          # grouped, strided
    ("lax", 3, 5, 1, (5, 3), (1, 2), [(2, 2), (1, 0)], (2, 1)),          # dilated
])
def test_channel_last_dense_paths(monkeypatch, path, c_in, c_out, groups, kernel, strides, pads, dilations):
    """A dense conv of a channel-last region (``[N, H, W, C]`` in and out) by each path it can take:
    alone, vmapped over a list predict's samples (the path picked again at the folded batch), in
    fp16, with a prepared Winograd transform, equal to torch's convolution; d/dx and d/dw equal
    those through XLA's convolution.  Winograd's small layers multiply the tiles by the weights,
    larger ones (``/weights-left``) the weights by the tiles."""
    import jax
    from jax import lax

    from mljax.ops import conv as conv_mod
    from mljax.ops.conv import convolution, winograd_weight
    monkeypatch.setattr(conv_mod, "_TEMP_BYTES", 1)        # chunks of one image
    path, _, variant = path.partition("/")
    if variant:
        monkeypatch.setattr(conv_mod, "_WINOGRAD_ROWS_MAX_WEIGHTS", 0)
    if path == "im2col":
        monkeypatch.setattr(conv_mod, "_IM2COL_MAX_ROWS", 10 ** 6)
    else:
        monkeypatch.setattr(conv_mod, "_IM2COL_MAX_ROWS", 0)
        monkeypatch.setattr(conv_mod, "_IM2COL_MAX_POSITIONS", 0)
        monkeypatch.setattr(conv_mod, "_WINOGRAD_MIN_CHANNELS", 1)
        monkeypatch.setattr(conv_mod, "_WINOGRAD_MIN_TILES", 1)
        monkeypatch.setattr(conv_mod, "_WINOGRAD_F4_MIN_TILES", 1 if path == "winograd" else 10 ** 6)
    x, w, b = rand((3, 9, 10, c_in)), rand((c_out, c_in // groups) + kernel) / 3, rand((c_out,))
    geom = (strides, [tuple(p) for p in pads], dilations)
    assert conv_mod.conv_path((3, c_in, 9, 10), w.shape, np.float32, *geom, groups) == path
    kw, ref = _check_channel_last(x, w, b, strides, pads, dilations, groups)
    if path.startswith("winograd"):
        u = winograd_weight(w, 4 if path == "winograd" else 2)
        check(convolution(x, w, b, winograd_u=u, **kw), ref, np.float32)
        check(jax.jit(jax.vmap(lambda a: convolution(a, w, b, winograd_u=u, **kw)))(x[:, None]), ref[:, None],
              np.float32)

    def xla(a, c):
        return lax.conv_general_dilated(a, c, strides, pads, rhs_dilation=dilations, feature_group_count=groups,
                                        dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=lax.Precision.HIGHEST)
    _check_gradients(lambda a, c: convolution(a, c, **kw), xla, x, w, rand(ref.shape))
