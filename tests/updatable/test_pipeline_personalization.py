"""The issue's acceptance scenario, as a new user would do it with coremltools.

An ML-program feature extractor converted from a PyTorch network, followed by a
neural-network classifier made updatable with NeuralNetworkBuilder, joined with
``ct.utils.make_pipeline`` and marked updatable, personalized on 100 samples of classes
it never saw.
"""
import filecmp
import hashlib
from pathlib import Path

import numpy as np
import pytest

import mljax
import updatable
from mljax.pipeline import pipeline_of
from helpers import tmp_path_for

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
datasets = pytest.importorskip("sklearn.datasets")

OLD, NEW = list(range(7)), [7, 8, 9]


def _digits():
    d = datasets.load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return x, d.target


def _train_extractor(x, y):
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 32), torch.nn.ReLU())
    head = torch.nn.Linear(32, 10)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(body(xt)), yt)
        loss.backward()
        opt.step()
    return body.eval(), head


def _build_pipeline(optimizer: str):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams

    x, y = _digits()
    old = np.isin(y, OLD)
    body, head = _train_extractor(x[old], y[old])
    traced = torch.jit.trace(body, torch.zeros(1, 64))
    extractor = ct.convert(traced, convert_to="mlprogram",
                           inputs=[ct.TensorType(name="pixels", shape=(1, 64))],
                           outputs=[ct.TensorType(name="embedding")],
                           minimum_deployment_target=ct.target.iOS16)
    w = head.weight.detach().numpy().copy()
    b = head.bias.detach().numpy().copy()
    w[NEW] *= 0.01  # never-seen classes start near zero
    builder = NeuralNetworkBuilder([("embedding", datatypes.Array(1, 32))], [("probs", None)], mode="classifier")
    builder.add_inner_product("head", W=w, b=b, input_channels=32, output_channels=10, has_bias=True,
                              input_name="embedding", output_name="logits")
    builder.add_softmax("softmax", "logits", "probs")
    builder.set_class_labels([str(i) for i in range(10)], predicted_feature_name="digit", prediction_blob="probs")
    builder.make_updatable(["head"])
    builder.set_categorical_cross_entropy_loss(name="loss", input="probs")
    if optimizer == "sgd":
        builder.set_sgd_optimizer(SgdParams(lr=0.1, batch=10, momentum=0.9))
    else:
        builder.set_adam_optimizer(AdamParams(lr=0.01, batch=10))
    builder.set_epochs(50)
    return _updatable_pipeline(extractor, builder, f"pipeline-{optimizer}.mlpackage"), (x, y)


def _updatable_pipeline(extractor, builder, file_name: str) -> Path:
    """``extractor`` then the updatable classifier of ``builder``, as coremltools users join them:
    ``make_pipeline``, marked updatable, trained from the pipeline's input and a ``digit`` label."""
    pipeline = ct.utils.make_pipeline(extractor, ct.models.MLModel(builder.spec))
    spec = pipeline.get_spec()
    spec.isUpdatable = True
    del spec.description.trainingInput[:]
    spec.description.trainingInput.add().CopyFrom(spec.description.input[0])
    label = spec.description.trainingInput.add()
    label.name = "digit"
    label.type.stringType.SetInParent()
    path = tmp_path_for(file_name)
    ct.models.MLModel(spec, weights_dir=pipeline.weights_dir, skip_model_load=True).save(str(path))
    return path


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _torch_head_training(w, b, emb, labels, orders, optimizer):
    """An independent reference of Core ML's update: the same head trained by PyTorch on the
    same embeddings (softmax cross-entropy averaged over each mini-batch, torch's SGD/Adam,
    whose update rules are Core ML's), visiting the samples in the given per-epoch orders."""
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(w))
        head.bias.copy_(torch.from_numpy(b))
    opt = (torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(head.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8))
    xt, yt = torch.from_numpy(emb), torch.from_numpy(labels)
    for order in orders:
        for s in range(0, len(order), 10):
            idx = torch.from_numpy(order[s:s + 10])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx]).backward()
            opt.step()
    return head


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_matches_torch_reference(optimizer):
    """Unshuffled, the update is the reference's, step for step: head probabilities within
    1e-4 of PyTorch's after 3 epochs.  (Cancelled there: at lr 0.1 and momentum 0.9 the
    trajectory amplifies rounding differences of 1e-7 to 1e-4 in the weights by epoch 8, in
    any two implementations; the spec allows 50 epochs only.)"""
    path, (x, y) = _build_pipeline(optimizer)
    model = mljax.MLModel(path)
    idx = np.random.default_rng(1).permutation(np.flatnonzero(np.isin(y, NEW)))[:40]
    extractor = _extractor(model)
    emb = np.concatenate([extractor.predict({"pixels": x[i][None]})["embedding"] for i in idx]).astype(np.float32)
    spec = pipeline_of(model.get_spec()).models[-1]
    w0, b0 = _head_weights(spec)
    data = [{"pixels": x[i][None], "digit": str(y[i])} for i in idx]
    stop_after = lambda c: c.event == "epoch_end" and c.metrics["epoch_index"] == 2 and c.task.cancel()  # noqa: E731
    ctx = updatable.UpdateTask(model, data, parameters={"shuffle": False}, progress_handler=stop_after).run()
    assert ctx.event == "cancelled" and ctx.metrics["epoch_index"] == 2
    ref = _torch_head_training(w0, b0, emb, y[idx].astype(np.int64), [np.arange(len(idx))] * 3, optimizer)
    with torch.no_grad():
        want = torch.softmax(ref(torch.from_numpy(emb)), -1).numpy()
    got = np.stack([[ctx.model.predict({"pixels": x[i][None]})["probs"][str(c)] for c in range(10)]
                    for i in idx])
    np.testing.assert_allclose(got, want, atol=1e-4)


def _extractor(model):
    """The pipeline's first stage as a model of its own (the extractor's own embeddings)."""
    return mljax.MLModel(pipeline_of(model.get_spec()).models[0], weights_dir=model.weights_dir)


def _head_weights(nn_spec):
    layer = nn_spec.neuralNetworkClassifier.layers[0].innerProduct
    w = np.asarray(layer.weights.floatValue, np.float32).reshape(layer.outputChannels, layer.inputChannels)
    return w, np.asarray(layer.bias.floatValue, np.float32)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_personalize_updatable_pipeline(optimizer, tmp_path):
    path, (x, y) = _build_pipeline(optimizer)
    before = _tree_digest(path)
    rng = np.random.default_rng(0)
    new_idx = rng.permutation(np.flatnonzero(np.isin(y, NEW)))
    train, test = new_idx[:100], new_idx[100:]
    model = mljax.MLModel(path)

    def accuracy(m):
        outs = m.predict([{"pixels": x[i][None]} for i in test])
        return np.mean([o["digit"] == str(y[i]) for o, i in zip(outs, test)])

    acc_before = accuracy(model)
    events = set()
    data = [{"pixels": x[i][None], "digit": str(y[i])} for i in train]
    ctx = updatable.UpdateTask(model, data, progress_handler=lambda c: events.add(c.event)).run()
    # SGD at lr 0.1 / momentum 0.9 is chaotic: after a few epochs the trajectory amplifies
    # rounding differences of 1e-7 (one CPU's kernels against another's) into a different
    # outcome, so one run's accuracy is a draw from a spread (0.58-0.86 over eight shuffle
    # seeds on one Intel machine, where torch's runs of the same orders spanned 0.71-0.85).
    # The test therefore compares distributions, not draws: mljax trains with shuffle seeds
    # 0-4 (0 is the model's default, the run above), PyTorch trains the same head on the same
    # embeddings in exactly those per-epoch orders (mljax draws one permutation per epoch from
    # NumPy's generator seeded with ``seed``), and the medians must agree within 0.10.
    extractor = _extractor(model)
    embed = lambda ids: np.concatenate(  # noqa: E731
        [extractor.predict({"pixels": x[i][None]})["embedding"] for i in ids]).astype(np.float32)
    emb_train, emb_test = embed(train), embed(test)
    w0, b0 = _head_weights(pipeline_of(model.get_spec()).models[-1])
    accs, ref_accs = [accuracy(ctx.model)], []
    for seed in range(5):
        if seed:
            accs.append(accuracy(updatable.UpdateTask(model, data, parameters={"seed": seed}).run().model))
        order_rng = np.random.default_rng(seed)
        ref = _torch_head_training(w0, b0, emb_train, y[train].astype(np.int64),
                                   [order_rng.permutation(len(train)) for _ in range(50)], optimizer)
        with torch.no_grad():
            ref_accs.append(float(np.mean(ref(torch.from_numpy(emb_test)).argmax(-1).numpy() == y[test])))
    assert acc_before < 0.2
    assert min(ref_accs) > acc_before + 0.4, f"the reference training itself did not learn: {ref_accs}"
    assert min(accs) > acc_before + 0.3, f"{optimizer}: a run did not learn: {accs} (before: {acc_before:.3f})"
    assert np.median(accs) >= np.median(ref_accs) - 0.10, \
        f"{optimizer}: accuracy on unseen samples of new classes {accs}, torch reference {ref_accs}"
    assert events == {"training_begin", "mini_batch_end", "epoch_end"}

    out = ctx.model.save(tmp_path / "personal.mlpackage")
    # coremltools reloads it, still updatable
    reloaded_ct = ct.models.MLModel(str(out), skip_model_load=True)
    spec = reloaded_ct.get_spec()
    stages = pipeline_of(spec).models
    assert spec.isUpdatable and stages[-1].isUpdatable
    assert stages[-1].neuralNetworkClassifier.layers[0].isUpdatable
    # mljax reloads it with identical predictions
    reloaded = mljax.MLModel(out)
    for i in test[:20]:
        a = ctx.model.predict({"pixels": x[i][None]})
        b = reloaded.predict({"pixels": x[i][None]})
        assert a["digit"] == b["digit"] and a["probs"] == b["probs"]
    # the source package is byte-identical
    assert _tree_digest(path) == before


def test_update_behind_a_channel_last_extractor_matches_torch():
    """The frozen stage is a convolutional ML program whose weights the lowering lays out once
    (a channel-last depthwise block: its weight prologue); the features it gives the updatable
    head, and so the head's training, equal PyTorch's on the same convolutions, step for step."""
    from coremltools.converters.mil.mil import Builder as mb, types
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder, SgdParams
    from helpers import convert_mil
    rng = np.random.default_rng(5)
    wd = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    wp = rng.normal(size=(6, 4, 1, 1)).astype(np.float32) * 0.5

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 6, 5), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def features(x):
        d = mb.relu(x=mb.conv(x=x, weight=wd, pad_type="same", groups=4))
        return mb.reduce_mean(x=mb.conv(x=d, weight=wp), axes=[2, 3], keep_dims=False, name="embedding")

    extractor = ct.models.MLModel(str(convert_mil(features, opset="iOS16")))
    w0, b0 = rng.normal(size=(3, 6)).astype(np.float32) * 0.3, np.zeros(3, np.float32)
    builder = NeuralNetworkBuilder([("embedding", datatypes.Array(1, 6))], [("probs", None)], mode="classifier")
    builder.add_inner_product("head", W=w0, b=b0, input_channels=6, output_channels=3, has_bias=True,
                              input_name="embedding", output_name="logits")
    builder.add_softmax("softmax", "logits", "probs")
    builder.set_class_labels(["0", "1", "2"], predicted_feature_name="digit", prediction_blob="probs")
    builder.make_updatable(["head"])
    builder.set_categorical_cross_entropy_loss(name="loss", input="probs")
    builder.set_sgd_optimizer(SgdParams(lr=0.1, batch=10, momentum=0.9))
    builder.set_epochs(3)
    model = mljax.MLModel(_updatable_pipeline(extractor, builder, "conv-pipeline.mlpackage"))
    assert model.stage.children[next(iter(model.stage.children))].prepare is not None   # the extractor has a prologue

    xs = rng.normal(size=(30, 1, 4, 6, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    ctx = updatable.UpdateTask(model, [{"x": x, "digit": str(c)} for x, c in zip(xs, labels)],
                               parameters={"shuffle": False}).run()
    with torch.no_grad():
        t = torch.from_numpy
        emb = torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(t(xs[:, 0]), t(wd), padding=1, groups=4)),
                                         t(wp)).mean((2, 3)).numpy()
    ref = _torch_head_training(w0, b0, emb, labels.astype(np.int64), [np.arange(30)] * 3, "sgd")
    with torch.no_grad():
        want = torch.softmax(ref(torch.from_numpy(emb)), -1).numpy()
    got = np.stack([[o["probs"][str(c)] for c in range(3)] for o in ctx.model.predict([{"x": x} for x in xs])])
    np.testing.assert_allclose(got, want, atol=1e-4)
