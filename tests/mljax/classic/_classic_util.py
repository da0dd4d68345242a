"""Helpers for the classic-model tests: convert scikit-learn models with coremltools, run them on mljax."""
from __future__ import annotations

import warnings

import numpy as np

import mljax.classic  # noqa: F401  (registers the classic stage builders)
import mljax.pipeline  # noqa: F401


def convert(sk_model, *args, **kwargs):
    """``coremltools.converters.sklearn.convert`` -> an ``mljax.MLModel`` (and the coremltools spec)."""
    import coremltools as ct
    import mljax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct_model = ct.converters.sklearn.convert(sk_model, *args, **kwargs)
    return mljax.MLModel(ct_model), ct_model.get_spec()


def input_name(spec) -> str:
    return spec.description.input[0].name


def rows(spec, X) -> list[dict]:
    """One feature dict per row of ``X`` for a model with a single multiArray input."""
    name = input_name(spec)
    return [{name: np.asarray(x, np.float64)} for x in X]


def predict_rows(model, spec, X, *, batch: bool = True) -> list[dict]:
    feats = rows(spec, X)
    return model.predict(feats) if batch else [model.predict(f) for f in feats]


def assert_regression(actual, expected, rtol=1e-3, atol=1e-4):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=rtol, atol=atol)


def data(n=60, d=4, seed=0, classes=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    score = X[:, 0] + 0.5 * X[:, 1] - 0.3 * X[:, 2]
    edges = np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1])
    y = np.digitize(score, edges)
    return X, y, rng
