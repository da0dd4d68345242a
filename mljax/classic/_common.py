"""Shared pieces of the classic (non-neural) model stages.

Precision: Core ML evaluates GLMs, SVMs, tree ensembles and their featurizers in double
precision, so these stages compute in float64: their weights are float64 NumPy arrays and
their stages set ``Stage.x64``, which makes ``MLModel`` put the weights and run the jitted
function under ``jax.enable_x64`` (a scoped, thread-local setting; ML programs and neural
networks, and JAX code elsewhere, are unaffected).  The functions read the float type at
trace time (:func:`float_dtype`), so inside a pipeline that also holds a neural network
(which runs without x64) they compute in float32 instead.  Host NumPy evaluation would have
given float64 too, but stages must stay JAX functions to compose with neural-network stages
in one jitted pipeline and to batch a list of dicts as one vectorized call.

Compile once per structure: every stage function is determined by a hashable key (its
configuration; weights are arguments) and shared between models through
:func:`mljax.stage.shared_fn`, so models of the same structure and weight shapes (tree
tables are padded to powers of two) reuse JAX's traces and compiled code.

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
from mljax.stage import ClassLabels, Stage, shared_fn

__all__ = ["matrix", "check_width", "class_labels", "feature_vector", "float_dtype", "input_width", "probit", "classifier_stage",
           "regressor_stage", "classic_stage", "dense_dict_input", "dict_output"]


def matrix(rows, what: str, name: str) -> np.ndarray:
    """A float64 matrix from a model's repeated vectors, which must all have the same length."""
    rows = [list(r) for r in rows]
    lengths = sorted({len(r) for r in rows})
    if len(lengths) > 1:
        raise ModelFormatError(f"{what}: expected {name} of one length; found lengths {lengths[:10]}")
    return np.asarray(rows, np.float64).reshape(len(rows), lengths[0] if lengths else 0)


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


def check_width(spec, width: int, what: str, name: str) -> None:
    """The model's inputs, concatenated, are ``width`` numbers long (checked when every input
    declares its size)."""
    declared = input_width(feature_specs(spec.description.input))
    if declared is not None and declared != width:
        raise ModelFormatError(f"{what}: its {name} take {width} input values; the model's inputs "
                               f"describe {declared}")


def float_dtype():
    """The float type classic stages compute in: float64 under ``jax.enable_x64``, else float32."""
    return jax.dtypes.canonicalize_dtype(np.float64)


def feature_vector(inputs: dict, names, width: int | None = None) -> jax.Array:
    """Inputs in description order, flattened and concatenated into one float vector of
    ``width`` values (checked when given: a pipeline's earlier stage may produce another size,
    which broadcasting or a matrix product would otherwise hide or fail on)."""
    parts = [jnp.ravel(jnp.asarray(inputs[n])).astype(float_dtype()) for n in names]
    if not parts:
        raise ModelFormatError("the model describes no input features; expected at least one")
    vec = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    if width is not None and vec.shape[0] != width:
        raise InputError(f"inputs {list(names)}: expected {width} values in all (what the model's parameters "
                         f"take); found {vec.shape[0]}")
    return vec


def probit(z):
    """The standard normal CDF."""
    return 0.5 * jax.lax.erfc(-z / jnp.sqrt(jnp.asarray(2.0, z.dtype)))


def dense_dict_input(value, size: int, name: str, key_index: dict | None = None) -> np.ndarray:
    """A user dictionary ``{key: number}`` as a dense float vector (arrays pass through)."""
    if not isinstance(value, dict):
        try:
            arr = np.asarray(value, np.float64)
        except (ValueError, TypeError) as e:
            raise InputError(f"input {name!r}: expected a dict or a vector of {size} numbers; found "
                             f"{type(value).__name__} ({e})") from None
        if arr.shape != (size,):
            raise InputError(f"input {name!r}: expected a dict or a vector of length {size}; "
                             f"found shape {arr.shape}")
        return arr
    out = np.zeros(size, np.float64)
    for k, v in value.items():
        idx = key_index.get(k) if key_index is not None else (int(k) if _is_int(k) else None)
        if idx is None or not 0 <= idx < size:
            continue  # keys outside the index mapping contribute nothing
        try:
            out[idx] = float(v)
        except (ValueError, TypeError):
            raise InputError(f"input {name!r}: expected a number for key {k!r}; found {type(v).__name__}") from None
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


def classic_stage(key, make_fn: Callable, **fields) -> Stage:
    """A float64 (``x64``) stage whose function ``make_fn()`` is shared by every stage with ``key``.

    ``key`` must hold everything the function closes over (weights are arguments).
    """
    return Stage(fn=shared_fn(key, make_fn), x64=True, fn_key=key, **fields)


def classifier_stage(spec, predict: Callable, weights: dict, labels: list, *, key, batchable=True,
                     preprocess=None) -> Stage:
    """A classifier stage from ``predict(weights, inputs) -> (label_index, probabilities)``.

    ``labels`` are the class labels in probability order; the stage's outputs are the
    description's ``predictedFeatureName`` (the label) and ``predictedProbabilitiesName``
    (a ``{label: probability}`` dict after ``postprocess``).  ``key``: everything ``predict``
    closes over (see :func:`classic_stage`).
    """
    desc = spec.description
    inputs, outputs = feature_specs(desc.input), feature_specs(desc.output)
    label_name = desc.predictedFeatureName or next(
        (n for n, s in outputs.items() if s.kind in ("int64", "string")), None)
    prob_name = desc.predictedProbabilitiesName or next(
        (n for n, s in outputs.items() if s.kind == "dictionary"), None)
    to_value, to_user = _label_output_fn(labels)
    with_probs = bool(prob_name) and prob_name in outputs

    def make_fn():
        def fn(w, feats, states):
            idx, probs = predict(w, feats)
            out = {}
            if label_name:
                out[label_name] = to_value(idx)
            if with_probs:
                out[prob_name] = probs
            return out, states
        return fn

    def postprocess(values: dict) -> dict:
        values = dict(values)
        if label_name in values:
            values[label_name] = to_user(np.asarray(values[label_name]).reshape(-1)[0])
        if prob_name in values and outputs[prob_name].kind == "dictionary":
            p = np.asarray(values[prob_name], np.float64).reshape(-1)
            if p.size != len(labels):
                raise ModelFormatError(f"classifier output {prob_name!r}: {p.size} probabilities for "
                                       f"{len(labels)} class labels; expected one per label")
            values[prob_name] = {lab: float(p[i]) for i, lab in enumerate(labels)}
        return values

    fn_key = ("classifier", key, label_name, prob_name, with_probs, _labels_key(labels))
    return classic_stage(fn_key, make_fn, weights=weights, inputs=inputs, outputs=outputs,
                         preprocess=preprocess, postprocess=postprocess, batchable=batchable,
                         classes=ClassLabels(labels, label_name, prob_name))


def _labels_key(labels: list) -> tuple:
    """What the label output function depends on: the int label values, or only their count."""
    if all(isinstance(v, int) for v in labels):
        return ("int", tuple(labels))
    return ("index", len(labels))


def regressor_stage(spec, predict: Callable, weights: dict, *, key) -> Stage:
    """A regressor stage from ``predict(weights, inputs) -> vector``; a ``double`` output takes element 0."""
    desc = spec.description
    inputs, outputs = feature_specs(desc.input), feature_specs(desc.output)
    if not outputs:
        raise ModelFormatError("the regressor describes no outputs; expected one")
    name = desc.predictedFeatureName or next(iter(outputs))
    kind = outputs[name].kind if name in outputs else "multiArray"

    def make_fn():
        def fn(w, feats, states):
            y = predict(w, feats)
            return {name: y[0] if kind == "double" else y}, states
        return fn

    return classic_stage(("regressor", key, name, kind), make_fn, weights=weights, inputs=inputs,
                         outputs=outputs)
