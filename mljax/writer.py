"""Saving an MLModel: the spec and its weights, atomically."""
from __future__ import annotations

from pathlib import Path

from mljax.format.package import save_spec

__all__ = ["save_model"]


def save_model(model, path) -> Path:
    path = Path(path)
    if model.package_path is not None and path.resolve() == Path(model.package_path).resolve():
        pass  # overwriting the source: save_spec writes beside it and swaps atomically
    return save_spec(model._spec, path, weights_from=model.model_dir)
