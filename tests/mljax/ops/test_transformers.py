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


# --- mljax.attention: the internal op the graph pass fuse_attention writes ---------------------
def _swap(a):
    return np.swapaxes(a, -1, -2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("tx,ty,tv", [(False, True, False), (False, False, False), (True, True, True)])
@pytest.mark.parametrize("lead", [[(1, 3), (1, 3), (1, 3)], [(2, 3), (1, 3), (2, 1)], [(), (), ()]])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_op_vs_torch(dtype, tx, ty, tv, lead, mask_kind):
    """Every transpose flag, leading axes equal (flattened into one), broadcasting or absent,
    bool and float masks, fp32 (normalized after the second product) and fp16, against torch's
    SDPA at the same scale."""
    from mljax.ops.transformers import attention
    L, S, E, EV, scale = 4, 6, 8, 5, 0.3
    lq, lk, lv = (tuple(s) for s in lead)
    q = RNG.standard_normal(lq + (L, E)).astype(dtype)
    k = RNG.standard_normal(lk + (S, E)).astype(dtype)
    v = RNG.standard_normal(lv + (S, EV)).astype(dtype)
    mask = None
    if mask_kind == "bool":
        mask = RNG.random((L, S)) < 0.7
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = RNG.standard_normal((1, L, S)).astype(dtype)
    x = _swap(q) if tx else q
    y = k if ty else _swap(k)
    out = np.asarray(attention(x, y, _swap(v) if tv else v, mask, transpose_x=tx, transpose_y=ty,
                               transpose_value=tv, scale=scale))
    batch = np.broadcast_shapes(lq, lk, lv, () if mask is None else mask.shape[:-2])
    assert out.dtype == dtype and out.shape == batch + (L, EV)
    # torch's SDPA divides by sqrt(E): scale the query to make its factor `scale`
    want = _torch(np.broadcast_to(q * (scale * np.sqrt(E)), batch + (L, E)), np.broadcast_to(k, batch + (S, E)),
                  np.broadcast_to(v, batch + (S, EV)), mask)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == np.float16 else dict(rtol=1e-5, atol=1e-5)
    assert_close(out, want, **tol)


def test_attention_op_vmapped_and_its_gradients():
    """A list predict vmaps the op over samples; derivatives equal those of the unfused chain."""
    import jax
    import jax.numpy as jnp

    from mljax.ops.transformers import attention
    q, k, v = (RNG.standard_normal((5, 1, 2, 4, 8)).astype(np.float32) for _ in range(3))
    mask = np.triu(np.full((4, 4), -1e9, np.float32), 1)

    def chain(q, k, v):      # what the program computes without the pass
        return jnp.matmul(jax.nn.softmax(jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * 0.25 + mask, axis=-1), v)

    def fused(q, k, v):
        return attention(q, k, v, mask, transpose_y=True, scale=0.25)

    assert_close(np.asarray(jax.vmap(fused)(q, k, v)), np.asarray(jax.vmap(chain)(q, k, v)), rtol=1e-5, atol=1e-6)
    cot = RNG.standard_normal((5, 1, 2, 4, 8)).astype(np.float32)
    loss = lambda f: lambda *a: jnp.sum(jax.vmap(f)(*a) * cot)   # noqa: E731
    for got, want in zip(jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss(chain), argnums=(0, 1, 2))(q, k, v)):
        assert_close(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_a_program_cannot_name_an_internal_op(tmp_path):
    """``mljax.attention`` exists for the optimized copy only: a program naming it is refused as
    an unsupported op, like any op type mljax does not know."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb, types

    import mljax
    from mljax.errors import UnsupportedOpError
    from tests.helpers import target

    @mb.program(input_specs=[mb.TensorSpec((2, 3), types.fp32)], opset_version=target("iOS17"))
    def prog(x):
        return mb.relu(x=x, name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target("iOS17"),
                       compute_precision=ct.precision.FLOAT32)
    spec = model.get_spec()
    ops = spec.mlProgram.functions["main"].block_specializations[
        spec.mlProgram.functions["main"].opset].operations
    relu = next(op for op in ops if op.type == "relu")
    relu.type = "mljax.attention"
    path = tmp_path / "internal.mlpackage"
    ct.models.MLModel(spec, weights_dir=model.weights_dir).save(str(path))
    with pytest.raises(UnsupportedOpError, match="mljax.attention"):
        mljax.MLModel(path)
