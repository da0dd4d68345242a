"""MIL elementwise binary ops (coremltools ``defs/iOS15/elementwise_binary.py``; no later deltas).

NumPy broadcasting.  ``x`` and ``y`` share one dtype T in MIL (fp16, fp32, int32; bool for the
logical ops); comparisons return bool.  Integer semantics follow MIL's definitions
(Python operators): ``floor_div`` rounds towards -inf, ``mod`` takes the sign of the divisor,
and ``real_div`` on int32 truncates towards zero (what Core ML's ML program backend returns).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mljax.ops._registry import register

__all__ = [
    "add", "sub", "mul", "real_div", "floor_div", "mod", "pow", "maximum", "minimum",
    "equal", "not_equal", "less", "less_equal", "greater", "greater_equal",
    "logical_and", "logical_or", "logical_xor",
]


def _binary(name: str, fn, doc: str):
    """Register a two-input op ``name`` computing ``fn(x, y)``."""
    def op(x, y):
        return fn(x, y)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = doc
    return register(name)(op)


def _is_int(x, y) -> bool:
    return jnp.issubdtype(jnp.result_type(x, y), jnp.integer)


def _real_div(x, y):
    if _is_int(x, y):
        dt = jnp.result_type(x, y)
        return jax.lax.div(jnp.asarray(x, dt), jnp.asarray(y, dt))
    return jnp.true_divide(x, y)


add = _binary("add", jnp.add, "``x + y``.")
sub = _binary("sub", jnp.subtract, "``x - y``.")
mul = _binary("mul", jnp.multiply, "``x * y``.")
real_div = _binary("real_div", _real_div,
                   "``x / y``; int32 inputs give int32, truncated towards zero.")
floor_div = _binary("floor_div", jnp.floor_divide,
                    "``x / y`` rounded towards -inf (Python ``//``, also for negative ints).")
mod = _binary("mod", jnp.remainder,
              "``x % y`` with the sign of ``y`` (Python ``%``, as MIL's definition).")
pow = _binary("pow", jnp.power, "``x ** y``.")
maximum = _binary("maximum", jnp.maximum, "Elementwise maximum.")
minimum = _binary("minimum", jnp.minimum, "Elementwise minimum.")
equal = _binary("equal", jnp.equal, "``x == y`` as bool.")
not_equal = _binary("not_equal", jnp.not_equal, "``x != y`` as bool.")
less = _binary("less", jnp.less, "``x < y`` as bool.")
less_equal = _binary("less_equal", jnp.less_equal, "``x <= y`` as bool.")
greater = _binary("greater", jnp.greater, "``x > y`` as bool.")
greater_equal = _binary("greater_equal", jnp.greater_equal, "``x >= y`` as bool.")
logical_and = _binary("logical_and", jnp.logical_and, "Boolean AND.")
logical_or = _binary("logical_or", jnp.logical_or, "Boolean OR.")
logical_xor = _binary("logical_xor", jnp.logical_xor, "Boolean XOR.")
