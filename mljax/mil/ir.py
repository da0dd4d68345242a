"""The MIL IR: Program > Function > Block > Operation, with Vars between them.

Small, slotted classes.  A :class:`Var` is produced by one op (or is a block input)
and may carry a constant ``value`` (a NumPy array or Python scalar) known before any
tracing: const ops, materialized constexpr ops and folded shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mljax.mil.types import ValueType

__all__ = ["Var", "Operation", "Block", "Function", "Program"]


@dataclass(eq=False, slots=True)
class Var:
    name: str
    type: ValueType | None
    value: Any = None          # known constant value (np.ndarray / scalar / str), or None
    blob: tuple | None = None  # (file_name, offset) when the value came from a weight blob

    @property
    def is_const(self) -> bool:
        return self.value is not None

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False, slots=True)
class Operation:
    type: str
    name: str
    inputs: dict[str, tuple[Var, ...]]          # every argument, variadic or not, as a tuple
    outputs: list[Var]
    blocks: list["Block"] = field(default_factory=list)
    attributes: dict[str, Any] = field(default_factory=dict)

    def input(self, key: str) -> Var | None:
        """The single Var bound to ``key``, or None when the input is absent."""
        bound = self.inputs.get(key)
        return bound[0] if bound else None


@dataclass(eq=False, slots=True)
class Block:
    inputs: list[Var]
    operations: list[Operation]
    outputs: list[Var]
    attributes: dict[str, Any] = field(default_factory=dict)

    def walk(self):
        """Every op of this block and its nested blocks, depth first."""
        for op in self.operations:
            yield op
            for b in op.blocks:
                yield from b.walk()


@dataclass(eq=False, slots=True)
class Function:
    name: str
    inputs: list[Var]
    opset: str
    block: Block
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def outputs(self) -> list[Var]:
        return self.block.outputs


@dataclass(eq=False, slots=True)
class Program:
    version: int
    functions: dict[str, Function]
    attributes: dict[str, Any] = field(default_factory=dict)

    def weight_bytes(self) -> int:
        """Bytes of every constant tensor value in the program."""
        total = 0
        for fn in self.functions.values():
            for op in fn.block.walk():
                for v in op.outputs:
                    if isinstance(v.value, np.ndarray):
                        total += v.value.nbytes
        return total
