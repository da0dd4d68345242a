"""The op registry: ``{op_type: {opset: OpSpec}}``.

An op implementation is a plain function whose signature is its spec:

* positional parameters are tensor inputs, in MIL order (a parameter with a default is
  optional; ``*name`` is a variadic input such as ``concat``'s ``values``);
* keyword-only parameters are inputs that must be known before tracing (axes, shapes,
  modes): the lowering passes them as NumPy values / Python scalars and fails with
  :class:`~mljax.errors.OpError` when they are not constant;
* a keyword-only parameter named ``ctx`` receives the :class:`OpContext`.

It returns one array or a tuple of arrays (one per MIL output).  Lookup picks the
highest registered opset <= the function's opset, so a newer opset registers only
the ops it changed.

*Internal* ops (:func:`register_internal`, types named ``mljax.*``) are no MIL ops: mljax's graph
passes (:mod:`mljax.optimize`) write them into the optimized copy of a program, which is
lowered and never saved.  They are found only by ``lookup(..., internal=True)`` (the lowering's
calls), not in :func:`registry` nor by the check that a loaded program's ops are supported, so
a program that names one is refused like any unknown op.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from mljax.mil.opspec import OPSETS, opset_number

__all__ = ["OpSpec", "OpContext", "register", "register_internal", "lookup", "registry", "OPSETS", "opset_number"]

# OPSETS / opset_number: defined with the op input table in the IR layer (mljax.mil.opspec)


@dataclass(frozen=True)
class OpSpec:
    """What the lowering needs to call one op implementation."""

    op_type: str
    opset: int
    fn: Callable
    tensor_inputs: tuple[str, ...]
    optional_inputs: frozenset[str]
    variadic: str | None
    static_inputs: tuple[str, ...]
    static_defaults: dict[str, Any]
    wants_ctx: bool


@dataclass
class OpContext:
    """Per-op information for implementations that need more than their inputs.

    ``output_types`` are the declared MIL types of the outputs, ``blocks`` the op's
    nested blocks as callables ``block(*inputs) -> tuple(outputs)``, ``compute_dtype``
    maps a declared dtype to the one to compute in (fp16 -> fp32 when the model runs
    at ``compute_precision="float32"``), ``rng`` a fresh PRNG key for random ops.
    ``state`` is the mutable mapping of state variables for state ops.  ``hints`` are what
    mljax's graph passes noted on the op (``Operation.attributes[HINTS]``), e.g. conv's
    ``after_costly_op``; never inputs of the program.
    """

    op_type: str
    name: str
    opset: int
    output_types: tuple = ()
    blocks: tuple = ()
    compute_dtype: Callable = lambda dt: dt
    rng: Any = None
    state: dict = field(default_factory=dict)
    input_vars: dict = field(default_factory=dict)
    hints: dict = field(default_factory=dict)     # the graph layer's notes on this op (mljax.optimize)
    # values computed once per weight values for this op (the lowering's prepared weights, e.g.
    # conv's Winograd transforms and HWIO layout under "weights"); empty when the call computes them itself
    prepared: dict = field(default_factory=dict)


# The attribute under which graph passes leave hints for an op's implementation (OpContext.hints).
HINTS = "_mljax_hints"

_REGISTRY: dict[str, dict[int, OpSpec]] = {}
_INTERNAL: dict[str, OpSpec] = {}


def _spec_of(op_type: str, opset: int, fn: Callable) -> OpSpec:
    tensor, optional, static, defaults = [], set(), [], {}
    variadic, wants_ctx = None, False
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            tensor.append(p.name)
            if p.default is not p.empty:
                optional.add(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            variadic = p.name
        elif p.kind is p.KEYWORD_ONLY:
            if p.name == "ctx":
                wants_ctx = True
                continue
            static.append(p.name)
            if p.default is not p.empty:
                defaults[p.name] = p.default
    return OpSpec(op_type, opset, fn, tuple(tensor), frozenset(optional), variadic,
                  tuple(static), defaults, wants_ctx)


def register(op_type: str, opset: str | int = 15, *, aliases: tuple[str, ...] = ()):
    """Decorator: register ``fn`` as ``op_type`` from ``opset`` on (default iOS15)."""
    number = opset_number(opset)

    def deco(fn: Callable) -> Callable:
        for name in (op_type, *aliases):
            versions = _REGISTRY.setdefault(name, {})
            if number in versions:
                raise RuntimeError(f"op {name!r} registered twice for iOS{number}")
            versions[number] = _spec_of(name, number, fn)
        return fn

    return deco


def register_internal(op_type: str):
    """Decorator: register ``fn`` as the internal op ``op_type`` (``mljax.<name>``), one version for
    every opset; see the module docstring."""
    if not op_type.startswith("mljax."):
        raise RuntimeError(f"internal op {op_type!r}: internal op types are named 'mljax.<name>'")

    def deco(fn: Callable) -> Callable:
        if op_type in _INTERNAL:
            raise RuntimeError(f"internal op {op_type!r} registered twice")
        _INTERNAL[op_type] = _spec_of(op_type, 0, fn)
        return fn

    return deco


def lookup(op_type: str, opset: str | int, *, internal: bool = False) -> OpSpec | None:
    """The implementation of ``op_type`` for a function of ``opset``, or None; ``internal`` also
    finds mljax's internal ops (the lowering of an optimized program)."""
    _ensure_loaded()
    versions = _REGISTRY.get(op_type)
    if not versions:
        return _INTERNAL.get(op_type) if internal else None
    number = opset_number(opset)
    usable = [v for v in versions if v <= number]
    return versions[max(usable)] if usable else None


def registry() -> dict[str, dict[int, OpSpec]]:
    """A copy of the whole registry (for docs and ``mljax info``)."""
    _ensure_loaded()
    return {k: dict(v) for k, v in _REGISTRY.items()}


_LOADED = False


def _ensure_loaded() -> None:
    """Import every op family module once (explicit list, no import side effects elsewhere)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    from mljax import ops

    for info in sorted(pkgutil.iter_modules(ops.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"mljax.ops.{info.name}")
