"""One exception hierarchy for every user-facing failure in mljax.

Every message says what was expected and what was found, and names the input,
op or file concerned.
"""
from __future__ import annotations

__all__ = [
    "MLJaxError", "ModelFormatError", "UnsupportedError", "UnsupportedOpError",
    "InputError", "OpError", "PredictionError", "UpdateError", "ConversionError",
]


class MLJaxError(Exception):
    """Base class of every error mljax raises on purpose."""


class ModelFormatError(MLJaxError, ValueError):
    """A model file, package, protobuf or weight blob is missing, corrupt or inconsistent."""


class UnsupportedError(MLJaxError, NotImplementedError):
    """The model uses a feature mljax does not implement (yet)."""


class UnsupportedOpError(UnsupportedError):
    """One or more MIL ops have no implementation for the function's opset.

    ``missing`` lists ``(op_type, opset)`` pairs, each once.
    """

    def __init__(self, missing, where: str = "model"):
        self.missing = sorted(set(missing))
        listed = ", ".join(f"{op} ({opset})" for op, opset in self.missing)
        super().__init__(f"{where} uses {len(self.missing)} unsupported op(s): {listed}")


class InputError(MLJaxError, ValueError):
    """The features passed to predict/update do not match the model description."""


class OpError(MLJaxError, ValueError):
    """An op's inputs or attributes are invalid (e.g. a must-be-const input is dynamic)."""


class PredictionError(MLJaxError, RuntimeError):
    """A check inside the model failed on the given inputs while predicting (e.g. an index out
    of bounds for an op with ``validate_indices=True``)."""


class ConfigurationError(MLJaxError, RuntimeError):
    """A runtime setting that cannot take effect now (e.g. ``set_cpu_threads`` after JAX's CPU
    backend started) or is out of its domain."""


class UpdateError(MLJaxError):
    """On-device update could not run or produced an invalid result; the model is untouched."""


class ConversionError(MLJaxError):
    """A function or module could not be converted to Core ML."""
