"""updatable.Pipeline: train ML-program weights Core ML cannot update, and Flax heads."""
import numpy as np
import optax
import pytest

import mljax
import updatable
from updatable.pipeline import Pipeline, weight_names
from helpers import convert_mil, tanh_projection_program

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402


def _regression_program(w0):
    @mb.program(input_specs=[mb.TensorSpec(shape=(3,), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.matmul(x=x, y=w0, name="y")
    return mljax.MLModel(convert_mil(prog))


def test_ml_program_weights_train_to_least_squares_solution():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(3, 2)).astype(np.float32)
    model = _regression_program(np.zeros((3, 2), np.float32) + 0.1)
    names = weight_names(model)
    assert len(names) == 1
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = x @ w_true
    p = Pipeline(model, trainable=names[0], loss="mse", optimizer=optax.adam(0.05))
    history = p.fit({"x": x}, y, epochs=150, batch_size=16)
    assert history[-1] < 1e-3 < history[0]
    trained = p.trained_model()
    np.testing.assert_allclose(trained.predict({"x": x[0]})["y"], y[0], atol=2e-2)
    # the source model still predicts with its original weights
    np.testing.assert_allclose(model.predict({"x": x[0]})["y"], x[0] @ (np.zeros((3, 2)) + 0.1), rtol=1e-5)
    # and the trained ML program saves and reloads (the writer rewrites the blob)
    saved = mljax.MLModel(trained.save(mljax_tmp()))
    np.testing.assert_allclose(saved.predict({"x": x[0]})["y"], trained.predict({"x": x[0]})["y"], rtol=1e-6)


def mljax_tmp():
    from helpers import tmp_path_for
    return tmp_path_for("trained.mlpackage")


def test_flax_head_after_frozen_model_exports_updatable_pipeline():
    from flax import nnx
    import jax
    rng = np.random.default_rng(1)
    proj = rng.normal(size=(4, 6)).astype(np.float32)
    feats = tanh_projection_program(proj)

    frozen = mljax.MLModel(convert_mil(feats))
    x = rng.normal(size=(90, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)   # 3 classes
    head = nnx.Sequential(nnx.Linear(6, 3, rngs=nnx.Rngs(0)))
    p = Pipeline(frozen, head=head, feature="emb", optimizer=optax.sgd(0.5, momentum=0.9))
    p.fit({"x": x}, y, epochs=60, batch_size=10)
    acc = np.mean(np.argmax(p.predict_head({"x": x}), -1) == y)
    assert acc > 0.8
    path = p.export(mljax_tmp(), class_labels=["0", "1", "2"])
    model = mljax.MLModel(path)
    outs = model.predict([{"x": xi} for xi in x])
    got = np.array([int(o["label"]) for o in outs])
    assert np.mean(got == np.argmax(p.predict_head({"x": x}), -1)) == 1.0
    # and Core ML's own update continues from there
    ctx = updatable.UpdateTask(path, {"x": x, "label": y.astype(str)}, parameters={"epochs": 2}).run()
    assert ctx.event == "completed"


def test_saving_a_pipeline_with_trained_stage_weights_is_refused_not_silently_wrong(tmp_path):
    from converters.neuralnetwork import Dense, Softmax, head_to_neuralnetwork, updatable_pipeline
    from mljax.errors import UnsupportedError
    rng = np.random.default_rng(2)
    proj = rng.normal(size=(4, 5)).astype(np.float32)
    feats = tanh_projection_program(proj)

    head = head_to_neuralnetwork([Dense(rng.normal(size=(2, 5)).astype(np.float32)), Softmax()],
                                 input_name="emb", input_shape=(5,), class_labels=["a", "b"])
    pipe = mljax.MLModel(updatable_pipeline(mljax.MLModel(convert_mil(feats)), head, tmp_path / "p.mlpackage"))
    x = rng.normal(size=(20, 4)).astype(np.float32)
    p = Pipeline(pipe, trainable="features/*", loss="cross_entropy_from_probs", output="probs")
    p.fit({"x": x}, (x[:, 0] > 0).astype(np.int32), epochs=2, batch_size=10)
    with pytest.raises(UnsupportedError, match="pipeline"):
        p.trained_model().save(tmp_path / "trained.mlpackage")
    assert not (tmp_path / "trained.mlpackage").exists()
    pipe.save(tmp_path / "untrained.mlpackage")   # an untouched pipeline still saves
