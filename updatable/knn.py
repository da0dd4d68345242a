"""Updating k-nearest-neighbors classifiers: Core ML adds the new samples to the index."""
from __future__ import annotations

import numpy as np

from mljax.errors import UpdateError
from mljax.model import MLModel
from mljax.pipeline import pipeline_of

__all__ = ["is_knn", "update_knn"]

_PIPES = ("pipeline", "pipelineClassifier", "pipelineRegressor")


def _knn_node(spec):
    kind = spec.WhichOneof("Type")
    if kind == "kNearestNeighborsClassifier":
        return spec
    if kind in _PIPES:
        models = pipeline_of(spec).models
        return _knn_node(models[len(models) - 1]) if len(models) else None
    return None


def is_knn(spec) -> bool:
    return _knn_node(spec) is not None


def update_knn(model: MLModel, training_data, *, parameters: dict | None = None) -> MLModel:
    """A new model whose index holds the old samples plus ``training_data``'s.

    The training inputs are the model's feature input and its predicted label; only
    ``number_of_neighbors`` may be overridden (Core ML's numberOfNeighbors parameter).
    """
    spec = model.get_spec()
    if not spec.isUpdatable:
        raise UpdateError("the model is not marked updatable (Model.isUpdatable is false)")
    node = _knn_node(spec)
    knn = node.kNearestNeighborsClassifier
    desc = spec.description
    label_name = desc.predictedFeatureName or node.description.predictedFeatureName
    names = [f.name for f in desc.trainingInput] or [desc.input[0].name, label_name]
    feature_names = [n for n in names if n != label_name]
    if len(feature_names) != 1:
        raise UpdateError(f"expected one feature input besides the label {label_name!r}; found {feature_names}")
    items = training_data if isinstance(training_data, (list, tuple)) else [
        dict(zip(training_data, vals)) for vals in zip(*training_data.values())]
    dims = knn.nearestNeighborsIndex.numberOfDimensions
    rows, labels = [], []
    for i, item in enumerate(items):
        missing = [n for n in (*feature_names, label_name) if n not in item]
        if missing:
            raise UpdateError(f"training sample {i} lacks training inputs {missing}")
        x = np.asarray(item[feature_names[0]], np.float32).reshape(-1)
        if x.size != dims:
            raise UpdateError(f"training sample {i}: expected {dims} features; found {x.size}")
        rows.append(x)
        labels.append(item[label_name])
    if not rows:
        raise UpdateError("training data is empty")
    # -- all checks passed: build the new spec --
    for x in rows:
        knn.nearestNeighborsIndex.floatSamples.add().vector.extend(x.tolist())
    which = knn.WhichOneof("ClassLabels")
    if which == "int64ClassLabels" or (which is None and isinstance(labels[0], (int, np.integer))):
        knn.int64ClassLabels.vector.extend(int(v) for v in labels)
    else:
        knn.stringClassLabels.vector.extend(str(v) for v in labels)
    if parameters:
        unknown = set(parameters) - {"number_of_neighbors"}
        if unknown:
            raise UpdateError(f"a k-NN update takes only number_of_neighbors; found {sorted(unknown)}")
        k = int(parameters["number_of_neighbors"])
        p = knn.numberOfNeighbors
        lo, hi = (p.range.minValue, p.range.maxValue) if p.WhichOneof("AllowedValues") == "range" else (1, None)
        allowed = list(p.set.values) if p.WhichOneof("AllowedValues") == "set" else None
        if (allowed and k not in allowed) or k < lo or (hi and k > hi):
            raise UpdateError(f"number_of_neighbors {k} is outside what the model allows")
        p.defaultValue = k
    return MLModel(spec, weights_dir=model.weights_dir)
