"""Program passes run after translation: dead code elimination, constant folding, fp16 casts."""
from __future__ import annotations

from converters.passes.const_fold import fold_constants
from converters.passes.dce import eliminate_dead_code
from converters.passes.fp16 import cast_to_fp16

__all__ = ["run_passes", "eliminate_dead_code", "fold_constants", "cast_to_fp16"]


def run_passes(program, *, compute_precision: str = "float32") -> None:
    """Clean up every function of ``program`` in place; ``"float16"`` also casts to fp16."""
    for fn in program.functions.values():
        eliminate_dead_code(fn.block)
        fold_constants(fn)
        eliminate_dead_code(fn.block)
        if compute_precision == "float16":
            cast_to_fp16(fn)
            eliminate_dead_code(fn.block)
