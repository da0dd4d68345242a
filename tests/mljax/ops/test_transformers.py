"""scaled_dot_product_attention against torch's SDPA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mljax.ops.transformers import scaled_dot_product_attention as sdpa
from tests.helpers import assert_close

RNG = np.random.default_rng(2)


def _torch(q, k, v, mask):
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    out = torch.nn.functional.scaled_dot_product_attention(
        t(q.astype(np.float32)), t(k.astype(np.float32)), t(v.astype(np.float32)),
        attn_mask=None if mask is None else (t(mask) if mask.dtype == bool else t(mask.astype(np.float32))))
    return out.numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("batch", [(2,), (2, 3)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("mask_batch", [False, True])
def test_sdpa_vs_torch(dtype, batch, mask_kind, mask_batch):
    L, S, E, EV = 4, 6, 8, 5
    q = RNG.standard_normal(batch + (L, E)).astype(dtype)
    k = RNG.standard_normal(batch + (S, E)).astype(dtype)
    v = RNG.standard_normal(batch + (S, EV)).astype(dtype)
    mshape = (batch + (L, S)) if mask_batch else (L, S)
    mask = None
    if mask_kind == "bool":
        mask = RNG.random(mshape) < 0.7
        mask[..., 0] = True  # no fully masked row (torch gives NaN there)
    elif mask_kind == "float":
        mask = RNG.standard_normal(mshape).astype(dtype)
    out = np.asarray(sdpa(q, k, v, mask))
    assert out.dtype == dtype and out.shape == batch + (L, EV)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-5)
    assert_close(out, _torch(q, k, v, mask), **tol)


def test_sdpa_e2e():
    from coremltools.converters.mil.mil import Builder as mb, types
    from tests.helpers import only, run_mil, target

    q, k, v = (RNG.standard_normal((1, 2, 3, 4)).astype(np.float32) for _ in range(3))
    mask = np.tril(np.ones((3, 3), bool))

    @mb.program(input_specs=[mb.TensorSpec((1, 2, 3, 4), types.fp32) for _ in range(3)],
                opset_version=target("iOS18"))
    def prog(q, k, v):
        return mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask)

    out = only(run_mil(prog, {"q": q, "k": k, "v": v}, opset="iOS18"))
    assert_close(out, _torch(q, k, v, mask), rtol=1e-5, atol=1e-5)
