"""Run coremltools' ``MLModel.predict`` on mljax (Linux, or anywhere JAX runs).

On Linux coremltools loads models without a Core ML engine (its ``__proxy__`` is ``None``)
and ``predict`` / ``make_state`` refuse to run.  :func:`enable` routes both to mljax::

    import coremltools as ct, mljax.coremltools
    mljax.coremltools.enable()
    model = ct.convert(program, convert_to="mlprogram")
    model.predict({"x": x})          # runs on JAX

The mljax model is built lazily from the coremltools model's spec and weights folder on
the first ``predict`` / ``make_state`` and cached on the coremltools object.
:func:`disable` restores coremltools' own methods.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from mljax.errors import InputError, PredictionError

__all__ = ["enable", "disable", "is_enabled", "mljax_model"]

_CACHE_ATTR = "_mljax_bridge_model"
_LOCK = threading.Lock()
_ORIGINAL: dict[str, Any] = {}
_OPTIONS: dict[str, Any] = {"compute_precision": None}


def _ct_classes():
    from coremltools.models import model as ct_model
    return ct_model.MLModel, ct_model.MLState


def is_enabled() -> bool:
    """Whether coremltools' ``MLModel.predict`` currently runs on mljax."""
    return bool(_ORIGINAL)


def enable(*, compute_precision: str | None = None) -> None:
    """Route ``coremltools.models.MLModel.predict`` and ``make_state`` to mljax.

    Args:
      compute_precision: passed to :class:`mljax.MLModel`: ``None``/``"auto"`` computes fp16
        programs in fp32 on the CPU (as Core ML's CPU does), ``"declared"`` in their declared
        types (exact fp16), ``"float32"`` in fp32 everywhere.
    """
    ct_mlmodel, _ = _ct_classes()
    with _LOCK:
        _OPTIONS["compute_precision"] = compute_precision
        if _ORIGINAL:
            return
        for name in ("predict", "make_state"):
            _ORIGINAL[name] = ct_mlmodel.__dict__[name]
        ct_mlmodel.predict = _predict
        ct_mlmodel.make_state = _make_state


def disable() -> None:
    """Restore coremltools' own ``predict`` and ``make_state``."""
    ct_mlmodel, _ = _ct_classes()
    with _LOCK:
        for name, fn in _ORIGINAL.items():
            setattr(ct_mlmodel, name, fn)
        _ORIGINAL.clear()


def mljax_model(ct_model):
    """The :class:`mljax.MLModel` behind a coremltools ``MLModel`` (built once, then cached)."""
    precision = _OPTIONS["compute_precision"]
    cached = ct_model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached.compute_precision == precision:
        return cached
    from mljax.model import MLModel
    weights_dir = getattr(ct_model, "weights_dir", None) or getattr(ct_model, "_weights_dir", None)
    model = MLModel(ct_model.get_spec(), weights_dir, function_name=_function_name(ct_model),
                    compute_precision=precision)
    ct_model.__dict__[_CACHE_ATTR] = model
    return model


def _function_name(ct_model) -> str | None:
    name = getattr(ct_model, "function_name", None)
    return name or None


# --- the methods installed on coremltools' MLModel ----------------------------------------
def _predict(self, data, state=None):
    """coremltools' ``MLModel.predict``, computed by mljax (see :mod:`mljax.coremltools`)."""
    if type(data) not in (list, dict):
        raise TypeError(f'"data" parameter must be either a dict or list of dict, but got {type(data)}.')
    if isinstance(data, list):
        if not all(type(d) is dict for d in data):
            raise TypeError('"data" list must contain only dictionaries')
        if state is not None:
            raise ValueError("State can only be used for unbatched predictions")
    model = mljax_model(self)
    items = data if isinstance(data, list) else [data]
    prepared = [_ct_inputs(self, model, d) for d in items]
    mj_state = None if state is None else _unwrap_state(state)
    try:
        if isinstance(data, dict):
            return _ct_outputs(model, model.predict(prepared[0], mj_state))
        return [_ct_outputs(model, out) for out in model.predict(prepared)]
    except PredictionError as e:
        # Core ML's words when a prediction fails at run time (coremltools' tests match them)
        kind = "ML Program" if _model_type(self) == "mlProgram" else "a neural network model"
        raise PredictionError(f"Unable to compute the prediction using {kind}. It can be an "
                              f"invalid input data or broken/unsupported model ({e})") from e


def _make_state(self):
    """coremltools' ``MLModel.make_state``: fresh (zero) state buffers held by mljax."""
    _, ct_state = _ct_classes()
    return ct_state(_StateProxy(mljax_model(self).make_state()))


# --- coremltools' input conventions -> mljax features --------------------------------------
def _ct_inputs(ct_model, model, data: dict) -> dict:
    """Check names the way coremltools does; tensors (torch, lists) -> NumPy; scalars -> arrays."""
    verify = getattr(ct_model, "_verify_input_dict", None)
    if verify is not None:
        verify(data)
    specs = model.input_description
    lenient = _model_type(ct_model) != "mlProgram"
    out = {}
    for name, value in data.items():
        spec = specs.get(name)
        out[name] = value if spec is None else _ct_value(spec, value, lenient)
    return out


def _model_type(ct_model) -> str | None:
    spec = getattr(ct_model, "_spec", None)
    return spec.WhichOneof("Type") if spec is not None else None


def _ct_value(spec, value, lenient_shape: bool = False):
    if spec.kind not in ("multiArray", "state"):
        return value
    if hasattr(value, "detach"):            # torch.Tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    # Core ML takes a scalar for a one-element array feature.
    if arr.ndim == 0 and spec.shape and int(np.prod(spec.shape)) == 1:
        arr = arr.reshape(spec.shape)
    elif lenient_shape and _differs_by_leading_ones(spec, arr.shape):
        # Core ML takes (1, 13) for a classic model's fixed (13,) feature (coremltools' test_io_types)
        arr = arr.reshape(spec.shape)
    return arr


def _differs_by_leading_ones(spec, shape) -> bool:
    """Whether ``shape`` is the fixed feature shape with unit dimensions added or dropped in front."""
    if spec.kind != "multiArray" or not spec.shape or spec.ranges or spec.enumerated:
        return False
    want = tuple(int(d) for d in spec.shape)
    if tuple(shape) == want:
        return False

    def strip(s):
        s = tuple(s)
        while s and s[0] == 1:
            s = s[1:]
        return s
    return strip(shape) == strip(want)


# --- mljax outputs -> coremltools' output conventions --------------------------------------
def _ct_outputs(model, out: dict) -> dict:
    """Core ML hands colour image outputs back as RGBA PIL images (alpha 255), as coremltools
    does on macOS; everything else is passed through."""
    specs = model.output_description
    for name, value in list(out.items()):
        spec = specs.get(name)
        if spec is not None and spec.kind == "image" and getattr(value, "mode", None) == "RGB":
            out[name] = value.convert("RGBA")
    return out


# --- state ---------------------------------------------------------------------------------
class _StateProxy:
    """What coremltools' ``MLState`` wraps: ``read_state`` / ``write_state`` on mljax state."""

    def __init__(self, state):
        self.state = state

    def read_state(self, name: str) -> np.ndarray:
        self._check(name)
        return np.array(self.state._values[name])

    def write_state(self, name: str, value) -> None:
        self._check(name)
        old = self.state._values[name]
        arr = np.asarray(value)
        if tuple(arr.shape) != tuple(old.shape):
            raise InputError(f"state {name!r}: expected shape {tuple(old.shape)}; found {tuple(arr.shape)}")
        import jax.numpy as jnp
        self.state._values[name] = jnp.asarray(arr, old.dtype)

    def _check(self, name: str) -> None:
        if name not in self.state._values:
            raise InputError(f"expected a state name in {sorted(self.state._values)}; found {name!r}")


def _unwrap_state(state):
    from mljax.model import MLState
    if isinstance(state, MLState):
        return state
    proxy = getattr(state, "__proxy__", None)
    if isinstance(proxy, _StateProxy):
        return proxy.state
    raise InputError("state= must come from make_state() of a coremltools MLModel while "
                     f"mljax.coremltools is enabled; found {type(state).__name__}")
