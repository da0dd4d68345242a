"""Pipelines: stages of any model types, features flowing between them by name, jitted together."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mljax.errors import InputError, ModelFormatError
from mljax.features import feature_specs
from mljax.stage import PREPARED, Stage, build_stage, register_stage_builder, shared_fn

__all__ = ["build_pipeline_stage", "pipeline_of", "stage_names"]


def pipeline_of(spec):
    """The ``Pipeline`` message of a pipeline, pipeline classifier or pipeline regressor spec."""
    kind = spec.WhichOneof("Type")
    return spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline


def stage_names(pipe) -> list[str]:
    """Each stage's name (the spec's ``names``, else its index), unique."""
    names = [pipe.names[i] if i < len(pipe.names) and pipe.names[i] else f"stage{i}"
             for i in range(len(pipe.models))]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def _fit(value, spec):
    """Reshape a feature to the next stage's declared fixed shape when only the layout differs."""
    shape = getattr(spec, "shape", None)
    if spec is None or spec.kind != "multiArray" or not shape or spec.ranges or spec.enumerated:
        return value
    if tuple(value.shape) != tuple(shape) and int(np.prod(value.shape)) == int(np.prod(shape)):
        return jnp.reshape(value, shape)
    return value


@register_stage_builder("pipeline", "pipelineClassifier", "pipelineRegressor")
def build_pipeline_stage(spec, model_dir, **options) -> Stage:
    pipe = pipeline_of(spec)
    if not pipe.models:
        raise ModelFormatError(f"{spec.WhichOneof('Type')}: expected at least one model; found none")
    names = stage_names(pipe)
    stages = [build_stage(m, model_dir, **options) for m in pipe.models]
    inputs = feature_specs(spec.description.input)
    outputs = feature_specs(spec.description.output)
    available = set(inputs)
    for name, st in zip(names, stages):
        needed = [k for k, s in st.inputs.items() if k not in available and not s.optional]
        if needed:
            raise InputError(f"pipeline stage {name!r} needs features {needed} that no earlier stage "
                             f"or pipeline input provides (available: {sorted(available)})")
        available |= set(st.outputs) | set(getattr(st.fn, "output_names", ()) or ())
    out_names = list(outputs) or list(stages[-1].outputs)
    plan = tuple((name, st.fn, tuple(st.inputs.items())) for name, st in zip(names, stages))
    keys = [st.fn_key for st in stages]
    fn_key = None if None in keys else ("pipeline", tuple(names), tuple(keys),
                                        tuple(p[2] for p in plan), tuple(out_names))
    make = lambda: _pipeline_fn(plan, out_names)   # noqa: E731
    preps = tuple((name, st.prepare) for name, st in zip(names, stages) if st.prepare is not None)
    return Stage(
        fn=make() if fn_key is None else shared_fn(fn_key, make),
        weights={n: st.weights for n, st in zip(names, stages)},
        inputs=inputs, outputs=outputs,
        preprocess=stages[0].preprocess, postprocess=stages[-1].postprocess,
        batchable=all(st.batchable for st in stages),
        children=dict(zip(names, stages)),
        x64=all(st.x64 for st in stages), fn_key=fn_key,
        prepare=_pipeline_prepare(preps) if preps else None,
    )


def _pipeline_prepare(preps: tuple):
    """``Stage.prepare`` of a pipeline: each stage's own prepared values, by stage name."""
    def prepare(weights):
        return {name: fn(weights[name]) for name, fn in preps}
    return prepare


def _pipeline_fn(plan: tuple, out_names: list):
    """The stages' functions in sequence, features flowing by name."""
    def fn(weights, features, states):
        feats, outs = dict(features), {}
        prepared = weights.get(PREPARED) or {}
        for name, stage_fn, stage_inputs in plan:
            specs = dict(stage_inputs)
            ins = {k: _fit(jnp.asarray(feats[k]), specs.get(k)) for k in specs if k in feats}
            w = weights[name] if name not in prepared else {**weights[name], PREPARED: prepared[name]}
            outs, _ = stage_fn(w, ins, {})
            feats.update(outs)
        # the last stage's raw outputs feed its postprocess (e.g. class labels)
        return {**outs, **{k: feats[k] for k in out_names if k in feats}}, states
    return fn
