"""MIL op implementations, one module per op family; see :mod:`mljax.ops._registry`."""
from mljax.ops._registry import OpContext, OpSpec, lookup, register, registry

__all__ = ["OpContext", "OpSpec", "lookup", "register", "registry"]
