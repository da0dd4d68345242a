"""Generalized linear models: ``GLMRegressor`` and ``GLMClassifier`` (float64, see ``_common``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mljax.classic._common import (check_width, class_labels, classifier_stage, feature_vector, matrix, probit,
                                   regressor_stage)
from mljax.errors import ModelFormatError, UnsupportedError
from mljax.stage import register_stage_builder

__all__ = ["build_glm_regressor", "build_glm_classifier"]


def _weights_of(spec, params, what: str) -> dict:
    w = matrix((r.value for r in params.weights), what, "weight rows")
    if w.size == 0:
        raise ModelFormatError(f"{what}: expected a non-empty weights matrix (rows of equal length)")
    b = np.asarray(params.offset, np.float64)
    if b.size == 0:
        b = np.zeros(w.shape[0], np.float64)
    if b.shape != (w.shape[0],):
        raise ModelFormatError(f"{what}: expected {w.shape[0]} offsets (one per weight row); found {b.size}")
    check_width(spec, w.shape[1], what, "weight rows")
    return {"weight": w, "offset": b}


@register_stage_builder("glmRegressor")
def build_glm_regressor(spec, weights_dir=None, **_):
    """``y = f(W x + b)`` with ``f`` the post-evaluation transform (none, logit, probit)."""
    params = spec.glmRegressor
    weights = _weights_of(spec, params, "GLMRegressor")
    which = params.postEvaluationTransform
    transform = {0: lambda z: z, 1: jax.nn.sigmoid, 2: probit}.get(which)
    if transform is None:
        raise UnsupportedError(f"GLMRegressor: unknown postEvaluationTransform {params.postEvaluationTransform}")
    names = [fd.name for fd in spec.description.input]

    def predict(w, feats):
        x = feature_vector(feats, names, w["weight"].shape[1])
        return transform(w["weight"] @ x + w["offset"])

    return regressor_stage(spec, predict, weights, key=("glmRegressor", which, tuple(names)))


def _glm_probabilities(z, n_classes: int, probit_transform: bool, reference: bool):
    """Class probabilities from linear scores ``z`` (one per weight row)."""
    f = probit if probit_transform else jax.nn.sigmoid
    if z.shape[0] == 1 and n_classes == 2:
        p1 = f(z[0])                          # one row: the score of the second class
        return jnp.stack([1.0 - p1, p1])
    if reference and z.shape[0] == n_classes - 1:
        if probit_transform:
            raise UnsupportedError("GLMClassifier: probit supports only binary classification")
        return jax.nn.softmax(jnp.concatenate([jnp.zeros((1,), z.dtype), z]))  # class 0 scores 0
    p = f(z)                                  # one-vs-rest: per-class scores, normalized to sum 1
    return p / jnp.sum(p)


@register_stage_builder("glmClassifier")
def build_glm_classifier(spec, weights_dir=None, **_):
    """Logit/probit scores per class; ``ReferenceClass`` or ``OneVsRest`` class encoding."""
    params = spec.glmClassifier
    weights = _weights_of(spec, params, "GLMClassifier")
    labels = class_labels(params, "GLMClassifier")
    rows, k = weights["weight"].shape[0], len(labels)
    if not (rows == k or rows == k - 1):
        raise ModelFormatError(f"GLMClassifier: expected {k} or {k - 1} weight rows for {k} classes; "
                               f"found {rows}")
    is_probit = params.postEvaluationTransform == 1
    reference = params.classEncoding == 0
    names = [fd.name for fd in spec.description.input]
    if is_probit and reference and rows == k - 1 and k > 2:
        raise UnsupportedError("GLMClassifier: probit with ReferenceClass supports only binary classification")

    def predict(w, feats):
        z = w["weight"] @ feature_vector(feats, names, w["weight"].shape[1]) + w["offset"]
        probs = _glm_probabilities(z, k, is_probit, reference)
        return jnp.argmax(probs), probs

    return classifier_stage(spec, predict, weights, labels,
                            key=("glmClassifier", k, is_probit, reference, tuple(names)))
