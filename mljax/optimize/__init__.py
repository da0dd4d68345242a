"""Graph optimizations on the MIL IR, run once at load, between the IR and the lowering.

The role of coremltools' graph passes and ONNX Runtime's graph optimizers: small pure
rewrites of a *copy* of a function (the loaded program itself stays as the file holds it,
so ``save`` writes what was read).  Each pass returns how many rewrites it made; each is
tested for equal results with the pass off.

A pass sees the function's compute precision (:mod:`mljax.lower`'s typed execution): a cast
between two dtypes that compute alike is a no-op there (the input and output casts of an fp16
program computed in fp32).  What XLA would also simplify is still worth removing here: fewer
ops to trace and smaller programs to compile, and rewrites such as merged transposes that
XLA keeps only when it can prove them equal.
"""
from __future__ import annotations

from typing import Callable

from mljax.mil.ir import Function
from mljax.optimize._graph import Graph
from mljax.optimize.passes import PASSES

__all__ = ["PASSES", "optimize"]


def optimize(fn: Function, compute_dtype: Callable, passes=None) -> tuple[Function, dict[str, int]]:
    """``(optimized copy of fn, {pass name: rewrites})``; ``passes`` defaults to :data:`PASSES`."""
    graph = Graph(fn, compute_dtype)
    stats = {}
    for p in PASSES if passes is None else passes:
        stats[p.__name__] = p(graph)
    return graph.fn, stats
