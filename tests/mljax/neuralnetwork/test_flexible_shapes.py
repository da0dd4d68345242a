"""Flexible-shape NeuralNetwork models (ct.RangeDim / ct.EnumeratedShapes inputs, converted by
coremltools with convert_to="neuralnetwork") run at each allowed shape, checked against torch."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

import mljax  # noqa: E402

RNG = np.random.default_rng(0)


class _Einsum(torch.nn.Module):
    def forward(self, a, b):
        return torch.einsum("bij,bjk->bik", a, b)


class _EinsumOuter(torch.nn.Module):
    def forward(self, a, b):
        return torch.einsum("abc,cde->abde", a, b)


class _Meshgrid(torch.nn.Module):
    def forward(self, x, y):
        gx, gy = torch.meshgrid(x, y, indexing="ij")
        return gx * 10 + gy


class _FlattenDense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        return torch.relu(self.fc(x.reshape(x.shape[0], -1))).sum(dim=1, keepdim=True) / x.shape[0]


def _convert(model, examples, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), tuple(torch.from_numpy(v) for v in examples))
        spec = ct.convert(traced, inputs=inputs, convert_to="neuralnetwork").get_spec()
    assert spec.WhichOneof("Type") == "neuralNetwork"
    return mljax.MLModel(spec)


def _check(model, m, feeds):
    for feed in feeds:
        want = model(*(torch.from_numpy(v) for v in feed.values())).detach().numpy()
        (got,) = m.predict(feed).values()
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def _r(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def test_einsum_with_range_dims():
    a, b = _r(2, 3, 4), _r(2, 4, 5)
    dim = ct.RangeDim(1, 8)
    m = _convert(_Einsum(), (a, b), [ct.TensorType(name="a", shape=(dim, 3, 4)),
                                     ct.TensorType(name="b", shape=(dim, 4, 5))])
    _check(_Einsum(), m, [{"a": a, "b": b}, {"a": _r(5, 3, 4), "b": _r(5, 4, 5)}])


def test_einsum_with_every_dim_flexible():
    """getShape -> squeezing slices -> concatND shape arithmetic (it used to concatenate rank-0 blobs)."""
    a, b = _r(2, 3, 4), _r(4, 2, 5)
    rd = lambda: ct.RangeDim(1, 6)  # noqa: E731
    m = _convert(_EinsumOuter(), (a, b), [ct.TensorType(name="a", shape=(rd(), rd(), rd())),
                                          ct.TensorType(name="b", shape=(rd(), rd(), rd()))])
    _check(_EinsumOuter(), m, [{"a": a, "b": b}, {"a": _r(1, 5, 3), "b": _r(3, 1, 2)}])


def test_einsum_with_enumerated_shapes():
    a, b = _r(2, 3, 4), _r(2, 4, 5)
    m = _convert(_Einsum(), (a, b),
                 [ct.TensorType(name="a", shape=ct.EnumeratedShapes([(2, 3, 4), (1, 3, 4)])),
                  ct.TensorType(name="b", shape=ct.EnumeratedShapes([(2, 4, 5), (1, 4, 5)]))])
    _check(_Einsum(), m, [{"a": a, "b": b}, {"a": a[:1], "b": b[:1]}])


def test_meshgrid_with_range_dims():
    x, y = _r(3), _r(4)
    m = _convert(_Meshgrid(), (x, y), [ct.TensorType(name="x", shape=(ct.RangeDim(1, 10),)),
                                       ct.TensorType(name="y", shape=(ct.RangeDim(1, 10),))])
    _check(_Meshgrid(), m, [{"x": x, "y": y}, {"x": _r(7), "y": _r(1)}, {"x": _r(1), "y": _r(2)}])


def test_shape_arithmetic_with_a_flexible_batch():
    x = _r(2, 2, 3)
    model = _FlattenDense()
    m = _convert(model, (x,), [ct.TensorType(name="x", shape=(ct.RangeDim(1, 16), 2, 3))])
    _check(model, m, [{"x": x}, {"x": _r(1, 2, 3)}, {"x": _r(9, 2, 3)}])
