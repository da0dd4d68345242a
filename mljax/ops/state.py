"""Stateful models (iOS18): read_state and coreml_update_state over the function's state inputs."""
from __future__ import annotations

from mljax.ops._registry import register


@register("read_state", "iOS18")
def read_state(input, *, ctx):
    """The state's current value (after any earlier update in this call)."""
    return ctx.state[ctx.input_vars["input"].name]


@register("coreml_update_state", "iOS18")
def coreml_update_state(state, value, *, ctx):
    """Write ``value`` into the state and return it."""
    ctx.state[ctx.input_vars["state"].name] = value
    return value
