"""mljax: run and update Apple Core ML models anywhere JAX runs."""
from mljax.errors import (ConfigurationError, ConversionError, InputError, MLJaxError, ModelFormatError, OpError,
                          PredictionError, UnsupportedError, UnsupportedOpError, UpdateError)
from mljax._lazy import lazy_attributes
from mljax.cpu import default_xla_flags, retain_freed_memory, set_cpu_threads

default_xla_flags()      # XLA reads its flags when JAX starts its backend: before any model loads
del default_xla_flags

__version__ = "0.1.0"
__all__ = ["MLModel", "MLState", "MLJaxError", "ModelFormatError", "UnsupportedError",
           "UnsupportedOpError", "InputError", "OpError", "PredictionError", "UpdateError",
           "ConversionError", "ConfigurationError", "set_cpu_threads", "retain_freed_memory"]

# MLModel/MLState import JAX (2-3 s): loaded on first use, so `mljax --help`, `--version` and
# `mljax info` (mljax.cli, mljax.inspect) start without it.
__getattr__, __dir__ = lazy_attributes(__name__, globals(),
                                       {"MLModel": "mljax.model", "MLState": "mljax.model"})
del lazy_attributes
