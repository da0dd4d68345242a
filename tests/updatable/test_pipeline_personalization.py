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
    classifier = ct.models.MLModel(builder.spec)
    pipeline = ct.utils.make_pipeline(extractor, classifier)
    spec = pipeline.get_spec()
    spec.isUpdatable = True
    del spec.description.trainingInput[:]
    spec.description.trainingInput.add().CopyFrom(spec.description.input[0])
    label = spec.description.trainingInput.add()
    label.name = "digit"
    label.type.stringType.SetInParent()
    path = tmp_path_for(f"pipeline-{optimizer}.mlpackage")
    ct.models.MLModel(spec, weights_dir=pipeline.weights_dir, skip_model_load=True).save(str(path))
    return path, (x, y)


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


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
    acc_after = accuracy(ctx.model)
    assert acc_before < 0.2
    assert acc_after >= 0.8, f"{optimizer}: accuracy on unseen samples of new classes {acc_after:.2f}"
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
