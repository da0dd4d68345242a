"""MIL IR -> readable text, one line per op::

    program(version=1)
    func main<CoreML7>(%x: tensor<fp32, [1, 4]>) {
      %y: tensor<fp32, [1, 4]> = relu(x=%x)
    } -> (%y)

Constants show their value when small (at most 8 elements), else a summary with the blob
location; variadic inputs print as ``values=(%a, %b)``; nested blocks are indented under
their op, each as ``block(%inputs) { ... } -> (%outputs)``.
"""
from __future__ import annotations

import numpy as np

from mljax.mil.ir import Block, Function, Operation, Program, Var
from mljax.mil.to_proto import input_order_key

__all__ = ["program_to_text", "function_to_text"]

_MAX_INLINE = 8
_INDENT = "  "


def _literal(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_literal(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    arr = np.asarray(value)
    if arr.dtype.kind in "OUS":
        return _literal(arr.item()) if arr.ndim == 0 else _literal(arr.tolist())
    if arr.size > _MAX_INLINE:
        return f"<{arr.dtype.name} {'x'.join(map(str, arr.shape))}>"
    if arr.dtype.kind == "b":
        flat = ["true" if b else "false" for b in arr.ravel()]
    elif arr.dtype.kind in "iu":
        flat = [str(int(i)) for i in arr.ravel()]
    else:
        flat = [repr(float(f)) for f in arr.astype(np.float64).ravel()]
    if arr.ndim == 0:
        return flat[0]
    return "[" + ", ".join(flat) + "]"


def _const_text(var: Var) -> str:
    if var.blob is not None and isinstance(var.value, np.ndarray) and var.value.size > _MAX_INLINE:
        file_name, offset = var.blob
        return f"{_literal(var.value)} @ {file_name}:{offset}"
    return _literal(var.value)


def _arg(var: Var, defined: set) -> str:
    if var.name in defined or var.value is None:
        return f"%{var.name}"
    return _const_text(var)


def _op_lines(op: Operation, defined: set, depth: int, opset: str) -> list[str]:
    pad = _INDENT * depth
    outs = ", ".join(f"%{v.name}: {v.type}" for v in op.outputs)
    args = []
    order = input_order_key(op.type, opset)
    for key in sorted(op.inputs, key=order):
        bound = op.inputs[key]
        if len(bound) == 1:
            args.append(f"{key}={_arg(bound[0], defined)}")
        else:
            args.append(f"{key}=(" + ", ".join(_arg(v, defined) for v in bound) + ")")
    if op.type == "const":
        args.append(f"val={_const_text(op.outputs[0])}")
    for key in sorted(op.attributes, key=order):
        if key not in ("name", "val"):
            args.append(f"{key}={_literal(op.attributes[key])}")
    line = f"{pad}{outs} = {op.type}({', '.join(args)})"
    if op.outputs and op.name != op.outputs[0].name:
        line += f"  # name={_literal(op.name)}"
    if not op.blocks:
        return [line]
    lines = [line + " {"]
    for b in op.blocks:
        lines.extend(_block_lines(b, defined, depth + 1, "block", opset))
    lines.append(pad + "}")
    return lines


def _block_lines(block: Block, defined: set, depth: int, header: str | None, opset: str) -> list[str]:
    defined = set(defined)
    pad = _INDENT * depth
    lines = []
    if header is not None:
        ins = ", ".join(f"%{v.name}: {v.type}" for v in block.inputs)
        lines.append(f"{pad}{header}({ins}) {{")
        depth += 1
    defined.update(v.name for v in block.inputs)
    for op in block.operations:
        lines.extend(_op_lines(op, defined, depth, opset))
        defined.update(v.name for v in op.outputs)
    if header is not None:
        outs = ", ".join(f"%{v.name}" for v in block.outputs)
        lines.append(f"{pad}}} -> ({outs})")
    return lines


def function_to_text(name: str, fn: Function) -> str:
    """One function: ``func name<opset>(%inputs) { ops } -> (%outputs)``."""
    ins = ", ".join(f"%{v.name}: {v.type}" for v in fn.inputs)
    head = f"func {name}<{fn.opset}>({ins})"
    if fn.attributes:
        head += " [" + ", ".join(f"{k}={_literal(v)}" for k, v in fn.attributes.items()) + "]"
    body = _block_lines(fn.block, {v.name for v in fn.inputs}, 1, None, fn.opset)
    outs = ", ".join(f"%{v.name}" for v in fn.outputs)
    return "\n".join([head + " {", *body, f"}} -> ({outs})"])


def program_to_text(program: Program) -> str:
    """The whole program as text: a header line, then each function."""
    head = f"program(version={program.version})"
    if program.attributes:
        head += " [" + ", ".join(f"{k}={_literal(v)}" for k, v in program.attributes.items()) + "]"
    parts = [head] + [function_to_text(n, f) for n, f in program.functions.items()]
    return "\n".join(parts) + "\n"
