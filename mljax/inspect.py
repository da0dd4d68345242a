"""Describe a Core ML model without running it (what ``mljax info`` prints).

Reads the spec only: nothing here imports JAX (unsupported ops come from the generated
``mljax/ops/_supported.py``), so ``mljax info`` starts in a fraction of a second.
"""
from __future__ import annotations

from collections import Counter

from mljax.features import Features, feature_specs
from mljax.format.package import load_spec
from mljax.ops._registry import opset_number

__all__ = ["classifier_notes", "describe", "unsupported_ops", "update_description", "weight_bytes"]

_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
_PIPELINES = ("pipeline", "pipelineClassifier", "pipelineRegressor")


def _walk_models(spec, prefix=""):
    """(name, spec) of the model and every pipeline stage inside it."""
    yield prefix or "model", spec
    kind = spec.WhichOneof("Type")
    if kind in _PIPELINES:
        pipe = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
        for i, m in enumerate(pipe.models):
            name = pipe.names[i] if i < len(pipe.names) else str(i)
            yield from _walk_models(m, f"{prefix or 'model'}/{name}")


def _program_ops(spec):
    """(function, opset, Counter of op types) of each ML program function, from the proto."""
    def walk_block(block, counter):
        for op in block.operations:
            counter[op.type] += 1
            for b in op.blocks:
                walk_block(b, counter)

    for fname, fn in spec.mlProgram.functions.items():
        counter = Counter()
        block = fn.block_specializations.get(fn.opset)
        if block is not None:
            walk_block(block, counter)
        yield fname, fn.opset, counter


def _is_supported(op: str, opset: str) -> bool:
    from mljax.ops._supported import SUPPORTED
    number = opset_number(opset)
    return any(v <= number for v in SUPPORTED.get(op, ()))


def unsupported_ops(spec) -> list[tuple[str, str]]:
    """``(op, opset)`` pairs that mljax cannot run, across all functions and stages."""
    missing = set()
    for _, sub in _walk_models(spec):
        if sub.WhichOneof("Type") == "mlProgram":
            for _, opset, counter in _program_ops(sub):
                missing |= {(op, opset) for op in counter if op != "const" and not _is_supported(op, opset)}
    return sorted(missing)


# --- weights ---------------------------------------------------------------------------------
_SKIP_FIELDS = {"description", "mlProgram"}   # feature descriptions; ML program weights live in blob files


def _spec_weight_bytes(msg) -> int:
    """Bytes of parameters a spec holds inline: NeuralNetwork ``WeightParams`` (float, fp16, raw and
    int8 values) and the repeated float/double parameters of classic models (GLM weights, SVM
    coefficients, kNN samples ...)."""
    from google.protobuf.descriptor import FieldDescriptor as F
    if msg.DESCRIPTOR.name == "WeightParams":
        return (4 * len(msg.floatValue) + len(msg.float16Value) + len(msg.rawValue) + len(msg.int8RawValue))
    total = 0
    for field, value in msg.ListFields():
        if field.name in _SKIP_FIELDS:
            continue
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                items = value.values()
                if field.message_type.fields_by_name["value"].type != F.TYPE_MESSAGE:
                    continue
            else:
                items = value if field.is_repeated else [value]
            total += sum(_spec_weight_bytes(m) for m in items)
        elif field.is_repeated and field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            total += len(value) * (4 if field.type == F.TYPE_FLOAT else 8)
    return total


def weight_bytes(loaded) -> int:
    """All weight bytes of a model: ML program blob files plus parameters held in the spec."""
    blobs = 0
    if loaded.model_dir is not None and any(
            sub.WhichOneof("Type") == "mlProgram" for _, sub in _walk_models(loaded.spec)):
        blobs = sum(p.stat().st_size for p in loaded.model_dir.glob("weights/*") if p.is_file())
    return blobs + _spec_weight_bytes(loaded.spec)


# --- on-device update --------------------------------------------------------------------------
def _param_text(name: str, p, kind: str) -> str:
    """``name: default (allowed ...)`` of an Int64/Double/Bool parameter."""
    value = p.defaultValue
    text = f"{name}: {value if kind != 'bool' else str(bool(value)).lower()}"
    allowed = p.WhichOneof("AllowedValues") if kind != "bool" else None
    if allowed == "range":
        text += f" (allowed {p.range.minValue} .. {p.range.maxValue})"
    elif allowed == "set":
        text += f" (allowed {_set_text(sorted(p.set.values))})"
    return text


def _set_text(values: list) -> str:
    """``{1, 2, 4}``; consecutive integers as ``{1..256}``."""
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    shown = ", ".join(map(str, values[:12])) + (f", ... ({len(values)} values)" if len(values) > 12 else "")
    return f"{{{shown}}}"


def _nn_update_lines(nn) -> list[str]:
    u = nn.updateParams
    lines = []
    trainable = [layer.name for layer in nn.layers if layer.isUpdatable]
    if trainable:
        lines.append(f"updatable layers: {', '.join(trainable)}")
    for loss in u.lossLayers:
        which = loss.WhichOneof("LossLayerType")
        if which is not None:
            body = getattr(loss, which)
            kind = {"categoricalCrossEntropyLossLayer": "categorical cross-entropy",
                    "meanSquaredErrorLossLayer": "mean squared error"}.get(which, which)
            lines.append(f"loss: {loss.name} ({kind}; input {body.input}, target {body.target})")
    which = u.optimizer.WhichOneof("OptimizerType")
    if which is not None:
        opt = getattr(u.optimizer, which)
        params = [("learning rate", "learningRate", "double"), ("mini-batch size", "miniBatchSize", "int"),
                  ("momentum", "momentum", "double"), ("beta1", "beta1", "double"),
                  ("beta2", "beta2", "double"), ("eps", "eps", "double")]
        lines.append(f"optimizer: {'SGD' if which == 'sgdOptimizer' else 'Adam'}")
        lines += [f"  {_param_text(label, getattr(opt, field), kind)}" for label, field, kind in params
                  if field in opt.DESCRIPTOR.fields_by_name and opt.HasField(field)]
    if u.HasField("epochs"):
        lines.append(_param_text("epochs", u.epochs, "int"))
    if u.HasField("shuffle"):
        lines.append(_param_text("shuffle", u.shuffle, "bool"))
    if u.HasField("seed"):
        lines.append(_param_text("seed", u.seed, "int"))
    return lines


def update_description(spec) -> list[str]:
    """What an updatable model trains on and how: training inputs, updatable layers, loss,
    optimizer and the allowed values of its parameters, epochs, shuffle (one text line each)."""
    if not spec.isUpdatable:
        return []
    training = feature_specs(spec.description.trainingInput)
    lines = ["training inputs:"] + [f"  {name}: {fs}" for name, fs in training.items()]
    for name, sub in _walk_models(spec):
        kind = sub.WhichOneof("Type")
        body = []
        if kind in _NN_KINDS and getattr(sub, kind).HasField("updateParams"):
            body = _nn_update_lines(getattr(sub, kind))
        elif kind == "kNearestNeighborsClassifier":
            body = [_param_text("number of neighbors", sub.kNearestNeighborsClassifier.numberOfNeighbors, "int")]
        if body:
            lines.append(f"updatable stage {name} ({kind}):")
            lines += [f"  {line}" for line in body]
    return lines


# --- the summary --------------------------------------------------------------------------------
def describe(model, weights_dir=None, *, mil: bool = False) -> str:
    """A human-readable summary of a model."""
    loaded = load_spec(model, weights_dir)
    spec = loaded.spec
    lines = [f"model: {loaded.path or '<in memory>'}",
             f"specification version: {spec.specificationVersion}",
             f"updatable: {spec.isUpdatable}"]
    desc = spec.description
    if desc.metadata.shortDescription:
        lines.append(f"description: {desc.metadata.shortDescription}")
    notes = classifier_notes(spec)
    for title, feats in (("inputs", desc.input), ("outputs", desc.output), ("states", desc.state)):
        if len(feats):
            lines.append(f"{title}:")
            lines += [f"  {line.strip()}" for line in
                      repr(Features(feature_specs(feats), notes if title == "outputs" else None)).splitlines()[1:-1]]
    lines += update_description(spec)
    programs = []
    for name, sub in _walk_models(spec):
        kind = sub.WhichOneof("Type")
        lines.append(f"{name}: {kind}")
        if kind == "mlProgram":
            programs.append((name, sub))
            for fname, opset, counter in _program_ops(sub):
                lines.append(f"  function {fname} (opset {opset}, {sum(counter.values())} ops)")
                lines += [f"    {op:32s} {n}" for op, n in counter.most_common()]
        elif kind in _NN_KINDS:
            nn = getattr(sub, kind)
            counter = Counter(layer.WhichOneof("layer") for layer in nn.layers)
            lines.append(f"  {len(nn.layers)} layers")
            lines += [f"    {op:32s} {n}" for op, n in counter.most_common()]
    lines.append(f"weight bytes: {weight_bytes(loaded)}")
    missing = unsupported_ops(spec)
    lines.append("unsupported ops: " + (", ".join(f"{op} ({opset})" for op, opset in missing) or "none"))
    if mil:
        lines += _mil_text(programs, loaded.model_dir)
    return "\n".join(lines)


def _mil_text(programs, model_dir) -> list[str]:
    """The MIL text of every ML program (the model itself or its pipeline stages)."""
    if not programs:
        return ["", "(no ML program: --mil prints nothing for this model type)"]
    from mljax.mil.from_proto import program_from_proto
    from mljax.mil.text import program_to_text
    lines = []
    for name, sub in programs:
        lines += ["", f"# {name}" if name != "model" else "# the ML program",
                  program_to_text(program_from_proto(sub.mlProgram, model_dir))]
    return lines


def classifier_notes(spec) -> dict:
    """A classifier's output remarks (predicted feature, class labels), from the spec alone."""
    labels = _class_labels(spec)
    if labels is None:
        return {}
    desc = spec.description
    shown = ", ".join(map(repr, labels[:10])) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
    notes = {}
    if desc.predictedFeatureName:
        notes[desc.predictedFeatureName] = f"predicted class label, one of {len(labels)}"
    if desc.predictedProbabilitiesName:
        notes[desc.predictedProbabilitiesName] = f"probability of each class label: {shown}"
    return notes


def _class_labels(spec) -> list | None:
    """The class labels of a classifier spec: a classic or NeuralNetwork classifier's label list,
    an ML program's ``classify`` op, or the last stage of a pipeline classifier."""
    kind = spec.WhichOneof("Type")
    if kind is None:
        return None
    if kind in _PIPELINES:
        pipe = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
        return _class_labels(pipe.models[-1]) if len(pipe.models) else None
    if kind == "mlProgram":
        return _program_class_labels(spec)
    params = getattr(spec, kind)
    which = params.WhichOneof("ClassLabels") if "ClassLabels" in params.DESCRIPTOR.oneofs_by_name else None
    if which == "stringClassLabels":
        return list(params.stringClassLabels.vector)
    if which == "int64ClassLabels":
        return [int(v) for v in params.int64ClassLabels.vector]
    return None


def _program_class_labels(spec) -> list | None:
    """The ``classes`` of an ML program's ``classify`` op (read from the proto: a list of
    int64 or string immediates)."""
    for fn in spec.mlProgram.functions.values():
        block = fn.block_specializations.get(fn.opset)
        for op in (block.operations if block is not None else ()):
            if op.type != "classify" or "classes" not in op.inputs:
                continue
            arg = op.inputs["classes"].arguments[0]
            if arg.WhichOneof("binding") == "value":
                value = arg.value
            else:   # a const op's output
                value = next((c.attributes["val"] for c in block.operations
                              if c.type == "const" and c.outputs and c.outputs[0].name == arg.name), None)
            if value is None or value.WhichOneof("value") != "immediateValue":
                return None
            labels = []
            for item in value.immediateValue.list.values:
                t = item.immediateValue.tensor
                which = t.WhichOneof("value")
                vals = list(getattr(t, which).values) if which else []
                labels += [v.decode() if isinstance(v, bytes) else (int(v) if which == "longInts" or
                           which == "ints" else v) for v in vals]
            return labels
    return None
