"""Primitive families and Flax example models: each export is read back by coremltools' MIL-proto
loader and predicted by mljax against the JAX function; verification catches wrong exports."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
import converters.jax as cjax
from mljax.errors import ConversionError

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.frontend.milproto.load import load as ct_load  # noqa: E402

RNG = np.random.default_rng(7)


def _randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def ct_accepts(model):
    """coremltools' MIL-proto loader re-runs type inference on every op (nested blocks too)."""
    spec = ct.proto.Model_pb2.Model.FromString(model.get_spec().SerializeToString())
    return ct_load(spec, specification_version=spec.specificationVersion,
                   file_weights_dir=str(model.weights_dir))


def export(fn, inputs: dict, *, precision="float32", tol=1e-4, target="iOS17"):
    """Convert (verified), load in coremltools, predict with mljax and compare with eager JAX."""
    model = converters.convert(fn, inputs, compute_precision=precision, minimum_deployment_target=target)
    ct_accepts(model)
    want = jax.tree_util.tree_leaves(fn(*inputs.values()))
    got = model.predict(inputs)
    names = ["output"] if len(want) == 1 else [f"output_{i}" for i in range(len(want))]
    for name, w in zip(names, want):
        w = np.asarray(w)
        assert got[name].shape == w.shape, name
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(got[name], w.astype(got[name].dtype), err_msg=name)
        else:
            np.testing.assert_allclose(got[name], w, rtol=tol, atol=tol, err_msg=name)
    return model


_X = _randn(4, 6)
_I = RNG.integers(0, 4, (4, 3)).astype(np.int32)
_IMG = _randn(2, 7, 6, 4)
_K = _randn(3, 3, 4, 5) * 0.3
_KG = _randn(3, 3, 2, 6) * 0.3
_TABLE = _randn(10, 5)
_NHWC = ("NHWC", "HWIO", "NHWC")


def _rnn_scan(x, reverse=False):
    def step(c, xi):
        c = jnp.tanh(c * 0.5 + xi)
        return c, (c * 2, jnp.sum(c))
    return jax.lax.scan(step, jnp.zeros(x.shape[1:]), x, reverse=reverse)


def _scatters(x, i):
    return (jax.ops.segment_sum(x, i[:, 0], 5), x.at[i[:, 0]].add(1.0), x.at[i[:, 1], 2].set(-5.0),
            x.at[i[:, 1] + 2].set(x[0]), x.at[i[:, 2]].max(0.5))


FAMILIES = {
    "scan_unrolled": (lambda x: _rnn_scan(x), {"x": _randn(5, 3)}),
    "scan_while_loop": (lambda x: _rnn_scan(x, reverse=True), {"x": _randn(20, 3)}),
    "fori_and_while": (lambda x: (jax.lax.fori_loop(0, 3, lambda i, c: c * 0.5 + i, x),
                                  jax.lax.fori_loop(0, jnp.argmax(x[0]) + 1, lambda i, c: c * 0.9, x),
                                  jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] + c[1]),
                                                     (jnp.int32(0), x))[1]),
                       {"x": _X}),
    "cond_switch": (lambda x: (jax.lax.cond(x.sum() > 0, lambda y: y + 1, lambda y: y * 2, x),
                               jax.lax.switch(jnp.argmax(x.sum(1)) - 1, [lambda y: y, lambda y: -y,
                                                                         lambda y: jnp.exp(y)], x)),
                    {"x": _X}),
    "gathers": (lambda x, i: (jnp.take_along_axis(x, i, 1), x[i[:, 0], i[:, 1]], x[:, i[0]],
                              jnp.take(x, i[:, 0] * 3 - 2, axis=1), jnp.take(x, i * 3 - 2, axis=0, mode="clip"),
                              jnp.asarray(_TABLE)[i]),
                {"x": _X, "i": _I}),
    "scatters": (lambda x, i: _scatters(jnp.asarray(x), i), {"x": _X, "i": _I}),
    "dynamic_slices": (lambda x, i: (jax.lax.dynamic_slice(x, (i[0, 0], i[1, 1] + 3), (2, 4)),
                                     jax.lax.dynamic_update_slice(x, jnp.ones((2, 3)), (i[0, 0], i[1, 1])),
                                     jax.lax.dynamic_index_in_dim(x, i[2, 2], 1, keepdims=False)),
                       {"x": _X, "i": _I}),
    "sort_topk": (lambda x, i: (jnp.sort(x, -1), jnp.argsort(x, 0), jnp.sort(i, 0), *jax.lax.top_k(x, 3),
                                jnp.argmax(x, -1), *jax.lax.approx_max_k(x, 2), *jax.lax.approx_min_k(x, 2)),
                  {"x": _X, "i": _I}),
    "cumulative": (lambda x: (jnp.cumsum(x, 1), jnp.cumprod(x * 0.5 + 1, 1), jax.lax.cummax(x, 0),
                              jax.lax.cummin(x, 1, reverse=True), jax.lax.cummax((x * 4).astype(jnp.int32), 1)),
                   {"x": _X}),
    "pooling": (lambda x: (nnx.max_pool(x, (2, 2), strides=(2, 2)), nnx.avg_pool(x, (3, 2), (1, 2), "SAME"),
                           nnx.avg_pool(x, (3, 3), padding="SAME", count_include_pad=False),
                           nnx.min_pool(x, (2, 2)),
                           jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 1, 1), (1, 1, 1, 1), "VALID")),
                {"x": _IMG}),
    "transposed_and_grouped_conv": (
        lambda x: (jax.lax.conv_transpose(x, _K, (2, 2), "SAME", dimension_numbers=_NHWC),
                   jax.lax.conv_transpose(x, _K, (2, 3), "VALID", dimension_numbers=_NHWC),
                   jax.lax.conv_general_dilated(x, _KG, (1, 1), ((2, 1), (0, 2)), lhs_dilation=(2, 2),
                                                feature_group_count=2, dimension_numbers=_NHWC),
                   jax.lax.conv_general_dilated(x, _K, (2, 1), ((-1, 1), (3, 0)), lhs_dilation=(3, 2),
                                                rhs_dilation=(1, 2), dimension_numbers=_NHWC)),
        {"x": _IMG}),
    "resize": (lambda x: (jax.image.resize(x, (2, 12, 9, 4), "bilinear"),
                          jax.image.resize(x, (2, 14, 3, 4), "nearest"),
                          jax.image.resize(x, (2, 3, 3, 4), "cubic")),
               {"x": _IMG}),
    "dtype_conversions": (lambda x, i: (x.astype(jnp.int32), i.astype(jnp.float16).astype(jnp.float32) * x[:, :3],
                                        (x > 0).astype(jnp.float32), i.astype(jnp.bool_), (i > 1) & (x[:, :3] < 0),
                                        x.astype(jnp.int8).astype(jnp.int32), i.astype(jnp.uint8),
                                        i.astype(jnp.int16).astype(jnp.float32),
                                        i % 3 - i // 2, jnp.where(i > 1, i, -i)),
                          {"x": _X * 4, "i": _I}),
    "more_elementwise": (lambda x: (jnp.isfinite(jnp.log(x)), jnp.cbrt(x), jnp.arcsinh(x), jnp.arccosh(jnp.abs(x) + 1),
                                    jnp.arctan2(x, x[::-1]),
                                    jnp.arctan2(jnp.zeros(3), jnp.array([0.0, -1.0, 1.0]))),
                         {"x": _X}),
    "attention": (lambda q, k: (jax.nn.dot_product_attention(q, k, k, is_causal=True),
                                jax.nn.dot_product_attention(q, k, k, mask=jnp.arange(5)[None, None, None] < 3)),
                  {"q": _randn(2, 5, 2, 4), "k": _randn(2, 5, 2, 4)}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_primitive_family(family):
    fn, inputs = FAMILIES[family]
    export(fn, inputs)


@pytest.mark.parametrize("family", ["scan_while_loop", "cond_switch", "pooling", "transposed_and_grouped_conv",
                                    "more_elementwise"])
def test_primitive_family_fp16(family):
    fn, inputs = FAMILIES[family]
    export(fn, inputs, precision="float16", tol=3e-2)


def test_control_flow_on_older_targets():
    fn, inputs = FAMILIES["scan_while_loop"]
    export(fn, inputs, target="iOS15")


def _op_types(model):
    return {op.type for op in model.stage.program.functions["main"].block.walk()}


@pytest.mark.parametrize("precision,tol", [("float32", 1e-4), ("float16", 3e-2)])
def test_attention_fuses_on_ios18(precision, tol):
    def fn(q, k):
        keep = (jnp.arange(6) < 4)[None, None, None]
        bias = jnp.arange(60.0).reshape(1, 2, 5, 6) / 60
        return (jax.nn.dot_product_attention(q, k, k * 2, bias=bias, mask=keep),
                jax.nn.dot_product_attention(q, k, k, is_causal=True, scale=0.3),
                jax.nn.dot_product_attention(q, k, k, mask=(k.sum(-1) > -1)[:, None, None, :, 0]))  # traced mask

    inputs = {"q": _randn(2, 5, 2, 4), "k": _randn(2, 6, 2, 4)}
    fused = export(fn, inputs, precision=precision, tol=tol, target="iOS18")
    assert "scaled_dot_product_attention" in _op_types(fused)
    decomposed = export(fn, inputs, precision=precision, tol=tol, target="iOS17")
    assert "scaled_dot_product_attention" not in _op_types(decomposed)


# --- never silently wrong ----------------------------------------------------------------------------
def test_a_wrong_translation_is_caught_and_named(monkeypatch):
    monkeypatch.setitem(cjax.RULES, "tanh", cjax.RULES["logistic"])
    jitted = jax.jit(lambda x: jnp.tanh(jax.jit(lambda y: y * 2)(x)) @ x.T + 1)    # found inside the calls
    with pytest.raises(ConversionError, match=r"First divergence: equation 1 `.*tanh.*sigmoid") as err:
        converters.convert(jitted, {"x": _X})
    assert "does not compute what the JAX function computes" in str(err.value)
    # verify=False is the opt-out: the same wrong program is returned unchecked
    model = converters.convert(lambda x: jnp.tanh(x * 2) @ x.T + 1, {"x": _X}, verify=False)
    assert not np.allclose(model.predict({"x": _X})["output"], np.tanh(_X * 2) @ _X.T + 1, atol=1e-2)


def test_the_old_scan_export_would_be_caught(monkeypatch):
    """scan used to be inlined like a call (one step, wrong arguments): the export returned garbage."""
    def inline_once(t, eqn):
        closed = eqn.params["jaxpr"]
        args = [t.lazy(a) for a in eqn.invars[len(eqn.invars) - len(closed.jaxpr.invars):]]
        outs = t.run(closed.jaxpr, list(closed.consts), args)
        return [t.materialize(o, tuple(v.aval.shape)) if o.type.shape != tuple(v.aval.shape) else o
                for o, v in zip(outs, eqn.outvars)]

    monkeypatch.setitem(cjax.RULES, "scan", inline_once)
    x = _randn(3, 4)
    fn = lambda x: jax.lax.scan(lambda c, xi: (c + xi, c * xi), jnp.zeros(4), x)[0]  # noqa: E731
    with pytest.raises(ConversionError, match="does not compute what|fails to run"):
        converters.convert(fn, {"x": x})


# --- Flax example models, one per family ---------------------------------------------------------------
class PoolCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        y = nnx.max_pool(nnx.relu(self.c1(x)), (2, 2), strides=(2, 2))
        y = nnx.avg_pool(nnx.relu(self.c2(y)), (2, 2), strides=(2, 2))
        return jax.nn.log_softmax(self.head(y.mean((1, 2))))


class ResNet(nnx.Module):
    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.c1 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        y = nnx.max_pool(nnx.relu(self.bn0(self.stem(x))), (3, 3), strides=(2, 2), padding="SAME")
        y = nnx.relu(y + self.bn2(self.c2(nnx.relu(self.bn1(self.c1(y))))))
        return self.head(y.mean((1, 2)))


class ViT(nnx.Module):
    def __init__(self, rngs):
        self.patch = nnx.Conv(3, 16, (4, 4), strides=4, rngs=rngs)
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, 16)) * 0.1)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 5, 16)) * 0.1)
        self.ln1, self.ln2 = nnx.LayerNorm(16, rngs=rngs), nnx.LayerNorm(16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 16, decode=False, deterministic=True, rngs=rngs)
        self.mlp = nnx.Linear(16, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, deterministic=True, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        p = self.patch(x).reshape(x.shape[0], -1, 16)
        t = jnp.concatenate([jnp.broadcast_to(self.cls[...], (x.shape[0], 1, 16)), p], 1) + self.pos[...]
        t = t + self.drop(self.attn(self.ln1(t)))
        t = t + nnx.gelu(self.mlp(self.ln2(t)))
        return self.head(t[:, 0])


class CausalLM(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(20, 16, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, 16, decode=False, deterministic=True, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, ids):
        h = self.emb(ids)
        pad = nnx.make_attention_mask(ids > 0, ids > 0)       # padding mask combined with the causal one
        h = h + self.attn(self.ln(h), mask=nnx.combine_masks(nnx.make_causal_mask(ids), pad))
        logits = self.emb.attend(h)
        return logits, jnp.argmax(logits[:, -1], -1)


class LSTMTagger(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(20, 8, rngs=rngs)
        self.rnn = nnx.RNN(nnx.LSTMCell(8, 12, rngs=rngs), rngs=rngs)
        self.gru = nnx.RNN(nnx.GRUCell(12, 6, rngs=rngs), rngs=rngs)
        self.out = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, ids):
        return self.out(self.gru(self.rnn(self.emb(ids))))


class VAEDecoder(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4 * 4 * 8, rngs=rngs)
        self.up = nnx.ConvTranspose(8, 4, (3, 3), strides=(2, 2), rngs=rngs)
        self.conv = nnx.Conv(4, 3, (3, 3), rngs=rngs)

    def __call__(self, z):
        h = nnx.relu(self.fc(z)).reshape(z.shape[0], 4, 4, 8)
        h = nnx.relu(self.up(h))
        h = jax.image.resize(h, (z.shape[0], 12, 12, 4), "bilinear")
        return nnx.sigmoid(self.conv(h))


def _ids(*shape):
    return RNG.integers(1, 20, shape).astype(np.int32)


def _trained_batchnorm(model):
    """Running statistics that are not the initial 0/1 (so eval mode really uses them)."""
    for bn in (model.bn0, model.bn1, model.bn2):
        bn.mean[...] = _randn(8) * 0.3
        bn.var[...] = np.abs(_randn(8)) + 0.5
    return model


MODELS = {
    "cnn_pooling": (lambda: PoolCNN(nnx.Rngs(0)), lambda: {"x": _randn(2, 12, 12, 3)}),
    "resnet_batchnorm": (lambda: _trained_batchnorm(ResNet(nnx.Rngs(1))), lambda: {"x": _randn(2, 12, 12, 3)}),
    "vit": (lambda: ViT(nnx.Rngs(2)), lambda: {"x": _randn(2, 8, 8, 3)}),
    "causal_lm": (lambda: CausalLM(nnx.Rngs(3)), lambda: {"ids": np.concatenate([np.zeros((2, 1), np.int32),
                                                                                   _ids(2, 6)], 1)}),
    "lstm_tagger": (lambda: LSTMTagger(nnx.Rngs(4)), lambda: {"ids": _ids(2, 7)}),
    "vae_decoder": (lambda: VAEDecoder(nnx.Rngs(5)), lambda: {"z": _randn(2, 4)}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_flax_model(name):
    make, inputs = MODELS[name]
    export(make(), inputs())


def test_linen_model_in_eval_mode():
    """A Linen module applied to its variables: parameters and batch statistics become constants,
    the Dropout's PRNG plumbing is dead code at inference."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
            x = nn.Dropout(0.5, deterministic=not train)(nn.max_pool(x, (2, 2), (2, 2)))
            x = nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x)
            h = nn.RNN(nn.GRUCell(6))(x.reshape(x.shape[0], -1, 4))
            return nn.Dense(3)(h[:, -1])

    x = _randn(2, 6, 6, 3)
    net = Net()
    variables = net.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda v: v + 0.1 * RNG.standard_normal(v.shape).astype(v.dtype), variables)
    export(lambda x: net.apply(variables, x), {"x": x})


@pytest.mark.parametrize("name", ["resnet_batchnorm", "lstm_tagger"])
def test_flax_model_fp16(name):
    make, inputs = MODELS[name]
    export(make(), inputs(), precision="float16", tol=3e-2)


def test_docs_table_is_up_to_date():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "gen_converter_table.py"
    spec = importlib.util.spec_from_file_location("gen_converter_table", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run python scripts/gen_converter_table.py"


def test_narrow_integer_arithmetic_is_refused_not_miscomputed():
    with pytest.raises(ConversionError, match=r"add \(arithmetic on uint8"):
        converters.convert(lambda i: jnp.uint8(200) + i.astype(jnp.uint8), {"i": _I})
    with pytest.raises(ConversionError, match="casts between fp32 and int8 before iOS17"):
        converters.convert(lambda x: x.astype(jnp.int8).astype(jnp.int32), {"x": _X},
                           minimum_deployment_target="iOS15")


def test_keys_closed_over_by_a_loop_body_matter_only_when_used():
    key = jax.random.key(0)
    x = _randn(20, 3)

    def unused(x):
        def step(c, xi):
            jax.random.split(key)                   # dead inside the body
            return jnp.tanh(c + xi), c
        return jax.lax.scan(step, jnp.zeros(3), x)

    def used(x):
        return jax.lax.scan(lambda c, xi: (c + xi + jax.random.uniform(key, (3,)), c), jnp.zeros(3), x)

    export(unused, {"x": x})
    with pytest.raises(ConversionError, match=r"scan \(its body uses PRNG key"):
        converters.convert(used, {"x": x})
