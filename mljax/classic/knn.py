"""``KNearestNeighborsClassifier``: brute-force k nearest neighbours (linear and kd-tree indexes alike).

Distances are squared Euclidean, computed in float64 (see ``_common``) between the stored
float32 samples and the input.  Uniform weighting counts votes; inverse-distance
weighting sums ``1 / distance`` (the squared Euclidean distance, per the Core ML spec),
and exact matches (distance 0) outvote everything else.  Ties go to the first label in
sorted order.  The probabilities are the normalized vote weights over all labels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mljax.classic._common import (check_width, class_labels, classifier_stage, feature_vector, float_dtype,
                                   matrix)
from mljax.errors import ModelFormatError, UnsupportedError
from mljax.stage import register_stage_builder

__all__ = ["build_knn_classifier"]


def _default_label(p):
    which = p.WhichOneof("DefaultClassLabel")
    if which == "defaultStringLabel":
        return p.defaultStringLabel
    if which == "defaultInt64Label":
        return int(p.defaultInt64Label)
    return None


@register_stage_builder("kNearestNeighborsClassifier")
def build_knn_classifier(spec, weights_dir=None, **_):
    """Vote among the ``numberOfNeighbors`` nearest stored samples."""
    what = "KNearestNeighborsClassifier"
    p = spec.kNearestNeighborsClassifier
    index = p.nearestNeighborsIndex
    if index.WhichOneof("DistanceFunction") not in (None, "squaredEuclideanDistance"):
        raise UnsupportedError(f"{what}: distance {index.WhichOneof('DistanceFunction')!r} is not supported")
    samples = matrix((v.vector for v in index.floatSamples), what, "samples").astype(np.float32).astype(np.float64)
    per_sample = class_labels(p, what) if p.WhichOneof("ClassLabels") else []
    if len(per_sample) != len(samples):
        raise ModelFormatError(f"{what}: expected one label per sample ({len(samples)}); found {len(per_sample)}")
    names = [fd.name for fd in spec.description.input]
    if not len(samples):
        default = _default_label(p)
        if default is None:
            raise ModelFormatError(f"{what}: the model has no samples and no default label")
        return classifier_stage(spec, lambda w, f: (jnp.int32(0), jnp.ones((1,), float_dtype())), {}, [default],
                                key=("kNearestNeighborsClassifier", "default"))
    labels = sorted(set(per_sample))
    sample_class = np.asarray([labels.index(v) for v in per_sample], np.int32)
    n_classes = len(labels)
    requested = int(p.numberOfNeighbors.defaultValue)
    if requested < 0:
        raise ModelFormatError(f"{what}: numberOfNeighbors must be a positive count (0 means 1); found {requested}")
    k = min(requested or 1, len(samples))
    inverse = p.WhichOneof("WeightingScheme") == "inverseDistanceWeighting"
    check_width(spec, samples.shape[1], what, "samples")
    weights = {"samples": samples, "sample_class": sample_class}

    def predict(w, feats):
        x = feature_vector(feats, names, w["samples"].shape[-1])
        d = jnp.sum(jnp.square(w["samples"] - x), axis=-1)
        neg, nearest = jax.lax.top_k(-d, k)
        dist = -neg
        if inverse:
            exact = dist == 0
            vote = jnp.where(jnp.any(exact), exact.astype(dist.dtype), 1.0 / jnp.where(exact, 1.0, dist))
        else:
            vote = jnp.ones((k,), dist.dtype)
        votes = jnp.zeros((n_classes,), dist.dtype).at[w["sample_class"][nearest]].add(vote)
        return jnp.argmax(votes), votes / jnp.sum(votes)

    return classifier_stage(spec, predict, weights, labels,
                            key=("kNearestNeighborsClassifier", k, inverse, n_classes, tuple(names)))
