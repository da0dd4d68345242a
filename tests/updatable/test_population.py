"""updatable.personalize: a population of users in one call equals each user's own UpdateTask.

The 4-device runs happen in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before JAX starts);
the reference UpdateTask runs happen here, on one device.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import mljax
import updatable
from mljax.errors import UpdateError
from models import dense_classifier

ct = pytest.importorskip("coremltools")
ROOT = Path(__file__).resolve().parents[2]
LABELS = ("a", "b", "c")

CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import updatable
    assert len(jax.devices()) == 4, jax.devices()
    model_path, data_path, out_path = sys.argv[1:4]
    data = np.load(data_path, allow_pickle=False)
    sizes, probe = data["sizes"], data["probe"]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    datasets = [{"features": data["x"][a:b], "label": data["y"][a:b]} for a, b in zip(starts[:-1], starts[1:])]
    seen = []
    ctxs = updatable.personalize(model_path, datasets, progress_handler=lambda c: seen.append(c.event))
    probs, labels = [], []
    for c in ctxs:
        outs = c.model.predict([{"features": p} for p in probe])
        labels.append([o["label"] for o in outs])
        probs.append([[o["probs"][k] for k in ("a", "b", "c")] for o in outs])
    np.savez(out_path, probs=np.array(probs), losses=np.array([c.metrics["loss"] for c in ctxs]))
    print(json.dumps({"labels": labels, "events": seen, "event": ctxs[0].event}))
""")


def _population(n_users=32, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 15, size=n_users)      # ragged: 1 to 14 samples, batches of 4
    sizes[:3] = [1, 4, 13]                           # a single sample, one full batch, a partial last one
    x = rng.normal(size=(int(sizes.sum()), 6)).astype(np.float32)
    y = rng.choice(LABELS, size=len(x))
    probe = rng.normal(size=(5, 6)).astype(np.float32)
    return sizes, x, y, probe


def _datasets(sizes, x, y):
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [{"features": x[a:b], "label": y[a:b]} for a, b in zip(starts[:-1], starts[1:])]


def _reference(model_path, datasets, probe):
    """Each user's own UpdateTask (one device): labels and probabilities on the probe inputs."""
    probs, labels, losses, model = [], [], [], mljax.MLModel(model_path)   # one model: one compiled step
    for data in datasets:
        ctx = updatable.UpdateTask(model, data).run()
        outs = ctx.model.predict([{"features": p} for p in probe])
        labels.append([o["label"] for o in outs])
        probs.append([[o["probs"][k] for k in LABELS] for o in outs])
        losses.append(ctx.metrics["loss"])
    return np.array(probs), labels, np.array(losses)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_32_users_on_4_devices_equal_their_update_tasks(optimizer, tmp_path):
    path, _ = dense_classifier(optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.05, batch=4,
                               momentum=0.9 if optimizer == "sgd" else 0.0, epochs=3, shuffle=True)
    sizes, x, y, probe = _population()
    np.savez(tmp_path / "data.npz", sizes=sizes, x=x, y=y, probe=probe)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "data.npz"),
                          str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    child = json.loads(run.stdout.strip().splitlines()[-1])
    got = np.load(tmp_path / "out.npz")
    want_probs, want_labels, want_losses = _reference(path, _datasets(sizes, x, y), probe)
    assert child["labels"] == want_labels
    np.testing.assert_allclose(got["probs"], want_probs, atol=1e-4)
    np.testing.assert_allclose(got["losses"], want_losses, rtol=1e-4, atol=1e-5)
    assert child["events"] == ["training_begin"] + ["epoch_end"] * 3 and child["event"] == "completed"
    # the update changed every user's model, and differently: the comparison is not vacuous
    before = np.array([[o["probs"][k] for k in LABELS] for o in
                       mljax.MLModel(path).predict([{"features": p} for p in probe])])
    assert np.abs(want_probs - before).max(axis=(1, 2)).min() > 1e-3
    assert np.abs(want_probs - want_probs[:1]).max() > 1e-2


def test_one_device_unshuffled_and_saved(tmp_path):
    """In process (one device), shuffle off, larger mini-batches than some users have; the
    result models save and reload with the trained weights."""
    path, _ = dense_classifier(optimizer="adam", lr=0.05, batch=6, epochs=2, shuffle=False)
    sizes, x, y, probe = _population(n_users=5, seed=1)
    datasets = _datasets(sizes, x, y)
    ctxs = updatable.personalize(path, datasets, parameters={"epochs": 4, "seed": 7})
    want_probs, want_labels, _ = _reference_params(path, datasets, probe, {"epochs": 4, "seed": 7})
    for c, wp, wl in zip(ctxs, want_probs, want_labels):
        saved = mljax.MLModel(c.model.save(tmp_path / f"{id(c)}.mlmodel"))
        outs = saved.predict([{"features": p} for p in probe])
        assert [o["label"] for o in outs] == wl
        np.testing.assert_allclose([[o["probs"][k] for k in LABELS] for o in outs], wp, atol=1e-4)
        assert c.parameters["epochs"] == 4 and c.metrics["epoch_index"] == 3


def _reference_params(path, datasets, probe, parameters):
    probs, labels, model = [], [], mljax.MLModel(path)
    for data in datasets:
        ctx = updatable.UpdateTask(model, data, parameters=parameters).run()
        outs = ctx.model.predict([{"features": p} for p in probe])
        labels.append([o["label"] for o in outs])
        probs.append([[o["probs"][k] for k in LABELS] for o in outs])
    return np.array(probs), labels, None


def test_cancel_after_an_epoch_and_bad_input():
    path, _ = dense_classifier(epochs=5)
    sizes, x, y, _ = _population(n_users=3, seed=2)
    datasets = _datasets(sizes, x, y)
    ctxs = updatable.personalize(path, datasets, progress_handler=lambda c: c.event == "epoch_end"
                                 and c.metrics["epoch_index"] == 1 and c.task.cancel())
    assert [c.event for c in ctxs] == ["cancelled"] * 3 and ctxs[0].metrics["epoch_index"] == 1
    bad = list(datasets)
    bad[2] = {"features": datasets[2]["features"], "label": ["z"] * len(datasets[2]["features"])}
    with pytest.raises(UpdateError, match=r"user 2: .*not classes of this model"):
        updatable.personalize(path, bad)
    with pytest.raises(UpdateError, match="parameter 'epochs'"):
        updatable.personalize(path, datasets, parameters={"epochs": 0})
    with pytest.raises(UpdateError, match="one training dataset per user"):
        updatable.personalize(path, datasets[0])


TRAIN_PIPELINE = textwrap.dedent("""
    import numpy as np, optax
    import mljax
    from updatable.demo import demo_data, demo_model_path
    from updatable.pipeline import Pipeline

    def train_pipeline(devices):
        # the digits pipeline's head and an ML-program layer trained by Pipeline on ``devices``
        x, y = demo_data()
        pipe = Pipeline(mljax.MLModel(demo_model_path()), trainable=["classifier/*", "features/l2_*"],
                        loss="cross_entropy_from_probs", optimizer=optax.sgd(0.2, momentum=0.9), devices=devices)
        history = pipe.fit({"pixels": x[:37]}, y[:37].astype(int), epochs=2, batch_size=10, seed=3)
        probs = [[o["probabilities"][k] for k in sorted(o["probabilities"])]
                 for o in pipe.trained_model().predict([{"pixels": v} for v in x[40:60]])]
        return {"history": np.array(history), "probs": np.array(probs)}
""")
PIPELINE_CHILD = TRAIN_PIPELINE + textwrap.dedent("""
    import sys, jax
    assert len(jax.devices()) == 4, jax.devices()
    np.savez(sys.argv[1], **train_pipeline(jax.devices()))
""")


def test_research_pipeline_trains_data_parallel_on_4_devices(tmp_path):
    """Mini-batches of 10 (the last of 7) sharded over 4 devices, padded to 12 and 8 and masked:
    the same losses and trained model (ML-program weights included) as on one device (here)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", PIPELINE_CHILD, str(tmp_path / "four.npz")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    four = np.load(tmp_path / "four.npz")
    namespace = {}
    exec(TRAIN_PIPELINE, namespace)          # the same code, in this one-device process
    one = namespace["train_pipeline"](None)
    assert one["history"][-1] < one["history"][0]
    np.testing.assert_allclose(four["history"], one["history"], rtol=1e-5)
    np.testing.assert_allclose(four["probs"], one["probs"], atol=1e-5)


MULTIHOST_CHILD = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    process, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process)
    assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
    import numpy as np
    import updatable
    from updatable.demo import demo_model_path
    data = np.load(data)
    datasets = [{"pixels": data[f"x{i}"], "digit": data[f"y{i}"]} for i in range(int(data["users"]))]
    ctxs = updatable.personalize(demo_model_path(), datasets, parameters={"epochs": 3})
    probs = [[[o["probabilities"][k] for k in sorted(o["probabilities"])]
              for o in c.model.predict([{"pixels": v} for v in data["probe"]])] for c in ctxs]
    np.save(out, np.array(probs))
""")


def test_two_processes_under_jax_distributed(tmp_path):
    """The same personalize call in 2 CPU processes (jax.distributed, gloo collectives, one
    device each): every process gets every user's model, equal to the users' UpdateTasks."""
    import socket
    import updatable.demo
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    x, y = updatable.demo.demo_data()
    datasets = [{"pixels": x[i * 7:(i + 1) * 7 + i % 3], "digit": y[i * 7:(i + 1) * 7 + i % 3]} for i in range(5)]
    np.savez(tmp_path / "data.npz", users=len(datasets), probe=x[100:105],
             **{f"x{i}": d["pixels"] for i, d in enumerate(datasets)}, **{f"y{i}": d["digit"] for i, d in enumerate(datasets)})
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_CHILD, str(i), str(port), str(tmp_path / "data.npz"),
                               str(tmp_path / f"{i}.npy")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    model = mljax.MLModel(updatable.demo.demo_model_path())
    want = np.array([[[o["probabilities"][k] for k in sorted(o["probabilities"])]
                      for o in updatable.UpdateTask(model, d, parameters={"epochs": 3}).run().model.predict(
                          [{"pixels": v} for v in x[100:105]])] for d in datasets])
    for i in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"{i}.npy"), want, atol=1e-4)


def test_updatable_convolution_layers_per_user(tmp_path):
    """An updatable convolution (conv -> relu -> flatten -> dense -> softmax, both layers trained):
    the per-user vmap around the per-sample vmap gives each user's UpdateTask result."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder, SgdParams
    rng = np.random.default_rng(0)
    b = NeuralNetworkBuilder([("image", datatypes.Array(2, 6, 6))], [("probs", None)], mode="classifier")
    b.add_convolution("conv", kernel_channels=2, output_channels=3, height=3, width=3, stride_height=1,
                      stride_width=1, border_mode="valid", groups=1,
                      W=rng.normal(size=(3, 3, 2, 3)).astype(np.float32) * 0.3, b=np.zeros(3, np.float32),
                      has_bias=True, input_name="image", output_name="c")
    b.add_activation("relu", "RELU", "c", "cr")
    b.add_flatten("flat", 0, "cr", "f")
    b.add_inner_product("dense", W=rng.normal(size=(2, 48)).astype(np.float32) * 0.2, b=np.zeros(2, np.float32),
                        input_channels=48, output_channels=2, has_bias=True, input_name="f", output_name="logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(["x", "y"], predicted_feature_name="label", prediction_blob="probs")
    b.make_updatable(["conv", "dense"])
    b.set_categorical_cross_entropy_loss(name="loss", input="probs")
    b.set_sgd_optimizer(SgdParams(lr=0.05, batch=3))
    b.set_epochs(3)
    ct.models.utils.save_spec(b.spec, str(tmp_path / "conv.mlmodel"))
    model = mljax.MLModel(tmp_path / "conv.mlmodel")
    datasets = [{"image": rng.normal(size=(n, 2, 6, 6)).astype(np.float32), "label": rng.choice(["x", "y"], n)}
                for n in (2, 5, 7, 4)]
    probe = {"image": rng.normal(size=(2, 6, 6)).astype(np.float32)}
    before = model.predict(probe)["probs"]["x"]
    for ctx, data in zip(updatable.personalize(model, datasets), datasets):
        want = updatable.UpdateTask(model, data).run().model.predict(probe)["probs"]["x"]
        assert abs(ctx.model.predict(probe)["probs"]["x"] - want) < 1e-4 and abs(want - before) > 1e-3
