"""Transcribe the Core ML format's schema facts into this project's ``.proto`` sources.

Field names, numbers, types and labels are facts of the file format and must match
Apple's bit for bit.  This tool reads them from the descriptors of an installed
coremltools wheel and writes ``mljax/proto/*.proto`` under this project's own package
name (``mljax.spec``, so both schemas can live in one process).  No comments or other
prose are carried over.  It is run by hand when Apple extends the format; the Python
modules are then regenerated with ``python scripts/gen_proto.py``.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

PACKAGE = "mljax.spec"
SOURCE_PACKAGE = "CoreML.Specification"
OUT = Path(__file__).resolve().parents[1] / "mljax" / "proto"

_SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
    7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32",
    16: "sfixed64", 17: "sint32", 18: "sint64",
}


def _type_name(name: str) -> str:
    name = name.lstrip(".")
    if name == SOURCE_PACKAGE:
        name = PACKAGE
    elif name.startswith(SOURCE_PACKAGE + "."):
        name = PACKAGE + "." + name[len(SOURCE_PACKAGE) + 1:]
    return "." + name


def _field_type(f, nested_maps) -> str:
    if f.type in (11, 14):  # message, enum
        entry = nested_maps.get(f.type_name)
        if entry is not None:
            key, value = entry
            return f"map<{key}, {value}>"
        return _type_name(f.type_name)
    return _SCALARS[f.type]


def _emit_enum(e, indent: str, out: list[str]) -> None:
    out.append(f"{indent}enum {e.name} {{")
    for v in e.value:
        out.append(f"{indent}    {v.name} = {v.number};")
    out.append(f"{indent}}}")


def _emit_message(m, scope: str, indent: str, out: list[str]) -> None:
    full = f"{scope}.{m.name}"
    maps = {}
    for nt in m.nested_type:
        if nt.options.map_entry:
            k, v = nt.field
            maps[f"{full}.{nt.name}"] = (_field_type(k, {}), _field_type(v, {}))
    maps_src = {"." + k.replace(PACKAGE, SOURCE_PACKAGE, 1).lstrip("."): v for k, v in maps.items()}
    maps_src.update({"." + k.lstrip("."): v for k, v in maps.items()})
    out.append(f"{indent}message {m.name} {{")
    for e in m.enum_type:
        _emit_enum(e, indent + "    ", out)
    for nt in m.nested_type:
        if not nt.options.map_entry:
            _emit_message(nt, full, indent + "    ", out)
    oneof_fields: dict[int, list] = {}
    for f in m.field:
        if f.HasField("oneof_index") and not f.proto3_optional:
            oneof_fields.setdefault(f.oneof_index, []).append(f)
    emitted_oneofs = set()
    for f in m.field:
        if f.HasField("oneof_index") and not f.proto3_optional:
            idx = f.oneof_index
            if idx in emitted_oneofs:
                continue
            emitted_oneofs.add(idx)
            out.append(f"{indent}    oneof {m.oneof_decl[idx].name} {{")
            for g in oneof_fields[idx]:
                out.append(f"{indent}        {_field_type(g, maps_src)} {g.name} = {g.number};")
            out.append(f"{indent}    }}")
            continue
        ftype = _field_type(f, maps_src)
        label = ""
        if f.label == 3 and not ftype.startswith("map<"):
            label = "repeated "
        elif f.proto3_optional:
            label = "optional "
        opts = ""
        if f.options.HasField("packed"):
            opts = f" [packed = {'true' if f.options.packed else 'false'}]"
        out.append(f"{indent}    {label}{ftype} {f.name} = {f.number}{opts};")
    for r in m.reserved_range:
        out.append(f"{indent}    reserved {r.start} to {r.end - 1};" if r.end - 1 > r.start else f"{indent}    reserved {r.start};")
    out.append(f"{indent}}}")


def transcribe(module) -> tuple[str, str]:
    fdp = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fdp)
    out = [
        "// Core ML model format schema, transcribed by scripts/transcribe_coreml_schema.py.",
        "// Field names and numbers are facts of Apple's format; see that script before editing.",
        'syntax = "proto3";',
        "option optimize_for = LITE_RUNTIME;",
        "",
    ]
    for dep in fdp.dependency:
        out.append(f'import public "mljax/proto/{dep}";' if dep in [fdp.dependency[i] for i in fdp.public_dependency] else f'import "mljax/proto/{dep}";')
    package = _type_name(fdp.package).lstrip(".")
    out += ["", f"package {package};", ""]
    for e in fdp.enum_type:
        _emit_enum(e, "", out)
        out.append("")
    for m in fdp.message_type:
        _emit_message(m, "." + package, "", out)
        out.append("")
    return fdp.name, "\n".join(out)


def main() -> int:
    # Every file reachable from Model.proto: the schema of a Core ML model.
    todo, seen = ["Model"], set()
    while todo:
        stem = todo.pop()
        if stem in seen:
            continue
        seen.add(stem)
        mod = importlib.import_module(f"coremltools.proto.{stem}_pb2")
        todo += [d.name[: -len(".proto")] for d in mod.DESCRIPTOR.dependencies]
        name, text = transcribe(mod)
        (OUT / name).write_text(text + "\n")
        print("wrote", OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
