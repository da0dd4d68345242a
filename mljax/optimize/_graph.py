"""A mutable working copy of a MIL function, with the use bookkeeping the passes need."""
from __future__ import annotations

from typing import Callable

import numpy as np

from mljax.mil.ir import Block, Function, Operation, Var
from mljax.mil.types import DTYPES, TensorType

__all__ = ["Graph", "seeded_components"]


def _copy_block(block: Block) -> Block:
    """New Block/Operation objects over the same Vars (values are shared, never copied)."""
    ops = [Operation(op.type, op.name, dict(op.inputs), list(op.outputs),
                     [_copy_block(b) for b in op.blocks], dict(op.attributes))
           for op in block.operations]
    return Block(list(block.inputs), ops, list(block.outputs), dict(block.attributes))


class Graph:
    """A function's copy; ``replace_uses`` rewires consumers, ``producer``/``uses`` answer queries."""

    def __init__(self, fn: Function, compute_dtype: Callable):
        self.fn = Function(fn.name, list(fn.inputs), fn.opset, _copy_block(fn.block), dict(fn.attributes))
        self.compute_dtype = compute_dtype
        # Shape-based rewrites trust the declared shapes only when every input's shape is fixed
        # (a flexible input's declared shape is just one of the shapes the model accepts).
        self.static = all(not isinstance(v.type, TensorType) or v.type.is_static for v in fn.inputs)
        self._counter = 0

    def blocks(self):
        """Every block, outermost first."""
        stack = [self.fn.block]
        while stack:
            b = stack.pop()
            yield b
            for op in b.operations:
                stack.extend(op.blocks)

    def producers(self) -> dict[int, Operation]:
        return {id(v): op for b in self.blocks() for op in b.operations for v in op.outputs}

    def use_counts(self) -> dict[int, int]:
        """How many op inputs and block outputs read each Var (by identity)."""
        counts: dict[int, int] = {}
        for b in self.blocks():
            for op in b.operations:
                for bound in op.inputs.values():
                    for v in bound:
                        counts[id(v)] = counts.get(id(v), 0) + 1
            for v in b.outputs:
                counts[id(v)] = counts.get(id(v), 0) + 1
        return counts

    def protected(self) -> set[int]:
        """Vars that must keep their identity: block outputs (their names are the outputs')."""
        return {id(v) for b in self.blocks() for v in b.outputs}

    def replace_uses(self, old: Var, new: Var) -> None:
        """Every op input reading ``old`` reads ``new`` instead (block outputs are never replaced)."""
        for b in self.blocks():
            for op in b.operations:
                for key, bound in op.inputs.items():
                    if any(v is old for v in bound):
                        op.inputs[key] = tuple(new if v is old else v for v in bound)

    def const(self, hint: str, value: np.ndarray, dtype: str = "int32") -> Var:
        """A new constant Var (int32 tensors for perms and shapes unless ``dtype`` says otherwise)."""
        self._counter += 1
        value = np.asarray(value, DTYPES[dtype].numpy)
        return Var(f"{hint}__opt{self._counter}", TensorType(DTYPES[dtype], tuple(value.shape)), value)


def seeded_components(nodes, edges, seeds) -> set:
    """The nodes of every connected component (``edges``: pairs of nodes) holding a node of ``seeds``."""
    parent = {n: n for n in nodes}

    def find(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n
    for a, b in edges:
        parent[find(a)] = find(b)
    roots = {find(n) for n in seeds}
    return {n for n in nodes if find(n) in roots}
