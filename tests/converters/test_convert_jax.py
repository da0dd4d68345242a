"""JAX functions / Flax NNX modules -> ML programs: coremltools accepts them, mljax predicts like JAX."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
import mljax
from helpers import tmp_path_for
from mljax.errors import ConversionError

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.frontend.milproto.load import load as ct_load  # noqa: E402

RNG = np.random.default_rng(0)


def _randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def ct_accepts(model: mljax.MLModel):
    """coremltools' MIL-proto loader re-runs type inference on every op and checks our types."""
    spec = ct.proto.Model_pb2.Model.FromString(model.get_spec().SerializeToString())
    return ct_load(spec, specification_version=spec.specificationVersion,
                   file_weights_dir=str(model.weights_dir))


def check(fn, inputs: dict, *, precision="float32", tol=1e-4, output_names=None):
    """Convert, load in coremltools, predict with mljax and compare with JAX."""
    model = converters.convert(fn, inputs, compute_precision=precision, output_names=output_names)
    ct_accepts(model)
    want = jax.jit(lambda *args: fn(*args))(*inputs.values())   # eager dispatch is slow
    want = jax.tree_util.tree_leaves(want)
    got = model.predict(inputs)
    names = output_names or (["output"] if len(want) == 1 else [f"output_{i}" for i in range(len(want))])
    assert sorted(got) == sorted(names)
    for name, w in zip(names, want):
        w = np.asarray(w)
        assert got[name].shape == w.shape, name
        if w.dtype == np.bool_:
            np.testing.assert_array_equal(got[name], w.astype(np.int32))
        else:
            np.testing.assert_allclose(got[name], w, rtol=tol, atol=tol, err_msg=name)
    return model


# --- the three reference models -------------------------------------------------------------
def build(module_cls, seed: int):
    """An NNX module with random NumPy parameters (abstract init: no XLA compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: module_cls(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.4).astype(s.dtype), state)
    return nnx.merge(graphdef, state)


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), strides=2, padding="VALID", feature_group_count=2, rngs=rngs)
        self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        y = self.norm(nnx.relu(self.conv1(x)))
        y = nnx.gelu(self.conv2(y))
        return jax.nn.softmax(self.head(y.mean(axis=(1, 2))))


def attention_block(x, wq, wk, wv, wo):
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, w) for w in (wq, wk, wv))
    scores = jnp.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    out = jnp.einsum("bhqt,bthk->bqhk", probs, v)
    return jnp.einsum("bqhk,hkd->bqd", out, wo) + x


_ATTN_W = [_randn(16, 2, 8) * 0.3 for _ in range(3)] + [_randn(2, 8, 16) * 0.3]


def attention(x):
    return attention_block(x, *_ATTN_W)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(12, 32, rngs=rngs)
        self.l2 = nnx.Linear(16, 6, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.l1(x))
        h = jnp.cumsum(h, axis=-1)[:, ::2]
        return self.l2(h)[:, 1::2], jnp.argmax(h, axis=-1)


@pytest.mark.parametrize("precision,tol", [("float32", 1e-4), ("float16", 3e-2)])
def test_flax_cnn_with_layernorm_and_softmax(precision, tol):
    model = check(build(CNN, 0), {"image": _randn(2, 12, 12, 3)}, precision=precision, tol=tol)
    # NNX parameter paths name the weights (trainable by name)
    names = set(model.weights)
    suffix = "_to_fp16" if precision == "float16" else ""
    assert {f"conv1_kernel{suffix}", f"conv2_kernel{suffix}", f"head_kernel{suffix}"} <= names


@pytest.mark.parametrize("precision,tol", [("float32", 1e-4), ("float16", 3e-2)])
def test_attention_block_with_einsum(precision, tol):
    check(attention, {"x": _randn(2, 5, 16)}, precision=precision, tol=tol)


@pytest.mark.parametrize("precision,tol", [("float32", 1e-4), ("float16", 5e-2)])
def test_mlp_with_cumsum_and_strided_slicing(precision, tol):
    check(build(MLP, 1), {"x": _randn(4, 12)}, precision=precision, tol=tol,
          output_names=["logits", "best"])


# --- primitives ---------------------------------------------------------------------------------
_X = _randn(3, 4)
_Y = _randn(3, 4)
_W = _randn(4, 5)
_K1, _K2, _K3, _TABLE = _randn(6, 3, 3, 2), _randn(6, 1, 3, 3), _randn(4, 3, 3), _randn(10, 6)

PRIMITIVE_CASES = {
    "elementwise": (lambda x, y: (x * y - x / (jnp.abs(y) + 1) + jnp.maximum(x, y) - jnp.minimum(x, 0.5),
                                  jnp.exp(x) + jnp.log1p(jnp.abs(y)) + jnp.sqrt(jnp.abs(x)) + jax.lax.rsqrt(1 + y * y),
                                  jax.nn.sigmoid(x) + jax.scipy.special.erf(y) + jnp.tanh(x) - jnp.expm1(y) + jnp.sign(x),
                                  jnp.floor(x) + jnp.ceil(y) + jnp.round(x * 3) + jax.lax.round(y * 3) + -x,
                                  jnp.fmod(x * 5, 1.5), x ** 3 + y ** -2 + jax.lax.integer_pow(x, 0),
                                  jnp.power(jnp.abs(x) + 0.1, y), jnp.clip(x, -0.5, 0.3), jnp.sin(x) * jnp.cos(y)),
                    {"x": _X, "y": _Y}),
    "compare_select": (lambda x, y: (jnp.where(x > y, x, y * 2), x == y, (x < 0) | (y >= 0.2), ~(x <= y),
                                     jnp.where((x != 0) & (y > 0), 1.0, -1.0)),
                       {"x": _X, "y": _Y}),
    "reductions": (lambda x: (x.sum(), x.max(axis=0), x.min(axis=1), jnp.prod(x, axis=1), jnp.argmax(x, axis=1),
                              jnp.argmin(x, axis=0), jnp.any(x > 1, axis=1), x.mean(axis=-1, keepdims=True)),
                   {"x": _X}),
    "shapes": (lambda x: (x.T, x.reshape(2, 6), x[None, :, None], jnp.flip(x, 0), jnp.concatenate([x, x * 2], 1),
                          jnp.pad(x, ((1, 0), (2, 1)), constant_values=3.0), jax.lax.pad(x, 0.5, ((0, 0, 0), (-1, 2, 0))),
                          x[1:, ::3], x[::-1], jnp.split(x, [1, 3], axis=1)[1], jnp.broadcast_to(x[:, :1], (3, 4)),
                          jnp.tile(x, (2, 1)), jnp.arange(12.0).reshape(3, 4) * x, jax.lax.cumsum(x, axis=0, reverse=True)),
               {"x": _X}),
    "indexing": (lambda x, i: (jnp.take(x, jnp.array([3, 0, -1]), axis=1), x[jnp.array([2, 0])],
                               jax.lax.dynamic_slice(x, (1, 5), (2, 2)), x[:, 2], x[2],
                               jnp.take(_TABLE, i, axis=0)),
                 {"x": _X, "i": np.array([[1, 9], [0, 3]], np.int32)}),
    "matmul_forms": (lambda x, y: (x @ _W, x.T @ y, jnp.einsum("ij,kj->ik", x, y), jnp.einsum("bij,bjk->bik",
                                  x.reshape(3, 2, 2), y.reshape(3, 2, 2)), jnp.dot(x[0], y[1]),
                                  jnp.einsum("ij,ij->i", x, y), jnp.outer(x[0], y[0]),
                                  jnp.einsum("...d,de->...e", x.reshape(3, 1, 4), _W)),
                     {"x": _X, "y": _Y}),
    "convolutions": (lambda x: (jax.lax.conv_general_dilated(x, _K1, (2, 1), "SAME",
                                                              rhs_dilation=(1, 2)),
                                jax.lax.conv_general_dilated(x, _K2, (1, 1), ((2, 0), (1, 1)),
                                                             feature_group_count=3),
                                jax.lax.conv_general_dilated(x[..., 0], _K3, (1,), "VALID")),
                     {"x": _randn(2, 3, 7, 6)}),
    "int_and_casts": (lambda n, x: (n * 3 - n // 2, (n + 1).astype(jnp.float32) * x, x.astype(jnp.int32),
                                    jax.lax.iota(jnp.int32, 4) + n, jnp.cumsum(n, axis=0)),
                      {"n": np.array([5, -7, 2, 9], np.int32), "x": _randn(4) * 4}),
    "nested_calls": (lambda x: jax.jit(lambda y: jax.nn.relu(y) + jax.checkpoint(lambda z: z * 3)(y))(x)
                     + jax.nn.softplus(x) + jax.nn.gelu(x, approximate=False), {"x": _X}),
}


@pytest.mark.parametrize("case", sorted(PRIMITIVE_CASES))
def test_primitives(case):
    fn, inputs = PRIMITIVE_CASES[case]
    check(fn, inputs)


def test_custom_vjp_is_inlined():
    @jax.custom_vjp
    def scaled_sin(x):
        return jnp.sin(x) * 2

    scaled_sin.defvjp(lambda x: (scaled_sin(x), x), lambda r, g: (g * jnp.cos(r) * 2,))
    check(lambda x: scaled_sin(x) + 1, {"x": _X})


# --- errors and API ------------------------------------------------------------------------------
def test_unsupported_primitives_are_named_together():
    def fn(x):
        step = lambda c, y: (c + jax.lax.population_count(y.astype(jnp.int32)).astype(jnp.float32), c)
        return jax.lax.erf_inv(x * 0.1) + jax.lax.igamma(x, x) + jax.lax.scan(step, 0.0, x)[0]

    with pytest.raises(ConversionError) as err:
        converters.convert(fn, {"x": np.abs(_X[0]) + 1})
    message = str(err.value)
    assert "3 JAX primitive" in message
    for prim in ("erf_inv", "igamma", "scan (its body uses population_count"):
        assert prim in message


def test_unsupported_parameters_are_explained():
    with pytest.raises(ConversionError, match="conv_general_dilated .*batch_group_count"):
        converters.convert(lambda x: jax.lax.conv_general_dilated(x, jnp.ones((4, 2, 3)), (1,), "VALID",
                                                                  batch_group_count=2),
                           {"x": _randn(4, 2, 6)})


def test_unused_untranslatable_values_do_not_matter():
    # an unused cbrt (and the PRNG key arithmetic of modules in eval mode) is dead code
    model = check(lambda x: (jnp.cbrt(x), x * 2)[1], {"x": _X})
    assert model.predict({"x": _X})["output"].shape == _X.shape


def test_names_and_targets_are_validated():
    with pytest.raises(ConversionError, match="not a valid identifier"):
        converters.convert(lambda x: x + 1, {"bad name": _X})
    with pytest.raises(ConversionError, match="output_names has 1 names; the function returns 2"):
        converters.convert(lambda x: (x, x * 2), {"x": _X}, output_names=["a"])
    with pytest.raises(ConversionError, match="minimum_deployment_target"):
        converters.convert(lambda x: x + 1, {"x": _X}, minimum_deployment_target="iOS11")


def test_spec_description_and_save():
    model = check(lambda x: (x * 2, x), {"x": _X}, output_names=["double", "same"])
    spec = model.get_spec()
    assert spec.specificationVersion == 8
    assert spec.mlProgram.functions["main"].opset == "CoreML7"
    assert [i.name for i in spec.description.input] == ["x"]
    assert list(spec.description.input[0].type.multiArrayType.shape) == [3, 4]
    assert [o.name for o in spec.description.output] == ["double", "same"]
    path = model.save(tmp_path_for("converted.mlpackage"))
    reopened = ct.models.MLModel(str(path), skip_model_load=True)
    assert reopened.get_spec().description.output[0].name == "double"
    np.testing.assert_allclose(mljax.MLModel(path).predict({"x": _X})["double"], _X * 2)


@pytest.mark.parametrize("target,version,opset", [("iOS15", 6, "CoreML5"), ("iOS16", 7, "CoreML6"),
                                                  ("iOS18", 9, "CoreML8")])
def test_deployment_targets(target, version, opset):
    model = converters.convert(lambda x: jax.nn.relu(x @ _W), {"x": _X}, minimum_deployment_target=target)
    spec = model.get_spec()
    assert spec.specificationVersion == version
    assert spec.mlProgram.functions["main"].opset == opset
    ct_accepts(model)
    np.testing.assert_allclose(model.predict({"x": _X})["output"], np.maximum(_X @ _W, 0), rtol=1e-5, atol=1e-5)


def test_trained_weights_round_trip_through_save():
    mlp = build(MLP, 2)
    model = converters.convert(mlp, {"x": _randn(4, 12)}, output_names=["logits", "best"])
    new_kernel = _randn(*np.shape(model.weights["l1_kernel"]))
    model._weights = {**model._weights, "l1_kernel": new_kernel}
    saved = mljax.MLModel(model.save(tmp_path_for("trained.mlpackage")))
    np.testing.assert_array_equal(np.asarray(saved.weights["l1_kernel"]), new_kernel)


class NormHead(nnx.Module):
    """Eval-mode BatchNorm and Dropout: running statistics become constants, PRNG keys are unused."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(3, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.norm = nnx.BatchNorm(2, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return {"scores": self.norm(self.drop(self.dense(x))), "total": x.sum(axis=1)}


def test_dict_outputs_batchnorm_and_dropout():
    model = check(NormHead(nnx.Rngs(3)), {"x": _randn(4, 3)}, output_names=["scores", "total"])
    default = converters.convert(NormHead(nnx.Rngs(3)), {"x": _randn(4, 3)})
    assert [o.name for o in default.get_spec().description.output] == ["scores", "total"]
    assert "norm_mean" in model.weights or "norm_mean" in {
        op.outputs[0].name for op in model.stage.program.functions["main"].block.operations}
