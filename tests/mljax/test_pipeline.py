"""Pipelines made by ct.utils.make_pipeline predict exactly what their stages give one after the other."""
import numpy as np
import pytest

import mljax
from helpers import convert_mil, tmp_path_for

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402


def _stages(rng):
    proj = rng.normal(size=(6, 8)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 6), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def features(x):
        return mb.relu(x=mb.matmul(x=x, y=proj), name="emb")

    program = ct.models.MLModel(str(convert_mil(features, opset="iOS16")))
    b = NeuralNetworkBuilder([("emb", datatypes.Array(1, 8))], [("probs", None)], mode="classifier")
    b.add_inner_product("fc", W=rng.normal(size=(4, 8)).astype(np.float32), b=rng.normal(size=4).astype(np.float32),
                        input_channels=8, output_channels=4, has_bias=True, input_name="emb", output_name="logits")
    b.add_softmax("sm", "logits", "probs")
    b.set_class_labels(["w", "x", "y", "z"], predicted_feature_name="label", prediction_blob="probs")
    classifier = ct.models.MLModel(b.spec)
    return program, classifier


def test_make_pipeline_equals_stages_in_sequence():
    rng = np.random.default_rng(0)
    program, classifier = _stages(rng)
    pipeline = ct.utils.make_pipeline(program, classifier)
    path = tmp_path_for("pipeline.mlpackage")
    pipeline.save(str(path))
    whole = mljax.MLModel(path)
    first, second = mljax.MLModel(program), mljax.MLModel(classifier)
    xs = rng.normal(size=(12, 1, 6)).astype(np.float32)
    batched = whole.predict([{"x": x} for x in xs])
    for x, got in zip(xs, batched):
        emb = first.predict({"x": x})["emb"]
        expected = second.predict({"emb": emb})
        assert got["label"] == expected["label"]
        # the pipeline is one fused XLA computation: equal to float32 rounding, not bit for bit
        np.testing.assert_allclose([got["probs"][k] for k in "wxyz"], [expected["probs"][k] for k in "wxyz"],
                                   rtol=1e-6, atol=1e-7)
        single = whole.predict({"x": x})
        assert single["label"] == got["label"]
    assert "pipeline" in whole.get_spec().WhichOneof("Type")


def test_pipeline_stages_use_their_prepared_weights():
    """A pipeline's ML-program stage with a weight prologue (a channel-last depthwise block, its
    weights laid out HWIO) gets its prepared values from the pipeline's ``Stage.prepare``, once
    per weights: predictions equal torch's, and the stage computes with the prepared values
    passed in (zeroed ones change the output) rather than laying its weights out per call."""
    import jax
    torch = pytest.importorskip("torch")
    from mljax.stage import PREPARED
    rng = np.random.default_rng(3)
    wd = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    wp = rng.normal(size=(3, 4, 1, 1)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 6, 5), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def features(x):
        d = mb.relu(x=mb.conv(x=x, weight=wd, pad_type="same", groups=4))
        p = mb.conv(x=d, weight=wp)
        return mb.reduce_mean(x=p, axes=[2, 3], keep_dims=False, name="emb")

    program = ct.models.MLModel(str(convert_mil(features, opset="iOS16")))
    fc_w, fc_b = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    b = NeuralNetworkBuilder([("emb", datatypes.Array(1, 3))], [("probs", None)], mode="classifier")
    b.add_inner_product("fc", W=fc_w, b=fc_b, input_channels=3, output_channels=2, has_bias=True,
                        input_name="emb", output_name="logits")
    b.add_softmax("sm", "logits", "probs")
    b.set_class_labels(["a", "b"], predicted_feature_name="label", prediction_blob="probs")
    path = tmp_path_for("pipeline-prepared.mlpackage")
    ct.utils.make_pipeline(program, ct.models.MLModel(b.spec)).save(str(path))
    whole = mljax.MLModel(path)
    stage = whole.stage
    assert stage.prepare is not None
    prepared = stage.prepare(whole.weights)
    assert list(prepared) == [n for n, st in stage.children.items() if st.prepare is not None] and prepared

    xs = rng.normal(size=(3, 1, 4, 6, 5)).astype(np.float32)
    with torch.no_grad():
        t = torch.from_numpy
        emb = torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(t(xs[:, 0]), t(wd), padding=1, groups=4)),
                                         t(wp)).mean((2, 3))
        want = torch.softmax(emb @ t(fc_w).T + t(fc_b), -1).numpy()
    got = [whole.predict({"x": x})["probs"] for x in xs] + [o["probs"] for o in whole.predict([{"x": x} for x in xs])]
    np.testing.assert_allclose([[g["a"], g["b"]] for g in got], np.concatenate([want, want]), rtol=1e-5, atol=1e-6)

    def probs(weights):
        outs, _ = jax.jit(stage.fn)(weights, {"x": xs[0]}, {})
        return np.asarray(outs["probs"]).reshape(-1)
    base = probs(whole.weights)                       # no prepared values: the stages lay out their own
    np.testing.assert_allclose(probs({**whole.weights, PREPARED: prepared}), base, rtol=1e-6)
    zeroed = jax.tree_util.tree_map(np.zeros_like, prepared)
    assert not np.allclose(probs({**whole.weights, PREPARED: zeroed}), base)
