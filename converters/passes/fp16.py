"""fp16 compute precision, the way Apple's converter does it.

fp32 inputs are cast to fp16 at the start (``x`` -> ``x_to_fp16``), fp32 constants are
stored as fp16 (``w`` -> ``w_to_fp16``), every fp32 op output becomes fp16, casts to fp32
become casts to fp16, and each fp32 output is cast back at the end under its own name
(the fp16 value is renamed ``{name}_cast_fp16``).  The description keeps fp32 I/O.
"""
from __future__ import annotations

import numpy as np

from mljax.mil.ir import Function, Operation, Var
from mljax.mil.types import DTYPES, TensorType

__all__ = ["cast_to_fp16"]

_FP32, _FP16 = DTYPES["fp32"], DTYPES["fp16"]


def _is_fp32(var: Var) -> bool:
    return isinstance(var.type, TensorType) and var.type.dtype == _FP32


def _string_const(name: str, value: str) -> Var:
    return Var(name, TensorType(DTYPES["string"], ()), value)


class _Names:
    def __init__(self, fn: Function):
        self.taken = {v.name for v in fn.inputs}
        self.taken.update(v.name for op in fn.block.walk() for v in op.outputs)

    def __call__(self, base: str) -> str:
        name, n = base, 0
        while name in self.taken:
            name, n = f"{base}_{n}", n + 1
        self.taken.add(name)
        return name


def _cast(var: Var, dtype: str, out_name: str, names: _Names) -> list[Operation]:
    dtype_var = _string_const(names(f"{out_name}_dtype_0"), dtype)
    out = Var(out_name, TensorType(DTYPES[dtype], var.type.shape))
    return [Operation("const", dtype_var.name, {}, [dtype_var]),
            Operation("cast", names(f"cast_{out_name}"), {"x": (var,), "dtype": (dtype_var,)}, [out])]


def _to_fp16(value) -> np.ndarray:
    """fp32 -> fp16, saturating finite values at the fp16 range (e.g. -1e9 masks stay finite)."""
    arr = np.asarray(value, np.float32)
    limit = float(np.finfo(np.float16).max)
    return np.where(np.isfinite(arr), np.clip(arr, -limit, limit), arr).astype(np.float16)


def _rewrite(operations: list[Operation], replace: dict, names: _Names) -> list[Operation]:
    """fp32 -> fp16 for the ops of one block and, recursively, their nested blocks' inputs and ops."""
    body: list[Operation] = []
    for op in operations:
        op.inputs = {k: tuple(replace.get(id(v), v) for v in bound) for k, bound in op.inputs.items()}
        if op.type == "const":
            var = op.outputs[0]
            if _is_fp32(var):
                var.value = _to_fp16(var.value)
                var.type = TensorType(_FP16, var.type.shape)
                names.taken.discard(var.name)
                var.name = op.name = names(f"{var.name}_to_fp16")
        elif op.type == "cast" and op.input("dtype") is not None and op.input("dtype").value == "fp32":
            dtype_var = _string_const(names(f"{op.name}_dtype_fp16"), "fp16")
            body.append(Operation("const", dtype_var.name, {}, [dtype_var]))
            op.inputs = {**op.inputs, "dtype": (dtype_var,)}
        for block in op.blocks:
            for var in block.inputs:
                if _is_fp32(var):
                    var.type = TensorType(_FP16, var.type.shape)
            block.operations[:] = _rewrite(block.operations, replace, names)
            block.outputs[:] = [replace.get(id(v), v) for v in block.outputs]
        if op.type != "const":
            for var in op.outputs:
                if _is_fp32(var):
                    var.type = TensorType(_FP16, var.type.shape)
        body.append(op)
    return body


def cast_to_fp16(fn: Function) -> None:
    """Rewrite ``fn`` in place to compute in fp16."""
    names = _Names(fn)
    block = fn.block
    fp32_outputs = {id(v) for v in block.outputs if _is_fp32(v)}
    final_names = [v.name for v in block.outputs]     # a constant output is renamed *_to_fp16 below
    replace: dict[int, Var] = {}
    head: list[Operation] = []
    for v in fn.inputs:
        if _is_fp32(v):
            head += _cast(v, "fp16", names(f"{v.name}_to_fp16"), names)
            replace[id(v)] = head[-1].outputs[0]
    body = _rewrite(block.operations, replace, names)
    outputs = []
    for v, final in zip(block.outputs, final_names):
        was_fp32 = id(v) in fp32_outputs
        v = replace.get(id(v), v)
        if was_fp32:
            names.taken.discard(v.name)
            v.name = names(f"{final}_cast_fp16")
            names.taken.add(final)
            body += _cast(v, "fp32", final, names)
            v = body[-1].outputs[0]
        outputs.append(v)
    block.operations[:] = head + body
    block.outputs[:] = outputs
