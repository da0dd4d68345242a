"""Describe a Core ML model without running it (what ``mljax info`` prints)."""
from __future__ import annotations

from collections import Counter

from mljax.features import feature_specs
from mljax.format.package import load_spec
from mljax.ops._registry import lookup, opset_number

__all__ = ["describe", "unsupported_ops"]


def _walk_models(spec, prefix=""):
    """(name, spec) of the model and every pipeline stage inside it."""
    yield prefix or "model", spec
    kind = spec.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
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


def unsupported_ops(spec) -> list[tuple[str, str]]:
    """``(op, opset)`` pairs that mljax cannot run, across all functions and stages."""
    missing = set()
    for _, sub in _walk_models(spec):
        if sub.WhichOneof("Type") == "mlProgram":
            for _, opset, counter in _program_ops(sub):
                missing |= {(op, opset) for op in counter
                            if op != "const" and lookup(op, opset_number(opset)) is None}
    return sorted(missing)


def _weight_bytes(loaded) -> int:
    if loaded.model_dir is None:
        return 0
    return sum(p.stat().st_size for p in loaded.model_dir.glob("weights/*") if p.is_file())


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
    for title, feats in (("inputs", desc.input), ("outputs", desc.output), ("states", desc.state)):
        if len(feats):
            lines.append(f"{title}:")
            lines += [f"  {name}: {fs}" for name, fs in feature_specs(feats).items()]
    for name, sub in _walk_models(spec):
        kind = sub.WhichOneof("Type")
        lines.append(f"{name}: {kind}")
        if kind == "mlProgram":
            for fname, opset, counter in _program_ops(sub):
                lines.append(f"  function {fname} (opset {opset}, {sum(counter.values())} ops)")
                lines += [f"    {op:32s} {n}" for op, n in counter.most_common()]
        elif kind in ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor"):
            nn = getattr(sub, kind)
            counter = Counter(layer.WhichOneof("layer") for layer in nn.layers)
            lines.append(f"  {len(nn.layers)} layers")
            lines += [f"    {op:32s} {n}" for op, n in counter.most_common()]
    lines.append(f"weight bytes: {_weight_bytes(loaded)}")
    missing = unsupported_ops(spec)
    lines.append("unsupported ops: " + (", ".join(f"{op} ({opset})" for op, opset in missing) or "none"))
    if mil and spec.WhichOneof("Type") == "mlProgram":
        from mljax.mil.from_proto import program_from_proto
        from mljax.mil.text import program_to_text
        lines += ["", program_to_text(program_from_proto(spec.mlProgram, loaded.model_dir))]
    return "\n".join(lines)
