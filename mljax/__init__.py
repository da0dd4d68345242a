"""mljax: run and update Apple Core ML models anywhere JAX runs."""
from mljax.errors import (ConversionError, InputError, MLJaxError, ModelFormatError, OpError,
                          PredictionError, UnsupportedError, UnsupportedOpError, UpdateError)
from mljax.model import MLModel, MLState

__version__ = "0.1.0"
__all__ = ["MLModel", "MLState", "MLJaxError", "ModelFormatError", "UnsupportedError",
           "UnsupportedOpError", "InputError", "OpError", "PredictionError", "UpdateError",
           "ConversionError"]
