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
    name = ctx.input_vars["state"].name
    old = ctx.state[name]
    ctx.state[name] = value.astype(old.dtype) if hasattr(old, "dtype") and hasattr(value, "astype") else value
    return value


@register("write_state", "iOS18")
def write_state(input, data, *, ctx):
    """Write ``data`` into the state (no outputs); how coremltools saves coreml_update_state."""
    name = ctx.input_vars["input"].name
    old = ctx.state[name]
    ctx.state[name] = data.astype(old.dtype) if hasattr(old, "dtype") and hasattr(data, "astype") else data
    return ()
