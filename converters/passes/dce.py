"""Dead code elimination: drop ops none of whose outputs reach a block output."""
from __future__ import annotations

from mljax.mil.ir import Block

__all__ = ["eliminate_dead_code", "free_uses"]

#: Ops kept even when unused (they act on state).
_EFFECTS = {"coreml_update_state", "write_state"}


def free_uses(block: Block) -> set[int]:
    """ids of the Vars a block reads (its outputs and its ops' inputs, nested blocks included)."""
    used = {id(v) for v in block.outputs}
    for op in block.operations:
        used.update(id(v) for bound in op.inputs.values() for v in bound)
        for b in op.blocks:
            used |= free_uses(b)
    return used


def eliminate_dead_code(block: Block) -> int:
    """Remove dead ops from ``block`` (and its nested blocks) in place; returns how many."""
    removed = 0
    for op in block.operations:
        for b in op.blocks:
            removed += eliminate_dead_code(b)
    live = {id(v) for v in block.outputs}
    kept = []
    for op in reversed(block.operations):
        if op.type in _EFFECTS or any(id(v) in live for v in op.outputs):
            kept.append(op)
            live.update(id(v) for bound in op.inputs.values() for v in bound)
            for b in op.blocks:
                live |= free_uses(b)
        else:
            removed += 1
    block.operations[:] = kept[::-1]
    return removed
