"""MIL value types: dtypes, tensor types with symbolic dims, list/tuple/dict/state types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import ml_dtypes
import numpy as np

__all__ = [
    "DType", "TensorType", "ListType", "TupleType", "DictType", "StateType", "Dim", "ValueType",
    "dtype_from_name", "dtype_from_numpy", "DTYPES",
]


@dataclass(frozen=True)
class DType:
    """A MIL element type: its MIL name (``fp16``), proto enum value and NumPy dtype."""

    name: str
    proto: int
    numpy: np.dtype
    bits: int

    @property
    def is_float(self) -> bool:
        return self.name.startswith(("fp", "bf"))

    @property
    def is_int(self) -> bool:
        return self.name.startswith(("int", "uint"))

    def __repr__(self) -> str:
        return self.name


def _d(name, proto, np_dtype, bits):
    return DType(name, proto, np.dtype(np_dtype), bits)


#: Every MIL dtype by MIL name (the names the ``cast`` op and MIL text use).
DTYPES: dict[str, DType] = {d.name: d for d in [
    _d("bool", 1, np.bool_, 8),
    _d("string", 2, np.object_, 0),
    _d("fp8e4m3fn", 40, ml_dtypes.float8_e4m3fn, 8),
    _d("fp8e5m2", 41, ml_dtypes.float8_e5m2, 8),
    _d("fp16", 10, np.float16, 16),
    _d("fp32", 11, np.float32, 32),
    _d("fp64", 12, np.float64, 64),
    _d("bf16", 13, ml_dtypes.bfloat16, 16),
    _d("int8", 21, np.int8, 8),
    _d("int16", 22, np.int16, 16),
    _d("int32", 23, np.int32, 32),
    _d("int64", 24, np.int64, 64),
    _d("int4", 25, ml_dtypes.int4, 4),
    _d("uint8", 31, np.uint8, 8),
    _d("uint16", 32, np.uint16, 16),
    _d("uint32", 33, np.uint32, 32),
    _d("uint64", 34, np.uint64, 64),
    _d("uint4", 35, ml_dtypes.uint4, 4),
    _d("uint2", 36, ml_dtypes.uint2, 2),
    _d("uint1", 37, np.uint8, 1),
    _d("uint6", 38, np.uint8, 6),
    _d("uint3", 39, np.uint8, 3),
]}
_BY_PROTO = {d.proto: d for d in DTYPES.values()}
_ALIASES = {"float16": "fp16", "float32": "fp32", "float64": "fp64", "bfloat16": "bf16",
            "float": "fp32", "double": "fp64", "int": "int32"}


def dtype_from_name(name: str) -> DType:
    """``"fp16"`` (or ``"float16"``) -> :class:`DType`."""
    key = _ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown MIL dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[key]


def dtype_from_proto(value: int) -> DType:
    if value not in _BY_PROTO:
        from mljax.errors import ModelFormatError
        raise ModelFormatError(f"unknown MIL DataType enum value {value}; expected one of "
                               f"{sorted(_BY_PROTO)}")
    return _BY_PROTO[value]


def dtype_from_numpy(dt) -> DType:
    dt = np.dtype(dt)
    for d in DTYPES.values():
        if d.numpy == dt and d.name not in ("uint1", "uint3", "uint6"):
            return d
    raise ValueError(f"NumPy dtype {dt} has no MIL equivalent")


#: A dimension: an int, or a symbol name (str), or None for an unknown/variadic dim.
Dim = Union[int, str, None]


@dataclass(frozen=True)
class TensorType:
    """A tensor (rank 0 is a scalar).  ``shape`` is None when even the rank is unknown."""

    dtype: DType
    shape: tuple[Dim, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def __str__(self) -> str:
        if self.shape is None:
            return f"tensor<{self.dtype.name}, *?>"
        if not self.shape:
            return self.dtype.name
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"tensor<{self.dtype.name}, [{dims}]>"


@dataclass(frozen=True)
class ListType:
    elem: "ValueType"
    length: Dim = None

    def __str__(self) -> str:
        return f"list<{self.elem}, {'?' if self.length is None else self.length}>"


@dataclass(frozen=True)
class TupleType:
    elems: tuple["ValueType", ...]

    def __str__(self) -> str:
        return "tuple<" + ", ".join(map(str, self.elems)) + ">"


@dataclass(frozen=True)
class DictType:
    key: "ValueType"
    value: "ValueType"

    def __str__(self) -> str:
        return f"dict<{self.key}, {self.value}>"


@dataclass(frozen=True)
class StateType:
    wrapped: TensorType

    def __str__(self) -> str:
        return f"state<{self.wrapped}>"


ValueType = Union[TensorType, ListType, TupleType, DictType, StateType]
