"""Model descriptions: feature types, and checking/converting user features against them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mljax.errors import InputError, ModelFormatError

__all__ = ["FeatureSpec", "feature_specs", "convert_inputs", "convert_output"]

_ARRAY_DTYPES = {65568: np.float32, 65600: np.float64, 131104: np.int32, 131080: np.int8,
                 65552: np.float16}
_COLOR = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}


@dataclass(frozen=True)
class FeatureSpec:
    """One input/output/state feature of a model description."""

    name: str
    kind: str                    # multiArray, image, int64, double, string, dictionary, sequence, state
    dtype: Any = None            # NumPy dtype of array-like features
    shape: tuple | None = None   # default shape (image: (H, W))
    ranges: tuple | None = None  # ((lo, hi), ...) per dim, hi = -1 unbounded
    enumerated: tuple | None = None
    color_space: str | None = None
    optional: bool = False
    description: str = ""
    proto: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        if self.kind == "multiArray":
            dt = np.dtype(self.dtype).name
            return f"MultiArray ({dt} {' x '.join(map(str, self.shape or ()))})"
        if self.kind == "image":
            return f"Image ({self.color_space} {self.shape[1]} x {self.shape[0]})"
        return self.kind


def _spec_of(fd) -> FeatureSpec:
    t = fd.type
    kind = t.WhichOneof("Type")
    common = dict(name=fd.name, optional=t.isOptional, description=fd.shortDescription, proto=fd)
    if kind == "multiArrayType":
        a = t.multiArrayType
        ranges = enumerated = None
        if a.WhichOneof("ShapeFlexibility") == "shapeRange":
            ranges = tuple((r.lowerBound, r.upperBound) for r in a.shapeRange.sizeRanges)
        elif a.WhichOneof("ShapeFlexibility") == "enumeratedShapes":
            enumerated = tuple(tuple(s.shape) for s in a.enumeratedShapes.shapes)
        dtype = _ARRAY_DTYPES.get(a.dataType, np.float32)
        return FeatureSpec(kind="multiArray", dtype=np.dtype(dtype), shape=tuple(a.shape),
                           ranges=ranges, enumerated=enumerated, **common)
    if kind == "imageType":
        im = t.imageType
        return FeatureSpec(kind="image", dtype=np.dtype(np.float32), shape=(im.height, im.width),
                           color_space=_COLOR.get(im.colorSpace, "RGB"), **common)
    if kind == "stateType":
        a = t.stateType.arrayType
        return FeatureSpec(kind="state", dtype=np.dtype(_ARRAY_DTYPES.get(a.dataType, np.float32)),
                           shape=tuple(a.shape), **common)
    simple = {"int64Type": ("int64", np.int64), "doubleType": ("double", np.float64),
              "stringType": ("string", None), "dictionaryType": ("dictionary", None),
              "sequenceType": ("sequence", None)}
    name, dtype = simple.get(kind, (kind or "unknown", None))
    return FeatureSpec(kind=name, dtype=None if dtype is None else np.dtype(dtype), **common)


def feature_specs(descriptions) -> dict[str, FeatureSpec]:
    """Repeated FeatureDescription -> {name: FeatureSpec}, in declaration order."""
    names = [fd.name for fd in descriptions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ModelFormatError(f"the model describes features {twice} more than once; expected unique names")
    return {fd.name: _spec_of(fd) for fd in descriptions}


def _shape_allowed(spec: FeatureSpec, shape: tuple) -> str | None:
    """None when ``shape`` is allowed, else a description of what is allowed."""
    if spec.enumerated:
        return None if shape in spec.enumerated else f"one of the shapes {list(spec.enumerated)}"
    if spec.ranges:
        if len(shape) == len(spec.ranges) and all(
                lo <= d and (hi < 0 or d <= hi) for d, (lo, hi) in zip(shape, spec.ranges)):
            return None
        text = ", ".join(f"{lo}..{'inf' if hi < 0 else hi}" for lo, hi in spec.ranges)
        return f"a shape within [{text}]"
    if spec.shape and tuple(shape) != tuple(spec.shape):
        return f"shape {tuple(spec.shape)}"
    return None


def convert_inputs(specs: dict[str, FeatureSpec], data: Any, *, check_shapes: bool = True,
                   extra_ok: bool = False) -> dict[str, Any]:
    """Check names, shapes and dtypes of user features; return arrays in the declared dtypes."""
    if not isinstance(data, dict):
        raise InputError(f"expected a dict of input features {{name: value}}; found {type(data).__name__}")
    required = [n for n, s in specs.items() if not s.optional]
    missing = [n for n in required if n not in data]
    extra = [n for n in data if n not in specs]
    if missing or (extra and not extra_ok):
        raise InputError(
            f"expected inputs {list(specs)}; " + (f"missing {missing}" if missing else "") +
            ("; " if missing and extra else "") + (f"unknown {extra}" if extra and not extra_ok else ""))
    out = {}
    for name, spec in specs.items():
        if name not in data:
            continue
        out[name] = _convert_one(spec, data[name], check_shapes)
    return out


def _convert_one(spec: FeatureSpec, value, check_shapes: bool):
    if spec.kind in ("multiArray", "state"):
        try:
            arr = np.asarray(value)
        except Exception as e:  # noqa: BLE001 - any array conversion failure is the user's input
            raise InputError(f"input {spec.name!r}: expected an array, found {type(value).__name__} ({e})") from None
        if arr.dtype.kind not in "biuf":
            raise InputError(f"input {spec.name!r}: expected a numeric array ({spec.dtype}); found dtype {arr.dtype}")
        if arr.size == 0:
            raise InputError(f"input {spec.name!r}: expected a non-empty array; found shape {tuple(arr.shape)}")
        if check_shapes:
            allowed = _shape_allowed(spec, tuple(arr.shape))
            if allowed is not None:
                raise InputError(f"input {spec.name!r}: expected {allowed}; found shape {tuple(arr.shape)}")
        return arr.astype(spec.dtype, copy=False)
    if spec.kind in ("int64", "double"):
        return _scalar(spec, value)
    return value


def _scalar(spec: FeatureSpec, value) -> np.ndarray:
    """A ``double``/``int64`` feature: one real number (a Python or NumPy number, or an array of
    one element, kept in its shape)."""
    expected = f"input {spec.name!r}: expected one {'integer' if spec.kind == 'int64' else 'number'} ({spec.kind})"
    if isinstance(value, (str, bytes, dict)) or value is None:
        raise InputError(f"{expected}; found {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except ValueError as e:   # ragged nested lists
        raise InputError(f"{expected}; found {type(value).__name__} ({e})") from None
    if arr.dtype.kind not in "biuf" or arr.size != 1:
        raise InputError(f"{expected}; found {type(value).__name__} of dtype {arr.dtype} and shape {arr.shape}")
    if spec.kind == "int64" and arr.dtype.kind == "f" and not float(arr.reshape(())).is_integer():
        raise InputError(f"{expected}; found the fraction {float(arr.reshape(()))}")
    return arr.astype(np.int64 if spec.kind == "int64" else np.float64)


def convert_output(spec: FeatureSpec | None, value):
    """A computed output as the NumPy value coremltools would return."""
    try:
        return _convert_output(spec, value)
    except (TypeError, ValueError, IndexError) as e:
        raise ModelFormatError(f"output {spec.name!r}: the model describes it as {spec.kind}, but its "
                               f"computed value is {type(value).__name__} ({e})") from None


def _convert_output(spec: FeatureSpec | None, value):
    if spec is None:
        return np.asarray(value)
    if spec.kind == "multiArray":
        return np.asarray(value).astype(spec.dtype, copy=False)
    if spec.kind == "double":
        return float(np.asarray(value).reshape(-1)[0]) if np.size(value) == 1 else np.asarray(value, np.float64)
    if spec.kind == "int64":
        return int(np.asarray(value).reshape(-1)[0]) if np.size(value) == 1 else np.asarray(value, np.int64)
    return value
