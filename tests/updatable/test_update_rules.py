"""UpdateTask reproduces Core ML's update rules step by step against an independent NumPy reference."""
import filecmp
import hashlib

import numpy as np
import pytest

import mljax
import updatable
from mljax.errors import UpdateError
from models import dense_classifier

ct = pytest.importorskip("coremltools")


def _numpy_grads(w, x, y):
    """Hand-derived gradients of mean cross-entropy for dense-relu-dense-softmax."""
    h = x @ w["w1"].T + w["b1"]
    hr = np.maximum(h, 0)
    z = hr @ w["w2"].T + w["b2"]
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    dz = p.copy()
    dz[np.arange(len(y)), y] -= 1
    dz /= len(y)
    g = {"w2": dz.T @ hr, "b2": dz.sum(0)}
    dh = (dz @ w["w2"]) * (h > 0)
    g.update(w1=dh.T @ x, b1=dh.sum(0))
    return loss, g


def _reference(w, x, y, order_batches, *, optimizer, lr, momentum=0.0, b1=0.9, b2=0.999, eps=1e-8):
    w = {k: v.astype(np.float64) for k, v in w.items()}
    state = {k: np.zeros_like(v) for k, v in w.items()}
    m2 = {k: np.zeros_like(v) for k, v in w.items()}
    losses = []
    for t, idx in enumerate(order_batches, start=1):
        loss, g = _numpy_grads(w, x[idx], y[idx])
        losses.append(loss)
        for k in w:
            if optimizer == "sgd":
                state[k] = momentum * state[k] + g[k]
                w[k] = w[k] - lr * state[k]
            else:
                state[k] = b1 * state[k] + (1 - b1) * g[k]
                m2[k] = b2 * m2[k] + (1 - b2) * g[k] ** 2
                mh, vh = state[k] / (1 - b1 ** t), m2[k] / (1 - b2 ** t)
                w[k] = w[k] - lr * mh / (np.sqrt(vh) + eps)
    return w, losses


def _data(n=22, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    return x, y


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_steps_match_numpy_reference(optimizer, momentum):
    path, w0 = dense_classifier(optimizer=optimizer, momentum=momentum, lr=0.05, batch=4, epochs=3)
    x, y = _data()
    data = [{"features": xi, "label": "abc"[yi]} for xi, yi in zip(x, y)]
    seen = []
    task = updatable.UpdateTask(path, data, parameters={"seed": 7},
                                progress_handler=lambda c: seen.append((c.event, c.metrics.get("loss"))))
    ctx = task.run()
    # the same batch order, from the same seed
    rng = np.random.default_rng(7)
    batches = []
    for _ in range(3):
        order = rng.permutation(len(x))
        batches += [order[i:i + 4] for i in range(0, len(x), 4)]
    ref_w, ref_losses = _reference(w0, x, y, batches, optimizer=optimizer, lr=0.05, momentum=momentum)
    got_losses = [l for e, l in seen if e == "mini_batch_end"]
    np.testing.assert_allclose(got_losses, ref_losses, rtol=2e-4, atol=1e-5)
    trained = {"w1": task._trainable["dense1/weight"], "b1": task._trainable["dense1/bias"],
               "w2": task._trainable["dense2/weight"], "b2": task._trainable["dense2/bias"]}
    for k in ref_w:
        np.testing.assert_allclose(np.asarray(trained[k]), ref_w[k], rtol=1e-3, atol=1e-5)
    # events: one begin, one end per mini-batch, one per epoch
    events = [e for e, _ in seen]
    assert events[0] == "training_begin"
    assert events.count("mini_batch_end") == len(batches) and events.count("epoch_end") == 3
    assert ctx.event == "completed"


def test_only_updatable_layers_change_and_gradients_cross_frozen_layers():
    path, w0 = dense_classifier(hidden_updatable=False, epochs=2)
    x, y = _data()
    ctx = updatable.UpdateTask(path, {"features": x, "label": np.array(["abc"[i] for i in y])}).run()
    spec = ctx.model.get_spec()
    layers = {l.name: l for l in spec.neuralNetworkClassifier.layers}
    np.testing.assert_array_equal(np.array(layers["dense1"].innerProduct.weights.floatValue), w0["w1"].ravel())
    assert not np.allclose(np.array(layers["dense2"].innerProduct.weights.floatValue), w0["w2"].ravel())


def test_shuffle_is_reproducible_from_seed():
    path, _ = dense_classifier(epochs=2)
    x, y = _data()
    data = {"features": x, "label": np.array(["abc"[i] for i in y])}

    def losses(seed):
        out = []
        updatable.UpdateTask(path, data, parameters={"seed": seed},
                             progress_handler=lambda c: out.append(c.metrics["loss"])
                             if c.event == "mini_batch_end" else None).run()
        return out

    assert losses(1) == losses(1)
    assert losses(1) != losses(2)


def test_cross_entropy_finite_when_softmax_underflows():
    path, _ = dense_classifier()
    spec = mljax.MLModel(path).get_spec()
    # a confident head: huge logits make softmax exactly 0 for the other classes in fp32
    ip = spec.neuralNetworkClassifier.layers[2].innerProduct
    del ip.bias.floatValue[:]
    ip.bias.floatValue.extend([300.0, -300.0, -300.0])
    model = mljax.MLModel(spec)
    probs = model.predict({"features": np.zeros(6)})["probs"]
    assert probs["b"] == 0.0
    x = np.zeros((4, 6), np.float32)
    seen = []
    task = updatable.UpdateTask(model, {"features": x, "label": np.array(["b"] * 4)},
                                parameters={"epochs": 1, "shuffle": False},
                                progress_handler=lambda c: seen.append(c.metrics["loss"])
                                if c.event == "mini_batch_end" else None)
    task.run()
    # log-softmax reference: loss = logsumexp(z) - z_b, with z from the relu-dense stack at x = 0
    assert np.isfinite(seen[0]) and abs(seen[0] - 600.0) < 1.0


def test_cancel_from_progress_handler_stops_after_current_batch():
    path, _ = dense_classifier(epochs=5)
    x, y = _data()
    seen = []

    def handler(ctx):
        seen.append(ctx.event)
        if ctx.event == "mini_batch_end" and ctx.metrics["mini_batch_index"] == 1:
            ctx.task.cancel()

    ctx = updatable.UpdateTask(path, {"features": x, "label": np.array(["abc"[i] for i in y])},
                               progress_handler=handler).run()
    assert seen == ["training_begin", "mini_batch_end", "mini_batch_end"]
    assert ctx.event == "cancelled"


def test_bad_inputs_are_clear_errors_and_leave_the_model_untouched():
    path, _ = dense_classifier()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    x, y = _data()
    good = [{"features": xi, "label": "abc"[yi]} for xi, yi in zip(x, y)]
    with pytest.raises(UpdateError, match="lacks training inputs \\['label'\\]"):
        updatable.UpdateTask(path, [{"features": x[0]}])
    with pytest.raises(UpdateError, match="not classes of this model"):
        updatable.UpdateTask(path, [{"features": x[0], "label": "zebra"}])
    with pytest.raises(UpdateError, match="different shapes"):
        updatable.UpdateTask(path, [{"features": x[0], "label": "a"}, {"features": x[0][:3], "label": "a"}])
    with pytest.raises(UpdateError, match="allows"):
        updatable.UpdateTask(path, good, parameters={"learning_rate": 5.0})
    with pytest.raises(UpdateError, match="allows"):
        updatable.UpdateTask(path, good, parameters={"mini_batch_size": 7})
    with pytest.raises(UpdateError, match="unknown update parameter"):
        updatable.UpdateTask(path, good, parameters={"lr": 0.1})
    with pytest.raises(UpdateError, match="does not apply"):
        updatable.UpdateTask(path, good, parameters={"beta1": 0.5})
    # a diverging update: NaN features make a NaN loss
    bad = [dict(d) for d in good]
    bad[0]["features"] = np.full(6, np.nan)
    with pytest.raises(UpdateError, match="loss became nan"):
        updatable.UpdateTask(path, bad, parameters={"shuffle": False}).run()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_saved_model_stays_updatable_and_reloads_identically(tmp_path):
    path, _ = dense_classifier(epochs=2)
    source_copy = tmp_path / "source.mlmodel"
    source_copy.write_bytes(path.read_bytes())
    x, y = _data()
    ctx = updatable.UpdateTask(path, {"features": x, "label": np.array(["abc"[i] for i in y])}).run()
    out = ctx.model.save(tmp_path / "personal.mlmodel")
    assert filecmp.cmp(path, source_copy, shallow=False)
    spec = ct.utils.load_spec(str(out))
    assert spec.isUpdatable and spec.neuralNetworkClassifier.layers[0].isUpdatable
    assert spec.neuralNetworkClassifier.updateParams.lossLayers[0].name == "loss"
    reloaded = mljax.MLModel(out)
    for xi in x[:5]:
        a, b = ctx.model.predict({"features": xi}), reloaded.predict({"features": xi})
        assert a["label"] == b["label"] and a["probs"] == b["probs"]
    # a second update continues from the saved model
    again = updatable.UpdateTask(out, {"features": x, "label": np.array(["abc"[i] for i in y])}).run()
    assert again.event == "completed"


def test_tasks_on_one_model_share_the_compiled_step_but_not_settings():
    """A second task on the same model reuses the jitted step; a new learning rate gets its own."""
    path, w0 = dense_classifier(lr=0.05, batch=4, epochs=1)
    model = mljax.MLModel(path)
    x, y = _data()
    data = {"features": x, "label": np.array(["abc"[i] for i in y])}
    steps = []
    for lr in (0.05, 0.5, 0.05):
        task = updatable.UpdateTask(model, data, parameters={"learning_rate": lr, "seed": 1, "shuffle": False})
        task.run()
        batches = [np.arange(i, min(i + 4, len(x))) for i in range(0, len(x), 4)]
        ref_w, _ = _reference(w0, x, y, batches, optimizer="sgd", lr=lr)
        np.testing.assert_allclose(np.asarray(task._trainable["dense2/weight"]), ref_w["w2"], rtol=1e-3, atol=1e-5)
        steps.append(task._make_step(updatable.optimizers.from_parameters("sgd", task.parameters)))
    assert steps[2] is steps[0]          # shared across tasks with the same settings
    assert steps[1] is not steps[0]      # a new learning rate is a new step
