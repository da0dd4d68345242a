"""A trained head becomes an updatable NeuralNetwork, and with a frozen ML program an updatable pipeline."""
import numpy as np
import pytest

import mljax
import updatable
from converters.neuralnetwork import Activation, Dense, Softmax, head_to_neuralnetwork, updatable_pipeline
from helpers import convert_mil, tanh_projection_program, tmp_path_for

ct = pytest.importorskip("coremltools")


def _head(rng):
    w1, b1 = rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    w2, b2 = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    layers = [Dense(w1, b1, updatable=False), Activation("RELU"), Dense(w2, b2), Softmax()]

    def numpy_probs(x):
        z = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    return layers, numpy_probs


def test_head_spec_predicts_and_trains():
    rng = np.random.default_rng(0)
    layers, ref = _head(rng)
    spec = head_to_neuralnetwork(layers, input_name="emb", input_shape=(5,), class_labels=["x", "y", "z"],
                                 optimizer="adam", learning_rate=0.01, epochs=5)
    # coremltools reads it as an updatable classifier with its loss and optimizer
    ct_spec = ct.proto.Model_pb2.Model.FromString(spec.SerializeToString())
    assert ct_spec.isUpdatable and ct_spec.neuralNetworkClassifier.layers[2].isUpdatable
    assert ct_spec.neuralNetworkClassifier.updateParams.optimizer.WhichOneof("OptimizerType") == "adamOptimizer"
    model = mljax.MLModel(spec)
    x = rng.normal(size=5).astype(np.float32)
    out = model.predict({"emb": x})
    np.testing.assert_allclose([out["probs"][k] for k in "xyz"], ref(x), rtol=1e-5)
    assert out["label"] == "xyz"[int(np.argmax(ref(x)))]
    xs = rng.normal(size=(30, 5)).astype(np.float32)
    ctx = updatable.UpdateTask(model, {"emb": xs, "label": np.array(["z"] * 30)}).run()
    assert ctx.model.predict({"emb": x})["probs"]["z"] > out["probs"]["z"]
    # the frozen first layer did not move
    new = ctx.model.get_spec().neuralNetworkClassifier.layers[0].innerProduct.weights.floatValue
    np.testing.assert_array_equal(np.array(new), layers[0].weight.ravel())


def test_updatable_pipeline_package_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    proj = rng.normal(size=(4, 5)).astype(np.float32)
    features = tanh_projection_program(proj)

    feature_model = mljax.MLModel(convert_mil(features))
    layers, ref = _head(rng)
    head = head_to_neuralnetwork(layers, input_name="emb", input_shape=(5,), class_labels=["x", "y", "z"])
    path = updatable_pipeline(feature_model, head, tmp_path / "pipe.mlpackage")
    model = mljax.MLModel(path)
    x = rng.normal(size=4).astype(np.float32)
    got = model.predict({"x": x})
    np.testing.assert_allclose([got["probs"][k] for k in "xyz"], ref(np.tanh(x @ proj)), rtol=1e-5)
    ct_model = ct.models.MLModel(str(path), skip_model_load=True)
    assert ct_model.get_spec().isUpdatable
    xs = rng.normal(size=(20, 4)).astype(np.float32)
    ctx = updatable.UpdateTask(path, {"x": xs, "label": np.array(["y"] * 20)}).run()
    saved = ctx.model.save(tmp_path / "personal.mlpackage")
    again = mljax.MLModel(saved)
    assert again.predict({"x": x}) == ctx.model.predict({"x": x})
