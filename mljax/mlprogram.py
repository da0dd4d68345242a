"""The ML program stage: a MIL function of the program, lowered to JAX."""
from __future__ import annotations

from mljax.errors import InputError
from mljax.features import feature_specs
from mljax.lower import LoweredFunction
from mljax.mil.from_proto import program_from_proto
from mljax.stage import Stage, register_stage_builder

__all__ = ["build_mlprogram_stage"]


def _description_of(spec, function_name: str):
    desc = spec.description
    for f in desc.functions:
        if f.name == function_name:
            return f
    return desc


@register_stage_builder("mlProgram")
def build_mlprogram_stage(spec, model_dir, *, function_name=None, compute_precision=None, **_):
    program = program_from_proto(spec.mlProgram, model_dir)
    name = function_name or spec.description.defaultFunctionName or "main"
    if name not in program.functions:
        raise InputError(f"function_name {name!r} is not in this program; it has {sorted(program.functions)}")
    lowered = LoweredFunction(program.functions[name], compute_precision)
    desc = _description_of(spec, name)
    states = feature_specs(desc.state)
    return Stage(
        fn=lowered, weights=lowered.weights,
        inputs=feature_specs(desc.input), outputs=feature_specs(desc.output), states=states,
        batchable=not states,
        info={"program": program, "function": name, "lowered": lowered},
    )
