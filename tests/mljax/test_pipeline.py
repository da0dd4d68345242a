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
