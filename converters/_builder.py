"""A small MIL IR builder: ops with unique names, Python values become ``const`` ops.

Like coremltools' builder, every non-tensor input (axes, shapes, modes) is its own
``const`` op named ``{op}_{input}``, so the written program binds inputs by name.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any

import numpy as np

from mljax.errors import ConversionError
from mljax.mil.ir import Operation, Var
from mljax.mil.types import DTYPES, DType, TensorType, dtype_from_numpy

__all__ = ["Builder", "tensor_type", "mil_dtype"]

_NOT_IDENT = re.compile(r"[^A-Za-z0-9_]")


def mil_dtype(np_dtype) -> DType:
    """The MIL dtype of a NumPy/JAX dtype (64-bit values are narrowed to 32 bits)."""
    dt = np.dtype(np_dtype)
    narrowed = {"float64": np.float32, "int64": np.int32, "uint64": np.uint32}.get(dt.name)
    try:
        return dtype_from_numpy(narrowed or dt)
    except ValueError:
        raise ConversionError(f"dtype {dt} has no Core ML equivalent") from None


def tensor_type(shape, np_dtype) -> TensorType:
    return TensorType(mil_dtype(np_dtype), tuple(int(d) for d in shape))


def _as_array(value, dtype: DType | None) -> np.ndarray | str:
    if isinstance(value, str):
        return value
    if dtype is not None:
        return np.asarray(value, dtype=dtype.numpy)
    if isinstance(value, (bool, np.bool_)):
        return np.asarray(value, np.bool_)
    if isinstance(value, (int, np.integer)) or (isinstance(value, (list, tuple)) and
                                                all(isinstance(v, (int, np.integer)) for v in value)):
        return np.asarray(value, np.int32)
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32) if arr.dtype == np.float64 else arr
    if arr.dtype == np.int64:
        return arr.astype(np.int32)
    return arr


class Builder:
    """Collects the operations of one block; names are unique within the builder."""

    def __init__(self, reserved=()):
        self.operations: list[Operation] = []
        self._taken: set[str] = set(reserved)
        self._counts: dict[str, int] = {}

    def fresh(self, base: str) -> str:
        """A new unique identifier derived from ``base`` (``relu`` -> ``relu_0``)."""
        base = _NOT_IDENT.sub("_", base) or "v"
        if base[0].isdigit():
            base = "_" + base
        n = self._counts.get(base, 0)
        while f"{base}_{n}" in self._taken:
            n += 1
        self._counts[base] = n + 1
        name = f"{base}_{n}"
        self._taken.add(name)
        return name

    def unique(self, name: str) -> str:
        """``name`` itself when free (and an identifier), else a fresh name derived from it."""
        if name.isidentifier() and name not in self._taken:
            self._taken.add(name)
            return name
        return self.fresh(name)

    def reserve(self, name: str) -> str:
        """Claim ``name`` exactly (an input or weight name); fails when taken."""
        if name in self._taken:
            raise ConversionError(f"name {name!r} is used twice")
        self._taken.add(name)
        return name

    def const(self, value, *, name: str | None = None, dtype: DType | None = None,
              exact_name: bool = False, keep_name: bool = False) -> Var:
        """A ``const`` op holding ``value``; returns its output Var (with ``.value`` set)."""
        val = _as_array(value, dtype)
        if isinstance(val, str):
            t = TensorType(DTYPES["string"], ())
        else:
            t = TensorType(mil_dtype(val.dtype), tuple(int(s) for s in val.shape))
            val = val.astype(t.dtype.numpy)
        if exact_name:
            var_name = self.reserve(name)
        elif keep_name and name:
            var_name = self.unique(name)
        else:
            var_name = self.fresh(name or "const")
        var = Var(var_name, t, val)
        self.operations.append(Operation("const", var_name, {}, [var]))
        return var

    @contextmanager
    def block(self):
        """Collect the ops appended inside the ``with`` into a new list (a nested block's body)."""
        outer, self.operations = self.operations, []
        ops = self.operations
        try:
            yield ops
        finally:
            self.operations = outer

    def op(self, op_type: str, out_types, *, name: str | None = None, blocks=(), **inputs: Any):
        """Append ``op_type``; ``out_types`` is one TensorType (returns a Var) or a list (returns a list);
        ``blocks`` are its nested blocks (cond branches, loop condition and body)."""
        op_name = self.fresh(name or op_type)
        bound = {}
        for key, val in inputs.items():
            if val is None:
                continue
            if isinstance(val, Var):
                bound[key] = (val,)
            elif isinstance(val, (tuple, list)) and val and all(isinstance(v, Var) for v in val):
                bound[key] = tuple(val)
            else:
                bound[key] = (self.const(val, name=f"{op_name}_{key}"),)
        many = isinstance(out_types, (list, tuple))
        types = list(out_types) if many else [out_types]
        outs = [Var(op_name if i == 0 else self.fresh(f"{op_name}_out{i}"), t) for i, t in enumerate(types)]
        self.operations.append(Operation(op_type, op_name, bound, outs, list(blocks)))
        return outs if many else outs[0]
