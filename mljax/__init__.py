"""mljax: run and update Apple Core ML models anywhere JAX runs."""
from mljax.errors import (ConversionError, InputError, MLJaxError, ModelFormatError, OpError,
                          PredictionError, UnsupportedError, UnsupportedOpError, UpdateError)

__version__ = "0.1.0"
__all__ = ["MLModel", "MLState", "MLJaxError", "ModelFormatError", "UnsupportedError",
           "UnsupportedOpError", "InputError", "OpError", "PredictionError", "UpdateError",
           "ConversionError"]

# MLModel/MLState import JAX (2-3 s): loaded on first use, so `mljax --help`, `--version` and
# `mljax info` (mljax.cli, mljax.inspect) start without it.
_LAZY = {"MLModel": "mljax.model", "MLState": "mljax.model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mljax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
