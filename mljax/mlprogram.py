"""The ML program stage: a MIL function of the program, lowered to JAX."""
from __future__ import annotations

import jax
import numpy as np

from mljax.errors import InputError, ModelFormatError
from mljax.features import feature_specs
from mljax.cache import program_digest
from mljax.lower import LoweredFunction, is_weight, resolve_compute_precision
from mljax.mil.from_proto import program_from_proto
from mljax.stage import ClassLabels, Stage, batch_preparer, register_stage_builder

__all__ = ["build_mlprogram_stage"]


def _description_of(spec, function_name: str):
    desc = spec.description
    for f in desc.functions:
        if f.name == function_name:
            return f
    return desc


@register_stage_builder("mlProgram")
def build_mlprogram_stage(spec, model_dir, *, function_name=None, compute_precision=None, optimize=True, **_):
    program = program_from_proto(spec.mlProgram, model_dir)
    name = function_name or spec.description.defaultFunctionName or "main"
    if name not in program.functions:
        raise InputError(f"function_name {name!r} is not in this program; it has {sorted(program.functions)}")
    precision = resolve_compute_precision(compute_precision)
    lowered = LoweredFunction(program.functions[name], precision, optimize=optimize)
    desc = _description_of(spec, name)
    states = feature_specs(desc.state)
    inputs, outputs = feature_specs(desc.input), feature_specs(desc.output)
    classes, classifier = _classifier(program.functions[name], outputs)
    return Stage(
        fn=lowered, weights=lowered.weights,
        inputs=inputs, outputs=outputs, states=states,
        preprocess=_image_inputs(inputs), postprocess=_chain(_image_outputs(outputs), classifier),
        batchable=not states and not lowered.value_inputs,
        static_inputs=tuple(lowered.value_inputs),
        program=program, function=name, lowered=lowered, classes=classes,
        prepare=jax.jit(lowered.prepare) if lowered.prologue or lowered.derived else None, fp16_in_graph=True,
        prepare_batch=(batch_preparer(lowered.prepare_batch, lowered.batch_derived)
                       if lowered.batch_derivable else None),
        map_batch=lowered.map_batch,
        digest=program_digest(spec.mlProgram.SerializeToString(deterministic=True), _baked(lowered),
                              ("mlProgram", name, precision, bool(optimize))),
    )


def _baked(lowered: LoweredFunction):
    """The constants the trace bakes in (everything constant but the weights), in program order."""
    for op in lowered.fn.block.walk():
        for var in op.outputs:
            if var.value is not None and not is_weight(var):
                yield var.name, var.value


def _classifier(function, outputs):
    """A classifier program (a ``classify`` op; ``ct.ClassifierConfig``): its :class:`ClassLabels`
    and the postprocess that turns the op's class
    index and probability vector into the label and the ``{label: probability}`` dict."""
    from mljax.ops.classify import class_labels, class_outputs
    returned = {v.name for v in function.outputs}
    ops = [op for op in function.block.walk() if op.type == "classify"]
    if not ops:
        return None, None
    if len(ops) > 1:
        raise ModelFormatError(f"function {function.name!r} has {len(ops)} classify ops; expected at most one")
    op = ops[0]
    classes = op.input("classes")
    if classes is None or classes.value is None:
        raise ModelFormatError(f"classify op {op.name!r}: expected a constant list of classes; found none")
    labels = class_labels(classes.value)
    label_var, probs_var = (op.outputs + [None, None])[:2]
    used = {v.name for other in function.block.walk() for bound in other.inputs.values() for v in bound}
    if any(v is not None and (v.name in used or v.name not in returned) for v in (label_var, probs_var)):
        raise ModelFormatError(f"classify op {op.name!r}: its outputs must be outputs of the function "
                               f"and inputs of no other op (coremltools' rule)")
    label_name = label_var.name if label_var is not None and label_var.name in outputs else None
    probs_name = probs_var.name if probs_var is not None and probs_var.name in outputs else None
    return ClassLabels(labels, label_name, probs_name), class_outputs(labels, label_name, probs_name)


def _chain(*steps):
    """One host postprocess running ``steps`` (None ones skipped) in order."""
    steps = [s for s in steps if s is not None]
    if len(steps) <= 1:
        return steps[0] if steps else None

    def run(outputs: dict) -> dict:
        for step in steps:
            outputs = step(outputs)
        return outputs
    return run


def _image_inputs(specs):
    """Image inputs (PIL images or H x W x C arrays) -> the program's ``[1, C, H, W]`` tensors."""
    images = {n: s for n, s in specs.items() if s.kind == "image"}
    if not images:
        return None
    from mljax.neuralnetwork.images import image_to_array

    def preprocess(data: dict) -> dict:
        data = dict(data)
        for name, spec in images.items():
            if name in data:
                arr = image_to_array(data[name], spec)[None]
                data[name] = arr.astype(np.float16) if spec.color_space == "GRAYSCALE_FLOAT16" else arr
        return data
    return preprocess


def _image_outputs(specs):
    """The program's ``[1, C, H, W]`` image outputs -> PIL images, as Core ML returns them."""
    images = {n: s for n, s in specs.items() if s.kind == "image"}
    if not images:
        return None
    from mljax.neuralnetwork.images import array_to_image

    def postprocess(outputs: dict) -> dict:
        outputs = dict(outputs)
        for name, spec in images.items():
            if name in outputs and spec.color_space != "GRAYSCALE_FLOAT16":
                outputs[name] = array_to_image(outputs[name], spec.color_space)
        return outputs
    return postprocess
