"""Shared pieces of the classic (non-neural) model stages.

Conventions inside the jitted functions (so stages compose in pipelines):
- ``double``/``int64`` features are 0-d arrays, ``multiArray`` features arrays;
- a ``dictionary`` feature with int64 keys is a dense float vector indexed by key;
- a predicted class label is the int64 label value itself, or, for string labels, the
  index of the label in the model's label list (``postprocess`` maps it to the string);
- class probabilities are a dense vector in label order (``postprocess`` makes the dict).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mljax.errors import InputError, ModelFormatError
from mljax.features import FeatureSpec, feature_specs
from mljax.stage import Stage

__all__ = ["class_labels", "feature_vector", "input_width", "probit", "classifier_stage",
           "regressor_stage", "dense_dict_input", "dict_output"]


def class_labels(params, what: str) -> list:
    """The ``ClassLabels`` oneof of a classifier message as a Python list (ints or strings)."""
    which = params.WhichOneof("ClassLabels")
    if which == "stringClassLabels":
        return list(params.stringClassLabels.vector)
    if which == "int64ClassLabels":
        return [int(v) for v in params.int64ClassLabels.vector]
    raise ModelFormatError(f"{what}: expected stringClassLabels or int64ClassLabels; found neither")


def input_width(specs: dict[str, FeatureSpec]) -> int | None:
    """Length of the concatenated input vector, when every input's size is declared."""
    total = 0
    for s in specs.values():
        if s.kind in ("double", "int64"):
            total += 1
        elif s.kind == "multiArray" and s.shape:
            total += int(np.prod(s.shape))
        else:
            return None
    return total


def feature_vector(inputs: dict, names) -> jax.Array:
    """Inputs in description order, flattened and concatenated into one float32 vector."""
    parts = [jnp.ravel(jnp.asarray(inputs[n])).astype(jnp.float32) for n in names]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def probit(z):
    """The standard normal CDF."""
    return 0.5 * jax.lax.erfc(-z / jnp.sqrt(jnp.asarray(2.0, z.dtype)))


def dense_dict_input(value, size: int, name: str, key_index: dict | None = None) -> np.ndarray:
    """A user dictionary ``{key: number}`` as a dense float vector (arrays pass through)."""
    if not isinstance(value, dict):
        arr = np.asarray(value, np.float64)
        if arr.shape != (size,):
            raise InputError(f"input {name!r}: expected a dict or a vector of length {size}; "
                             f"found shape {arr.shape}")
        return arr
    out = np.zeros(size, np.float64)
    for k, v in value.items():
        idx = key_index.get(k) if key_index is not None else (int(k) if _is_int(k) else None)
        if idx is None or not 0 <= idx < size:
            continue  # keys outside the index mapping contribute nothing
        out[idx] = float(v)
    return out


def dict_output(vec, keys=None) -> dict:
    """A dense vector as the ``{key: value}`` dict of its non-zero entries (keys default to indices)."""
    vec = np.asarray(vec, np.float64).reshape(-1)
    return {(int(i) if keys is None else keys[i]): float(v) for i, v in enumerate(vec) if v != 0.0}


def _is_int(k) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, bool)


def _label_output_fn(labels: list):
    if all(isinstance(v, int) for v in labels):
        values = np.asarray(labels, np.int64)
        if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
            return lambda idx: idx, lambda v: labels[int(v)]      # too wide for int32: carry the index
        table = jnp.asarray(values.astype(np.int32))
        return lambda idx: table[idx], lambda v: int(v)
    return lambda idx: idx.astype(jnp.int32), lambda v: labels[int(v)]


def classifier_stage(spec, predict: Callable, weights: dict, labels: list, *, batchable=True,
                     preprocess=None, info=None) -> Stage:
    """A classifier stage from ``predict(weights, inputs) -> (label_index, probabilities)``.

    ``labels`` are the class labels in probability order; the stage's outputs are the
    description's ``predictedFeatureName`` (the label) and ``predictedProbabilitiesName``
    (a ``{label: probability}`` dict after ``postprocess``).
    """
    desc = spec.description
    inputs, outputs = feature_specs(desc.input), feature_specs(desc.output)
    label_name = desc.predictedFeatureName or next(
        (n for n, s in outputs.items() if s.kind in ("int64", "string")), None)
    prob_name = desc.predictedProbabilitiesName or next(
        (n for n, s in outputs.items() if s.kind == "dictionary"), None)
    to_value, to_user = _label_output_fn(labels)

    def fn(w, feats, states):
        idx, probs = predict(w, feats)
        out = {}
        if label_name:
            out[label_name] = to_value(idx)
        if prob_name and prob_name in outputs:
            out[prob_name] = probs
        return out, states

    def postprocess(values: dict) -> dict:
        values = dict(values)
        if label_name in values:
            values[label_name] = to_user(np.asarray(values[label_name]).reshape(-1)[0])
        if prob_name in values and outputs[prob_name].kind == "dictionary":
            p = np.asarray(values[prob_name], np.float64).reshape(-1)
            values[prob_name] = {lab: float(p[i]) for i, lab in enumerate(labels)}
        return values

    return Stage(fn=fn, weights=weights, inputs=inputs, outputs=outputs, preprocess=preprocess,
                 postprocess=postprocess, batchable=batchable,
                 info=dict(info or {}, class_labels=labels, label_name=label_name, prob_name=prob_name))


def regressor_stage(spec, predict: Callable, weights: dict, *, info=None) -> Stage:
    """A regressor stage from ``predict(weights, inputs) -> vector``; a ``double`` output takes element 0."""
    desc = spec.description
    inputs, outputs = feature_specs(desc.input), feature_specs(desc.output)
    name = desc.predictedFeatureName or next(iter(outputs))
    kind = outputs[name].kind if name in outputs else "multiArray"

    def fn(w, feats, states):
        y = predict(w, feats)
        return {name: y[0] if kind == "double" else y}, states

    return Stage(fn=fn, weights=weights, inputs=inputs, outputs=outputs, info=dict(info or {}))
