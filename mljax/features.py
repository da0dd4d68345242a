"""Model descriptions: feature types, and checking/converting user features against them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mljax.errors import InputError, ModelFormatError

__all__ = ["FeatureSpec", "Features", "feature_specs", "convert_inputs", "convert_output"]

_ARRAY_DTYPES = {65568: np.float32, 65600: np.float64, 131104: np.int32, 131080: np.int8,
                 65552: np.float16}
_COLOR = {10: "GRAYSCALE", 20: "RGB", 30: "BGR", 40: "GRAYSCALE_FLOAT16"}
# Core ML's names of the feature types and array data types (MLFeatureType, MLMultiArrayDataType)
_KIND_NAMES = {"multiArray": "MultiArray", "image": "Image", "int64": "Int64", "double": "Double",
               "string": "String", "dictionary": "Dictionary", "sequence": "Sequence", "state": "State"}
_DTYPE_NAMES = {"float32": "Float32", "float64": "Double", "float16": "Float16", "int32": "Int32",
                "int8": "Int8", "int64": "Int64"}


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
    element: str | None = None   # dictionary key / sequence element type: "Int64" or "String"
    proto: Any = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        """The type as Core ML names it, with shape, flexibility and image format, e.g.
        ``MultiArray (Float32 1 x 3 x 1..inf x 224)``, ``Image (RGB 224 x 224)``,
        ``Dictionary (String -> Double)``; ``, optional`` for optional inputs."""
        name = _KIND_NAMES.get(self.kind, self.kind)
        if self.kind in ("multiArray", "state"):
            dt = _DTYPE_NAMES.get(np.dtype(self.dtype).name, np.dtype(self.dtype).name)
            text = f"{name} ({dt} {_shape_text(self)})"
        elif self.kind == "image":
            text = f"{name} ({self.color_space} {_image_size_text(self)})"
        elif self.kind == "dictionary":
            text = f"{name} ({self.element or '?'} -> Double)"
        elif self.kind == "sequence":
            text = f"{name} ({self.element or '?'})"
        else:
            text = name
        return text + (", optional" if self.optional else "")

    def __repr__(self) -> str:
        return f"{self.name}: {self}" + (f"  # {self.description}" if self.description else "")


def _dims(dims) -> str:
    return " x ".join(map(str, dims)) if len(dims) else "scalar"


def _shape_text(spec: FeatureSpec) -> str:
    """``1 x 3``; ``1 x 1..inf`` for ranges; ``1 x 3 | 1 x 5`` for enumerated shapes; the
    default shape follows a flexible one."""
    shape = tuple(spec.shape or ())
    if spec.enumerated:
        text = " | ".join(_dims(s) for s in spec.enumerated)
    elif spec.ranges:
        text = " x ".join(str(lo) if lo == hi else f"{lo}..{'inf' if hi < 0 else hi}" for lo, hi in spec.ranges)
    else:
        return _dims(shape)
    return text + (f", default {_dims(shape)}" if shape else "")


def _image_size_text(spec: FeatureSpec) -> str:
    """``W x H`` as Core ML writes image sizes (width first), with the flexible sizes."""
    h, w = spec.shape or (0, 0)
    if spec.enumerated:
        return " | ".join(f"{ew} x {eh}" for eh, ew in spec.enumerated) + f", default {w} x {h}"
    if spec.ranges:
        (hlo, hhi), (wlo, whi) = spec.ranges
        span = lambda lo, hi: str(lo) if lo == hi else f"{lo}..{'inf' if hi < 0 else hi}"  # noqa: E731
        return f"{span(wlo, whi)} x {span(hlo, hhi)}, default {w} x {h}"
    return f"{w} x {h}"


class Features(dict):
    """A model's input or output descriptions, ``{name: FeatureSpec}``, printed one feature a line
    (name, Core ML type, shape or flexible shapes, image format) as coremltools' spec shows them;
    ``notes`` add a line's remark (a classifier's predicted feature and class labels)."""

    def __init__(self, specs=(), notes: dict | None = None):
        super().__init__(specs)
        self.notes = dict(notes or {})

    def __repr__(self) -> str:
        if not self:
            return "Features()"
        lines = []
        for name, spec in self.items():
            line = f"  {name}: {spec}"
            if spec.description:
                line += f" -- {spec.description}"
            if name in self.notes:
                line += f" ({self.notes[name]})"
            lines.append(line)
        return "Features(\n" + "\n".join(lines) + "\n)"

    __str__ = __repr__


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
        ranges = enumerated = None
        if im.WhichOneof("SizeFlexibility") == "imageSizeRange":
            r = im.imageSizeRange
            ranges = ((r.heightRange.lowerBound, r.heightRange.upperBound),
                      (r.widthRange.lowerBound, r.widthRange.upperBound))
        elif im.WhichOneof("SizeFlexibility") == "enumeratedSizes":
            enumerated = tuple((sz.height, sz.width) for sz in im.enumeratedSizes.sizes)
        return FeatureSpec(kind="image", dtype=np.dtype(np.float32), shape=(im.height, im.width),
                           color_space=_COLOR.get(im.colorSpace, "RGB"), ranges=ranges,
                           enumerated=enumerated, **common)
    if kind == "stateType":
        a = t.stateType.arrayType
        return FeatureSpec(kind="state", dtype=np.dtype(_ARRAY_DTYPES.get(a.dataType, np.float32)),
                           shape=tuple(a.shape), **common)
    simple = {"int64Type": ("int64", np.int64), "doubleType": ("double", np.float64),
              "stringType": ("string", None), "dictionaryType": ("dictionary", None),
              "sequenceType": ("sequence", None)}
    name, dtype = simple.get(kind, (kind or "unknown", None))
    element = None
    if kind == "dictionaryType":
        element = {"int64KeyType": "Int64", "stringKeyType": "String"}.get(t.dictionaryType.WhichOneof("KeyType"))
    elif kind == "sequenceType":
        element = {"int64Type": "Int64", "stringType": "String"}.get(t.sequenceType.WhichOneof("Type"))
    return FeatureSpec(kind=name, dtype=None if dtype is None else np.dtype(dtype), element=element, **common)


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
                   extra_ok: bool = False, fp16_in_graph: bool = False) -> dict[str, Any]:
    """Check names, shapes and dtypes of user features; return arrays in the declared dtypes.

    ``fp16_in_graph``: float32 arrays for float16 inputs stay float32 (the stage's function rounds
    them to float16 itself, as XLA does fast; NumPy's conversion takes ~4 ns a value)."""
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
        out[name] = _convert_one(spec, data[name], check_shapes, fp16_in_graph)
    return out


def _convert_one(spec: FeatureSpec, value, check_shapes: bool, fp16_in_graph: bool = False):
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
        if fp16_in_graph and arr.dtype == np.float32 and np.dtype(spec.dtype) == np.float16:
            return arr
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
