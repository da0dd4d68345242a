"""A large list predict runs in bounded chunks with the same results as one call per input."""
import numpy as np
import pytest

import mljax

from helpers import convert_mil

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

W = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)


@mb.program(input_specs=[mb.TensorSpec(shape=(3,), dtype=types.fp32)], opset_version=ct.target.iOS17)
def _prog(x):
    return mb.tanh(x=mb.matmul(x=x, y=W), name="y")


@pytest.fixture(scope="module")
def model():
    return mljax.MLModel(convert_mil(_prog))


def _spy(model):
    sizes, fn = [], model._batched_fn

    def call(weights, stacked, states):
        sizes.append(len(next(iter(stacked.values()))))
        return fn(weights, stacked, states)
    model._batched_fn = call
    return sizes


def test_twenty_thousand_inputs_run_in_chunks(model):
    xs = np.random.default_rng(0).normal(size=(20_000, 3)).astype(np.float32)
    sizes = _spy(model)
    outs = model.predict([{"x": x} for x in xs])
    assert sizes == [1024] * 20   # 19 full chunks and one padded one: one compiled size
    got = np.stack([o["y"] for o in outs])
    assert got.shape == (20_000, 4)
    np.testing.assert_allclose(got, np.tanh(xs @ W), rtol=1e-5, atol=1e-6)


def test_chunks_equal_single_predicts(model, monkeypatch):
    monkeypatch.setattr(type(model), "BATCH_CHUNK", 7)
    xs = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    sizes = _spy(model)
    outs = model.predict([{"x": x} for x in xs])
    assert sizes == [7, 7, 7]
    for x, o in zip(xs, outs):
        np.testing.assert_array_equal(o["y"], model.predict({"x": x})["y"])


def test_large_list_predicts_show_progress(model, monkeypatch, capsys):
    """Above PROGRESS_ABOVE samples a tqdm bar counts them (below it, nothing is printed)."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(type(model), "BATCH_CHUNK", 8)
    monkeypatch.setattr(type(model), "PROGRESS_ABOVE", 20)
    xs = np.random.default_rng(2).normal(size=(30, 3)).astype(np.float32)
    model.predict([{"x": x} for x in xs[:20]])
    assert "mljax predict" not in capsys.readouterr().err
    outs = model.predict([{"x": x} for x in xs])
    err = capsys.readouterr().err
    assert "mljax predict" in err and "8/30" in err and "16/30" in err   # one update a chunk of 8
    np.testing.assert_allclose(np.stack([o["y"] for o in outs]), np.tanh(xs @ W), rtol=1e-5, atol=1e-6)
