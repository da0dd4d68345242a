"""MLModel: what a call needs beyond its inputs -- fresh random values per prediction for
``seed=-1`` random ops, and run-time ``validate_indices`` checks raised after the call."""
from __future__ import annotations

import numpy as np
import pytest
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types

import mljax
from mljax.errors import PredictionError
from tests.helpers import convert_mil, target

N = 4000


def _random_model(seed: int, batch_input: bool = False):
    @mb.program(input_specs=[mb.TensorSpec((1,), types.fp32)], opset_version=target("iOS17"))
    def prog(x):
        u = mb.random_uniform(shape=np.array([N], np.int32), low=-1.0, high=3.0, seed=seed)
        n = mb.random_normal(shape=np.array([N], np.int32), mean=2.0, stddev=0.5, seed=seed)
        u2 = mb.random_uniform(shape=np.array([N], np.int32), low=-1.0, high=3.0, seed=seed)
        return mb.add(x=u, y=x, name="u"), mb.add(x=n, y=x, name="n"), mb.add(x=u2, y=x, name="u2")
    return mljax.MLModel(convert_mil(prog))


def test_seed_minus_one_draws_fresh_values_per_predict():
    model = _random_model(-1)
    x = {"x": np.zeros(1, np.float32)}
    a, b = model.predict(x), model.predict(x)
    assert not np.array_equal(a["u"], b["u"]) and not np.array_equal(a["n"], b["n"])
    # still one compiled function: the key is an argument, not a retrace per call
    assert model.stage.lowered.trace_count <= 1   # 0 when served from mljax.cache
    # and the distributions hold
    u, n = np.concatenate([a["u"], b["u"]]), np.concatenate([a["n"], b["n"]])
    assert u.min() >= -1.0 and u.max() < 3.0
    assert abs(u.mean() - 1.0) < 5 * 4 / np.sqrt(12 * 2 * N)
    assert abs(n.mean() - 2.0) < 5 * 0.5 / np.sqrt(2 * N) and abs(n.std() / 0.5 - 1) < 0.05
    # two identical ops in one call draw different values
    assert not np.array_equal(a["u"], a["u2"])


def test_seed_minus_one_batch_items_differ():
    model = _random_model(-1)
    outs = model.predict([{"x": np.zeros(1, np.float32)}, {"x": np.zeros(1, np.float32)}])
    assert not np.array_equal(outs[0]["u"], outs[1]["u"])


def test_fixed_seed_repeats():
    model = _random_model(7)
    x = {"x": np.ones(1, np.float32)}
    a, b = model.predict(x), model.predict(x)
    np.testing.assert_array_equal(a["u"], b["u"])
    np.testing.assert_array_equal(a["n"], b["n"])
    np.testing.assert_array_equal(a["u"], a["u2"])   # same seed, same op kind: same values
    again = _random_model(7).predict(x)       # a fresh load gives the same values too
    np.testing.assert_array_equal(a["u"], again["u"])
    assert not model.stage.call_key


def _scatter_model(op: str):
    specs = [mb.TensorSpec((2, 3), types.fp32), mb.TensorSpec((2, 3), types.fp32)]
    shapes = {"scatter": (2,), "scatter_nd": (2, 2), "gather": (2,), "gather_along_axis": (2, 3)}
    specs.append(mb.TensorSpec(shapes[op], types.int32))

    @mb.program(input_specs=specs, opset_version=target("iOS17"))
    def prog(data, updates, indices):
        if op == "scatter":
            return mb.scatter(data=data, indices=indices, updates=updates, mode="add",
                              validate_indices=True, name="out")
        if op == "scatter_nd":
            return mb.scatter_nd(data=data, indices=indices, updates=mb.slice_by_index(
                x=updates, begin=[0, 0], end=[2, 1], squeeze_mask=[False, True]),
                validate_indices=True, name="out")
        if op == "gather":
            return mb.add(x=mb.gather(x=data, indices=indices, axis=0, validate_indices=True),
                          y=updates, name="out")
        return mb.add(x=mb.gather_along_axis(x=data, indices=indices, axis=0,
                                             validate_indices=True), y=updates, name="out")
    return mljax.MLModel(convert_mil(prog))


_GOOD = {"scatter": [1, 0], "scatter_nd": [[1, 0], [0, 2]], "gather": [1, 0],
         "gather_along_axis": [[1, 0, 1], [0, 0, 1]]}
_BAD = {"scatter": [-1, 0], "scatter_nd": [[1, 0], [0, 3]], "gather": [2, 0],
        "gather_along_axis": [[1, 0, 1], [0, 5, 1]]}


def _reference(op, data, updates, idx):
    if op == "scatter":
        out = data.copy()
        np.add.at(out, idx, updates)
        return out
    if op == "scatter_nd":
        out = data.copy()
        np.add.at(out, tuple(idx.T), updates[:, 0])
        return out
    if op == "gather":
        return data[idx] + updates
    return np.take_along_axis(data, idx, axis=0) + updates


@pytest.mark.parametrize("op", sorted(_GOOD))
def test_validate_indices_of_model_inputs(op):
    model = _scatter_model(op)
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    updates = np.arange(10, 16, dtype=np.float32).reshape(2, 3)
    good = np.array(_GOOD[op], np.int32)
    out = model.predict({"data": data, "updates": updates, "indices": good})["out"]
    np.testing.assert_allclose(out, _reference(op, data, updates, good))
    with pytest.raises(PredictionError, match="validate_indices=True expects indices"):
        model.predict({"data": data, "updates": updates, "indices": np.array(_BAD[op], np.int32)})
    # a batch with one bad item fails as a whole; valid calls still work afterwards
    items = [{"data": data, "updates": updates, "indices": good},
             {"data": data, "updates": updates, "indices": np.array(_BAD[op], np.int32)}]
    with pytest.raises(PredictionError):
        model.predict(items)
    np.testing.assert_allclose(model.predict(items[0])["out"], out)


def test_coremltools_bridge_words_failed_predictions_like_core_ml():
    import coremltools as ct

    import mljax.coremltools as bridge

    @mb.program(input_specs=[mb.TensorSpec((2, 3), types.fp32), mb.TensorSpec((2,), types.int32)],
                opset_version=target("iOS17"))
    def prog(data, indices):
        return mb.scatter(data=data, indices=indices, updates=data, validate_indices=True)

    was_enabled = bridge.is_enabled()
    bridge.enable()
    try:
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target("iOS17"))
        data = np.ones((2, 3), np.float32)
        with pytest.raises(RuntimeError, match="Unable to compute the prediction using ML Program"):
            model.predict({"data": data, "indices": np.array([10, 0], np.int32)})
    finally:
        if not was_enabled:
            bridge.disable()
