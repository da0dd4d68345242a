"""Update parameters typed as Core ML types them, bad training data and failing handlers: each an
UpdateError, the model untouched."""
import hashlib

import numpy as np
import pytest

import mljax
import updatable
from mljax.errors import UpdateError
from models import dense_classifier

ct = pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def model_path():
    # epochs: the model allows 1..100 (a set); miniBatchSize and learning rate: defaults only
    return dense_classifier(epochs=2)[0]


def _data(n=8):
    rng = np.random.default_rng(0)
    return [{"features": rng.normal(size=6).astype(np.float32), "label": "abc"[i % 3]} for i in range(n)]


def _weights(model):
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in
                                   __import__("jax").tree_util.tree_leaves(model.weights))).hexdigest()


@pytest.mark.parametrize("parameters, message", [
    ({"epochs": 10.5}, r"'epochs': expected an int; found 10.5 \(float\)"),
    ({"epochs": "10"}, r"'epochs': expected an int; found '10' \(str\)"),
    ({"epochs": True}, r"'epochs': expected an int; found True \(bool\)"),
    ({"epochs": 0}, r"'epochs': expected a value in \[1, 1000000\]; found 0"),
    ({"epochs": -1}, r"'epochs': expected a value in \[1, 1000000\]; found -1"),
    ({"epochs": float("inf")}, r"'epochs': expected an int; found inf"),
    ({"epochs": 10**9}, r"'epochs': expected a value in \[1, 1000000\]; found 1000000000"),
    ({"shuffle": "no"}, r"'shuffle': expected a bool \(True or False\); found 'no'"),
    ({"shuffle": 0}, r"'shuffle': expected a bool"),
    ({"seed": -1}, r"'seed': expected a value in \[0, 9223372036854775807\]; found -1"),
    ({"seed": 2.5}, r"'seed': expected an int"),
    ({"learning_rate": float("nan")}, r"'learning_rate': expected a finite number"),
    ({"learning_rate": "x"}, r"'learning_rate': expected a number; found 'x'"),
    ({"mini_batch_size": 0}, r"'mini_batch_size': expected a value in \[1, None\]; found 0"),
    ([("epochs", 1)], r"parameters: expected a dict of parameter name -> value; found list"),
    ("epochs", r"parameters: expected a dict .*found str"),
])
def test_parameters_are_typed(model_path, parameters, message):
    with pytest.raises(UpdateError, match=message):
        updatable.UpdateTask(mljax.MLModel(model_path), _data(), parameters=parameters)


def test_typed_parameters_still_accept_numpy_numbers(model_path):
    ctx = updatable.UpdateTask(mljax.MLModel(model_path), _data(),
                               parameters={"epochs": np.int64(3), "shuffle": np.bool_(False), "seed": 7,
                                           "learning_rate": np.float32(0.01)}).run()
    assert ctx.event == "completed" and ctx.metrics["epoch_index"] == 2
    assert ctx.parameters["epochs"] == 3 and ctx.parameters["shuffle"] is False


@pytest.mark.parametrize("data, message", [
    (None, "training data: expected a list of feature dicts or a dict of arrays; found NoneType"),
    ("data", "found str"),
    (5, "found int"),
    ([{"features": "x", "label": "a"}] * 2, r"training input 'features': expected numbers; found <U1"),
    ([{"features": np.ones(6), "label": {"a": 1}}] * 2, r"training labels 'label': expected class labels \(str or int\); found dict"),
    ([{"features": np.ones(6), "label": np.array([["a", "b"], ["c", "a"]])}] * 2,
     r"expected one class label per sample; found samples of shape \(2, 2\)"),
    ({"features": np.ones(6), "label": "a"}, "training input 'label': expected an array with one entry per sample"),
    ([{"features": [[1, 2], [3]], "label": "a"}], "training sample 0, input 'features': expected an array"),
])
def test_bad_training_data(model_path, data, message):
    with pytest.raises(UpdateError, match=message):
        updatable.UpdateTask(mljax.MLModel(model_path), data)


def test_a_failing_progress_handler_ends_the_task_cleanly(model_path):
    model = mljax.MLModel(model_path)
    before = _weights(model)
    seen = []

    def handler(ctx):
        seen.append(ctx.event)
        if ctx.event == "mini_batch_end":
            raise RuntimeError("handler failed")
    task = updatable.UpdateTask(model, _data(), progress_handler=handler)
    with pytest.raises(UpdateError, match="the mini_batch_end handler raised RuntimeError: handler failed; "
                                          "the task stopped and the model is unchanged") as info:
        task.run()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert seen == ["training_begin", "mini_batch_end"]
    assert _weights(model) == before
    x = _data()[0]["features"]
    assert model.predict({"features": x})["label"] == mljax.MLModel(model_path).predict({"features": x})["label"]
