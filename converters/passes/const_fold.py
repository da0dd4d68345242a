"""Constant folding: ops whose inputs are all constants become ``const`` ops.

Values are computed by mljax's own op implementations (the same code that runs the
model), so a folded program predicts what the unfolded one would.  A layout op
(transpose, reshape, cast ...) applied to a weight used nowhere else takes over the
weight's name, so trained weights keep readable names.
"""
from __future__ import annotations

import numpy as np

from mljax.errors import ConversionError, UnsupportedOpError
from mljax.lower import LoweredFunction
from mljax.mil.ir import Block, Function, Operation

__all__ = ["fold_constants"]

_NEVER = {"const", "identity", "fill"}   # fill: a loop accumulator stays small in the file
_RENAMING = {"transpose", "reshape", "squeeze", "expand_dims", "cast"}


def _foldable(op: Operation) -> bool:
    if op.type in _NEVER or op.blocks or op.type.startswith(("random_", "constexpr_")) \
            or "state" in op.type:
        return False
    return all(v.value is not None for bound in op.inputs.values() for v in bound)


def _layout(op: Operation) -> list[np.ndarray] | None:
    """transpose/reshape of a constant in NumPy: exact, and no XLA compile per weight shape."""
    x = op.input("x").value
    if op.type == "transpose":
        return [np.transpose(x, [int(p) for p in np.asarray(op.input("perm").value)])]
    if op.type == "reshape" and op.input("shape") is not None:
        return [np.reshape(x, [int(d) for d in np.asarray(op.input("shape").value)])]
    return None


def _evaluate(op: Operation, opset: str) -> list[np.ndarray] | None:
    if op.type in ("transpose", "reshape") and isinstance(op.input("x").value, np.ndarray):
        return _layout(op)
    try:
        lowered = LoweredFunction(Function("fold", [], opset, Block([], [op], list(op.outputs))))
    except UnsupportedOpError:
        return None
    outs, _ = lowered({}, {}, {})
    return [np.asarray(outs[v.name]) for v in op.outputs]


def _uses(block: Block) -> dict[int, int]:
    counts: dict[int, int] = {}
    for v in block.outputs:
        counts[id(v)] = counts.get(id(v), 0) + 1
    for op in block.walk():
        for bound in op.inputs.values():
            for v in bound:
                counts[id(v)] = counts.get(id(v), 0) + 1
    return counts


def fold_constants(fn: Function) -> int:
    """Fold in place; returns the number of ops folded."""
    block, folded = fn.block, 0
    uses = _uses(block)
    producer = {id(op.outputs[0]): op for op in block.operations if op.type == "const"}
    ops: list[Operation] = []
    for op in block.operations:
        values = _evaluate(op, fn.opset) if _foldable(op) else None
        if values is None:
            ops.append(op)
            continue
        folded += 1
        for var, val in zip(op.outputs, values):
            if tuple(val.shape) != tuple(var.type.shape):
                raise ConversionError(f"folding {op.type} {op.name!r} gave shape {val.shape}; "
                                      f"the program declares {var.type}")
            var.value = val.astype(var.type.dtype.numpy)
        if op.type in _RENAMING and len(op.outputs) == 1:
            src = _renamable_source(op, uses, producer)
            if src is not None:
                ops.remove(src)
                op.outputs[0].name = src.outputs[0].name
        ops.extend(Operation("const", v.name, {}, [v]) for v in op.outputs)
    block.operations[:] = ops
    return folded


def _renamable_source(op: Operation, uses, producer):
    """The const op of ``op``'s data input when ``op`` is its only user."""
    data = op.inputs.get("x")
    if not data or not isinstance(data[0].value, np.ndarray) or data[0].value.size < 2:
        return None
    src = producer.get(id(data[0]))
    if src is None or uses.get(id(data[0]), 0) != 1:
        return None
    return src
