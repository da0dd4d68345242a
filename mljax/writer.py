"""Saving an MLModel: the spec and its weights, atomically."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from mljax.errors import UnsupportedError
from mljax.format.package import save_spec

__all__ = ["save_model"]


def save_model(model, path) -> Path:
    path = Path(path)
    kind = model._spec.WhichOneof("Type")
    if kind != "mlProgram" and _weights_replaced(model):
        # the spec still holds the old values: writing it would silently drop the new ones
        raise UnsupportedError(
            f"this {kind} model's weights were replaced (MLModel.with_weights without spec=, or "
            "updatable.Pipeline), and mljax writes new weight values back only into ML programs; pass "
            "with_weights(..., spec=) a spec holding them, save the trained ML-program stage on its own, "
            "or update a NeuralNetwork with updatable.UpdateTask (its updated model saves)")
    # Overwriting the source is safe: both writers stage beside the target and swap atomically.
    changed = _replaced_program_weights(model)
    if changed is not None:
        from mljax.mil.to_proto import write_mlprogram_package
        stage = model._stage
        return write_mlprogram_package(model._spec, stage.program, path, weights=changed,
                                       function_name=stage.function)
    return save_spec(model._spec, path, weights_from=model.model_dir)


def _weights_replaced(model) -> bool:
    """The model's weights differ from the ones its spec holds (``_loaded_weights``: the file's, or
    those of the spec ``with_weights(spec=)`` gave)."""
    if model._weights is model._loaded_weights:
        return False
    current = jax.tree_util.tree_leaves(model._weights)
    original = jax.tree_util.tree_leaves(model._loaded_weights)
    return len(current) != len(original) or not all(_same(a, b) for a, b in zip(current, original))


def _replaced_program_weights(model) -> dict | None:
    """An ML program's current weights (NumPy, by var name) when they differ from the file's."""
    if model._spec.WhichOneof("Type") != "mlProgram" or model._stage.program is None:
        return None
    original, current = model._stage.weights, model._weights
    if not isinstance(current, dict) or current is original:
        return None
    if current.keys() == original.keys() and all(
            _same(current[k], original[k]) for k in current):
        return None
    return {k: np.asarray(jax.device_get(v)) for k, v in current.items()}


def _same(a, b) -> bool:
    a, b = np.asarray(jax.device_get(a)), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
