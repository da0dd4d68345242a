"""avg_pool / max_pool / l2_pool against a loop-based NumPy reference and torch, plus e2e."""
from __future__ import annotations

import functools
import itertools
import math

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mljax.errors import OpError
from mljax.ops import _registry
from mljax.ops.pool import avg_pool, l2_pool, max_pool

RNG = np.random.default_rng(1)
TOL = {np.float32: 1e-5, np.float16: 1e-2}


def rand(shape, dtype=np.float32):
    return RNG.uniform(-2, 2, size=shape).astype(dtype)


def call(fn, *tensors, **static):
    """Run an op as the runtime does: jitted, with the static inputs bound before tracing."""
    return jax.jit(functools.partial(fn, **static))(*tensors)


def check(actual, expected, dtype):
    actual = np.asarray(actual)
    assert actual.dtype == np.dtype(dtype), (actual.dtype, dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=TOL[dtype],
                               atol=TOL[dtype])


def ref_pads(pad_type, pad, sizes, kernel, strides):
    if pad_type == "valid":
        return [(0, 0)] * len(sizes)
    if pad_type == "custom":
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(len(sizes))]
    pads = []
    for n, k, s in zip(sizes, kernel, strides):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        first = total - total // 2 if pad_type == "same_lower" else total // 2
        pads.append((first, total - first))
    return pads


def ref_out(n, pads, k, s, ceil_mode):
    """MIL's output size (coremltools' type inference)."""
    total = sum(pads)
    if not ceil_mode:
        return (n + total - k) // s + 1
    out = math.floor((n + total - k + s - 1) / s + 1)
    if total > 0 and (out - 1) * s >= n + total / 2:
        out -= 1
    return out


def ref_pool(x, kind, kernel, strides, pads, ceil_mode=False, exclude=False):
    """Window by window over float64 data: the definition, no vectorized tricks."""
    x = x.astype(np.float64)
    sizes = x.shape[2:]
    outs = [ref_out(n, p, k, s, ceil_mode) for n, p, k, s in zip(sizes, pads, kernel, strides)]
    y = np.zeros(x.shape[:2] + tuple(outs))
    for o in itertools.product(*map(range, outs)):
        starts = [oi * s - p[0] for oi, s, p in zip(o, strides, pads)]
        window = tuple(slice(max(st, 0), min(st + k, n)) for st, k, n in zip(starts, kernel, sizes))
        vals = x[(Ellipsis,) + window].reshape(x.shape[:2] + (-1,))
        if kind == "max":
            y[(Ellipsis,) + o] = vals.max(-1) if vals.shape[-1] else -np.inf
        elif kind == "l2":
            y[(Ellipsis,) + o] = np.sqrt((vals ** 2).sum(-1))
        else:
            if exclude:
                count = vals.shape[-1]
            else:  # padded cells count, cells past the padding (ceil_mode overhang) do not
                count = np.prod([min(st + k, n + p[1]) - st
                                 for st, k, n, p in zip(starts, kernel, sizes, pads)])
            y[(Ellipsis,) + o] = vals.sum(-1) / max(count, 1)
    return y


def test_registered_opsets():
    reg = _registry.registry()
    for op in ("avg_pool", "max_pool", "l2_pool"):
        assert sorted(reg[op]) == [15], op


POOL_CASES = [
    # spatial sizes, kernel, strides, custom pad
    ((10,), (3,), (2,), (1, 1)),
    ((9, 11), (3, 3), (2, 2), (1, 1, 0, 2)),
    ((8, 7), (2, 3), (1, 2), (0, 1, 1, 1)),
    ((4, 5, 6), (2, 2, 3), (2, 1, 2), (1, 0, 0, 1, 1, 1)),
]


@pytest.mark.parametrize("kind", ["avg", "avg_exclude", "max", "l2"])
@pytest.mark.parametrize("pad_type", ["valid", "same", "same_lower", "custom"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_matches_reference(case, pad_type, kind):
    sizes, kernel, strides, pad = case
    if kind == "l2" and len(sizes) == 3:
        pytest.skip("l2_pool is 1-D / 2-D only")
    x = rand((2, 3) + sizes)
    pads = ref_pads(pad_type, pad, sizes, kernel, strides)
    ref = ref_pool(x, kind.split("_")[0], kernel, strides, pads, exclude=kind == "avg_exclude")
    kw = dict(kernel_sizes=np.array(kernel), strides=np.array(strides), pad_type=pad_type,
              pad=np.array(pad))
    if kind.startswith("avg"):
        y = call(avg_pool, x, exclude_padding_from_average=kind == "avg_exclude", **kw)
    else:
        y = call(max_pool if kind == "max" else l2_pool, x, **kw)
    check(y, ref, np.float32)


@pytest.mark.parametrize("kind", ["avg", "avg_exclude", "max", "l2"])
@pytest.mark.parametrize("case", POOL_CASES[:2])
def test_pool_fp16(case, kind):
    sizes, kernel, strides, pad = case
    x = rand((1, 2) + sizes, np.float16)
    pads = ref_pads("custom", pad, sizes, kernel, strides)
    ref = ref_pool(x, kind.split("_")[0], kernel, strides, pads, exclude=kind == "avg_exclude")
    kw = dict(kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pad)
    if kind.startswith("avg"):
        y = call(avg_pool, x, exclude_padding_from_average=kind == "avg_exclude", **kw)
    else:
        y = call(max_pool if kind == "max" else l2_pool, x, **kw)
    check(y, ref, np.float16)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("sizes,kernel,strides,padding", [
    ((9, 10), (3, 2), (2, 3), (1, 1)),
    ((7, 7), (3, 3), (2, 2), (1, 0)),
    ((12,), (4,), (3,), (2,)),
])
def test_pool_matches_torch(sizes, kernel, strides, padding, exclude, ceil_mode):
    """Symmetric pads: torch's avg/max pool (ceil_mode and count_include_pad) as the reference."""
    x = rand((2, 3) + sizes)
    xt = torch.tensor(x, dtype=torch.float64)
    pad = np.repeat(padding, 2)
    avg = {1: F.avg_pool1d, 2: F.avg_pool2d}[len(sizes)]
    mx = {1: F.max_pool1d, 2: F.max_pool2d}[len(sizes)]
    ref = avg(xt, kernel, strides, padding, ceil_mode=ceil_mode,
              count_include_pad=not exclude).numpy()
    y = call(avg_pool, x, kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pad,
                 exclude_padding_from_average=exclude, ceil_mode=ceil_mode)
    check(y, ref, np.float32)
    ref = mx(xt, kernel, strides, padding, ceil_mode=ceil_mode).numpy()
    check(call(max_pool, x, kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pad,
                   ceil_mode=ceil_mode), ref, np.float32)


def test_ceil_mode_without_padding_and_global_pool():
    x = rand((1, 2, 7, 9))
    check(call(max_pool, x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid", ceil_mode=True),
          F.max_pool2d(torch.tensor(x, dtype=torch.float64), 2, 2, ceil_mode=True).numpy(),
          np.float32)
    check(call(avg_pool, x, kernel_sizes=[7, 9], pad_type="valid"),
          x.astype(np.float64).mean(axis=(2, 3), keepdims=True), np.float32)


def test_pool_errors():
    with pytest.raises(OpError, match="does not fit"):
        max_pool(rand((1, 1, 3, 3)), kernel_sizes=[4, 4], pad_type="valid")
    with pytest.raises(OpError, match="l2_pool"):
        l2_pool(rand((1, 1, 3, 3, 3)), kernel_sizes=[2, 2, 2], pad_type="valid")


# -------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("opset", ["iOS15", "iOS17"])
def test_e2e_pools(opset):
    helpers = pytest.importorskip("helpers")
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    x = rand((1, 3, 9, 8))

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape, dtype=types.fp32)],
                opset_version=getattr(ct.target, opset))
    def prog(x):
        return (mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same",
                            exclude_padding_from_average=True, name="avg"),
                mb.max_pool(x=x, kernel_sizes=[3, 2], strides=[2, 2], pad_type="custom",
                            pad=[1, 1, 1, 1], ceil_mode=True, name="mx"),
                mb.l2_pool(x=x, kernel_sizes=[2, 2], strides=[1, 1], pad_type="valid", name="l2"))

    out = helpers.run_mil(prog, {"x": x}, opset=opset)
    same = ref_pads("same", None, (9, 8), (3, 3), (2, 2))
    check(out["avg"], ref_pool(x, "avg", (3, 3), (2, 2), same, exclude=True), np.float32)
    check(out["mx"], ref_pool(x, "max", (3, 2), (2, 2), [(1, 1), (1, 1)], ceil_mode=True),
          np.float32)
    check(out["l2"], ref_pool(x, "l2", (2, 2), (1, 1), [(0, 0), (0, 0)]), np.float32)


def test_pooling_is_differentiable_under_jit():
    """Gradients through pooling inside jit (as updatable.Pipeline trains) match torch autograd."""
    import jax
    import torch
    from mljax.ops.pool import avg_pool, max_pool

    x = np.random.default_rng(5).normal(size=(1, 2, 6, 6)).astype(np.float32)

    def f(v):
        return (max_pool(v, kernel_sizes=[2, 2], strides=[2, 2]) ** 2).sum() + \
            avg_pool(v, kernel_sizes=[3, 3], strides=[1, 1]).sum()

    got = np.asarray(jax.jit(jax.grad(f))(x))
    t = torch.from_numpy(x).requires_grad_()
    ref = (torch.nn.functional.max_pool2d(t, 2, 2) ** 2).sum() + torch.nn.functional.avg_pool2d(t, 3, 1).sum()
    ref.backward()
    np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,pad,ceil,exclude", [
    (3, 2, 1, False, False),      # ResNet's stem pool
    (2, 2, 0, True, False),       # ceil_mode: a trailing partial window
    (3, 1, 1, False, True),       # average excluding the padding
    (5, 1, 2, False, False),      # 25 cells: reduce_window rather than slices
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_channel_last_pools_match_torch(kernel, stride, pad, ceil, exclude, dtype):
    """max_pool / avg_pool of a channel-last ``[N, H, W, C]`` value (a channel-last region's, by the
    graph layer's hint) equal torch's pools of the channel-first twin, alone and vmapped."""
    from mljax.ops.pool import average_pool, maximum_pool
    x = rand((2, 9, 8, 5))
    xt = torch.tensor(np.moveaxis(x, -1, 1).astype(np.float64))
    kw = dict(kernel_sizes=[kernel, kernel], strides=[stride, stride], pad_type="custom", pad=[pad] * 4,
              ceil_mode=ceil)
    refs = {maximum_pool: F.max_pool2d(xt, kernel, stride, pad, ceil_mode=ceil),
            average_pool: F.avg_pool2d(xt, kernel, stride, pad, ceil_mode=ceil, count_include_pad=not exclude)}
    for fn, ref in refs.items():
        extra = dict(exclude_padding_from_average=exclude) if fn is average_pool else {}
        ref = np.moveaxis(ref.numpy(), 1, -1)
        check(call(fn, x.astype(dtype), channels_last=True, **kw, **extra), ref, dtype)
        vm = jax.jit(jax.vmap(lambda a, fn=fn, extra=extra: fn(a, channels_last=True, **kw, **extra)))
        check(vm(x[:, None].astype(dtype)), ref[:, None], dtype)
