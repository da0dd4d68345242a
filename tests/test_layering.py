"""The import layering of docs/architecture.md, enforced: each mljax module imports only modules of
its own layer or below, module-level imports form no cycle, and mljax never imports updatable or
converters (they build on mljax, not the reverse)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first.  A module's layer is that of its longest listed prefix.
LAYERS = [
    ("mljax.errors", "mljax.proto", "mljax._lazy", "mljax.cpu"),    # 0 base
    ("mljax.mil", "mljax.format"),                                      # 1 the IR, its op table, files
    ("mljax.ops",),                                                     # 2 the op library
    ("mljax.optimize", "mljax.features", "mljax.schedule"),            # 3 graph passes, feature types, batch plans
    ("mljax.lower", "mljax.stage", "mljax.classic", "mljax.neuralnetwork", "mljax.pipeline"),  # 4 stages
    ("mljax.mlprogram", "mljax.cache", "mljax.distribute", "mljax.packing", "mljax.writer", "mljax.inspect"),  # 5 services
    ("mljax.model",),                                                   # 6 MLModel
    ("mljax.coremltools", "mljax.cli", "mljax.bench_cli", "mljax.__main__", "mljax"),         # 7 front doors
]
# Function-level imports that reach up, and why they are not a layering breach.
LAZY_UPWARD = {
    ("mljax.cache", "mljax"): "reads mljax.__version__ for the executable-cache key",
    ("mljax.ops._registry", "mljax.ops"): "imports the op modules (its own package) to fill the registry",
}


def _layer(module: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{module} is in no layer of tests/test_layering.py: add it (and to docs/architecture.md)"
    return layer


def _modules() -> dict[str, Path]:
    out = {}
    for f in (ROOT / "mljax").rglob("*.py"):
        if f.name.endswith("_pb2.py"):
            continue
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(path: Path, modules) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            names = subs or [node.module]
        for name in names:
            if name.split(".")[0] in ("mljax", "updatable", "converters"):
                found.append((name, id(node) in top))
    return found


def test_layers_and_no_cycles():
    modules = _modules()
    breaches, graph = [], {}
    for mod, path in sorted(modules.items()):
        graph[mod] = set()
        for name, module_level in _imports(path, modules):
            assert not name.startswith(("updatable", "converters")), \
                f"{mod} imports {name}: mljax must not depend on updatable/converters (use entry points)"
            if name == mod:
                continue
            if module_level:
                graph[mod].add(name)
            if _layer(name) > _layer(mod) and (mod, name) not in LAZY_UPWARD:
                breaches.append(f"{mod} (layer {_layer(mod)}) imports {name} (layer {_layer(name)})")
    assert not breaches, "\n".join(breaches)

    # no cycle among module-level imports (a package's __init__ importing its own modules is not one)
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, d]))
            if d in graph and not state.get(d):
                visit(d, stack + [m])
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m, [])


def test_ir_and_writer_do_not_import_the_op_library():
    """Reading and writing programs needs the op table (mljax.mil.opspec), never the implementations."""
    modules = _modules()
    for mod in ("mljax.mil.to_proto", "mljax.mil.from_proto", "mljax.mil.text", "mljax.writer"):
        names = [n for n, _ in _imports(modules[mod], modules)]
        assert not any(n.startswith("mljax.ops") for n in names), (mod, names)
