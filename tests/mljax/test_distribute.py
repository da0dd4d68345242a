"""List predicts sharded over several devices equal one-device predicts; predict_stream; with_weights.

The 4-device run happens in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before JAX starts).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import mljax
from mljax.errors import InputError

from helpers import convert_mil

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "updatable" / "data" / "digits_pipeline.mlpackage"
W = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)


@mb.program(input_specs=[mb.TensorSpec(shape=(3,), dtype=types.fp32)], opset_version=ct.target.iOS17)
def _prog(x):
    return mb.tanh(x=mb.matmul(x=x, y=W), name="y")


CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import mljax
    assert len(jax.local_devices()) == 4, jax.local_devices()
    program, digits, inputs, out = sys.argv[1:5]
    data = np.load(inputs)
    results, shards = {}, []
    for name, path, key, x in (("program", program, "x", data["x"]), ("digits", digits, "pixels", data["pixels"])):
        model = mljax.MLModel(path)
        model.BATCH_CHUNK = 4                  # 4 rows a device: several chunks, the last one padded
        fn = model._batched_fn
        def spy(weights, stacked, states, fn=fn):
            leaf = next(iter(stacked.values()))
            shards.append([len(leaf), len(leaf.sharding.device_set)])
            return fn(weights, stacked, states)
        model._batched_fn = spy
        outs = model.predict([{key: v} for v in x])
        shards.append("stream")
        streamed = list(model.predict_stream(({key: v} for v in x), chunk=7, progress=False))
        results[name] = [outs, streamed]
    np.savez(out, y=np.stack([o["y"] for o in results["program"][0]]),
             y_stream=np.stack([o["y"] for o in results["program"][1]]),
             p=np.stack([[o["probabilities"][k] for k in sorted(o["probabilities"])] for o in results["digits"][0]]),
             p_stream=np.stack([[o["probabilities"][k] for k in sorted(o["probabilities"])]
                                for o in results["digits"][1]]))
    print(json.dumps({"shards": shards, "labels": [o["digit"] for o in results["digits"][0]]}))
""")


def test_list_predicts_on_4_devices_equal_one_device(tmp_path):
    program = convert_mil(_prog)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 3)).astype(np.float32)
    digits = np.load(ROOT / "updatable" / "data" / "digits.npz")
    pixels = (digits["pixels"][:45].astype(np.float32) / 16.0)[:, None, :]
    np.savez(tmp_path / "in.npz", x=x, pixels=pixels)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", CHILD, str(program), str(DIGITS), str(tmp_path / "in.npz"),
                          str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    child = json.loads(run.stdout.strip().splitlines()[-1])
    got = np.load(tmp_path / "out.npz")
    # every chunk ran on the 4 devices: a list predict 16 rows at a time (4 a device), the last
    # chunk padded; predict_stream's chunks of 7 as 8 rows (the last chunk of 2 as 4)
    per_model = [[16, 4]] * 3 + ["stream"] + [[8, 4]] * 5 + [[4, 4]]
    assert child["shards"] == per_model + [[16, 4]] * 3 + ["stream"] + [[8, 4]] * 6 + [[4, 4]]
    assert len(jax.local_devices()) == 1     # the reference: this process, one device
    ref = mljax.MLModel(program)
    want = np.stack([ref.predict({"x": v})["y"] for v in x])
    np.testing.assert_allclose(want, np.tanh(x @ W), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["y"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["y_stream"], got["y"])
    model = mljax.MLModel(DIGITS)
    outs = model.predict([{"pixels": v} for v in pixels])
    assert child["labels"] == [o["digit"] for o in outs]
    want_p = np.stack([[o["probabilities"][k] for k in sorted(o["probabilities"])] for o in outs])
    np.testing.assert_allclose(got["p"], want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["p_stream"], got["p"], rtol=1e-6, atol=1e-7)


def test_predict_stream_in_chunks_and_errors():
    model = mljax.MLModel(convert_mil(_prog))
    xs = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    out = list(model.predict_stream(iter([{"x": v} for v in xs]), chunk=3, progress=False))
    np.testing.assert_allclose(np.stack([o["y"] for o in out]), np.tanh(xs @ W), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="chunk must be a positive int; found 0"):
        list(model.predict_stream([{"x": xs[0]}], chunk=0))
    with pytest.raises(InputError, match="found a single dict"):
        list(model.predict_stream({"x": xs[0]}))


def test_with_weights_predicts_with_the_new_values_and_checks_them():
    model = mljax.MLModel(convert_mil(_prog))
    (name, w), = [(k, v) for k, v in model.weights.items() if np.shape(v) == (3, 4)]
    doubled = model.with_weights({**model.weights, name: jax.numpy.asarray(np.asarray(w) * 2)})
    x = np.array([0.1, -0.2, 0.3], np.float32)
    np.testing.assert_allclose(doubled.predict({"x": x})["y"], np.tanh(x @ (2 * W)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict({"x": x})["y"], np.tanh(x @ W), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match=r"missing \[.+\], unexpected \['extra'\]"):
        model.with_weights({"extra": w})
    with pytest.raises(InputError, match=r"shape \(3, 4\) and dtype float32; found ndarray of shape \(4, 3\)"):
        model.with_weights({**model.weights, name: np.zeros((4, 3), np.float32)})
    with pytest.raises(InputError, match="dtype float32; found ndarray of shape \\(3, 4\\) and dtype float64"):
        model.with_weights({**model.weights, name: np.zeros((3, 4))})
    with pytest.raises(InputError, match="spec must describe this mlProgram model"):
        model.with_weights(model.weights, spec=mljax.MLModel(DIGITS).get_spec())
    digits = mljax.MLModel(DIGITS)           # nested weights (pipeline stages): names as stage/var
    head = digits.weights["classifier"]
    with pytest.raises(InputError, match=r"missing \['classifier/dense_0/bias', 'classifier/dense_0/weight'\]"):
        digits.with_weights({"features": digits.weights["features"]})
    with pytest.raises(InputError, match=r"weights 'classifier/dense_0/bias': expected an array of shape \(10,\)"):
        digits.with_weights({**digits.weights, "classifier": {**head, "dense_0/bias": np.zeros(3, np.float32)}})
    with pytest.raises(InputError, match=r"unexpected \['classifier/0', 'classifier/1'\]"):
        digits.with_weights({**digits.weights, "classifier": list(head.values())})
