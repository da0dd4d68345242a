"""MILSpec protobuf -> MIL IR, resolving weight blobs through memory maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mljax.errors import ModelFormatError
from mljax.format.blob import BlobReader
from mljax.format.package import resolve_blob_path
from mljax.mil.ir import Block, Function, Operation, Program, Var
from mljax.mil.types import (DictType, ListType, StateType, TensorType, TupleType, ValueType,
                             dtype_from_proto)

__all__ = ["program_from_proto", "value_type_from_proto", "value_from_proto", "MAX_RANK", "MAX_ELEMENTS"]

MAX_RANK = 64                 # Core ML's tensors have rank <= 5 (ND layers); 64 leaves room
MAX_ELEMENTS = 1 << 40        # a bound on any one dimension and on a constant's element count


def value_type_from_proto(vt) -> ValueType:
    kind = vt.WhichOneof("type")
    if kind == "tensorType":
        tt = vt.tensorType
        dtype = dtype_from_proto(tt.dataType)
        if tt.rank < 0:
            return TensorType(dtype, None)
        if tt.rank > MAX_RANK:
            raise ModelFormatError(f"tensor type of rank {tt.rank}: expected a rank of at most {MAX_RANK}")
        dims = []
        for d in tt.dimensions:
            which = d.WhichOneof("dimension")
            size = int(d.constant.size) if which == "constant" else None
            if size is not None and size > MAX_ELEMENTS:
                raise ModelFormatError(f"tensor dimension {size}: expected at most {MAX_ELEMENTS:,}")
            dims.append(size)
        if len(dims) != tt.rank:
            dims = [None] * tt.rank
        return TensorType(dtype, tuple(dims))
    if kind == "listType":
        length = vt.listType.length
        n = int(length.constant.size) if length.WhichOneof("dimension") == "constant" else None
        return ListType(value_type_from_proto(vt.listType.type), n)
    if kind == "tupleType":
        return TupleType(tuple(value_type_from_proto(t) for t in vt.tupleType.types))
    if kind == "dictionaryType":
        return DictType(value_type_from_proto(vt.dictionaryType.keyType),
                        value_type_from_proto(vt.dictionaryType.valueType))
    if kind == "stateType":
        return StateType(value_type_from_proto(vt.stateType.wrappedType))
    raise ModelFormatError(f"value type without a kind: {vt}")


class _Blobs:
    """Opens each blob file once, on first use."""

    def __init__(self, model_dir: Path | None):
        self.model_dir = model_dir
        self._readers: dict[str, BlobReader] = {}

    def read(self, file_name: str, offset: int, t: TensorType) -> np.ndarray:
        if file_name not in self._readers:
            self._readers[file_name] = BlobReader(resolve_blob_path(self.model_dir, file_name))
        if not t.is_static:
            raise ModelFormatError(f"blob value at {file_name}:{offset} has a non-static type {t}")
        return self._readers[file_name].read(offset, t.dtype, t.shape)


def _tensor_value(tv, t: TensorType):
    kind = tv.WhichOneof("value")
    dtype = t.dtype
    if kind == "bytes":
        raw = tv.bytes.values
        if dtype.bits % 8 == 0 and dtype.name != "string":
            if len(raw) % dtype.numpy.itemsize:
                raise ModelFormatError(f"immediate value holds {len(raw)} bytes of {dtype.name}: "
                                       f"expected a multiple of {dtype.numpy.itemsize}")
            arr = np.frombuffer(raw, dtype=dtype.numpy)
        else:
            from mljax.format.blob import _unpack_bits
            count = _element_count(t.shape) if t.shape else 1
            if count * dtype.bits > len(raw) * 8:
                raise ModelFormatError(f"immediate value holds {len(raw)} bytes; type {t} needs "
                                       f"{(count * dtype.bits + 7) // 8}")
            arr = _unpack_bits(np.frombuffer(raw, np.uint8), dtype.bits, count,
                               dtype.name == "int4").astype(dtype.numpy)
    elif kind == "strings":
        arr = np.array(list(tv.strings.values), dtype=object)
    elif kind is None:
        arr = np.zeros(0, dtype.numpy)
    else:
        arr = np.asarray(list(getattr(tv, kind).values))
        if dtype.name != "string":
            arr = arr.astype(dtype.numpy)
    if t.shape is not None and t.is_static:
        expected = _element_count(t.shape)
        if arr.size != expected:
            raise ModelFormatError(f"immediate value holds {arr.size} values for type {t}")
        arr = arr.reshape(t.shape)
    if arr.ndim == 0 and dtype.name == "string":
        return str(arr.item())
    return arr


def _element_count(shape) -> int:
    """The number of elements of a static shape, refused above :data:`MAX_ELEMENTS` (before
    anything of that size is allocated)."""
    count = 1
    for d in shape:
        count *= int(d)
        if count > MAX_ELEMENTS:
            raise ModelFormatError(f"a tensor of shape {tuple(shape)}: expected at most {MAX_ELEMENTS:,} elements")
    return count


def value_from_proto(value, blobs: _Blobs | None = None):
    """A MILSpec.Value -> (type, NumPy array / str / list / tuple / dict, blob ref)."""
    t = value_type_from_proto(value.type)
    kind = value.WhichOneof("value")
    if kind in ("blobFileValue", "immediateValue") and not isinstance(t, TensorType) \
            and (kind == "blobFileValue" or value.immediateValue.WhichOneof("value") == "tensor"):
        raise ModelFormatError(f"a tensor value declared with the non-tensor type {t}")
    if kind == "blobFileValue":
        if blobs is None:
            raise ModelFormatError("a blob value appeared where no weights can be read")
        bf = value.blobFileValue
        return t, blobs.read(bf.fileName, int(bf.offset), t), (bf.fileName, int(bf.offset))
    if kind != "immediateValue":
        raise ModelFormatError(f"value without content: {value}")
    iv = value.immediateValue
    ik = iv.WhichOneof("value")
    declared = {"tuple": TupleType, "list": ListType, "dictionary": DictType}.get(ik)
    if declared is not None and not isinstance(t, declared):
        raise ModelFormatError(f"an immediate {ik} value declared with the type {t}; expected a {declared.__name__}")
    if ik == "tensor":
        return t, _tensor_value(iv.tensor, t), None
    if ik == "tuple":
        return t, tuple(value_from_proto(v, blobs)[1] for v in iv.tuple.values), None
    if ik == "list":
        return t, [value_from_proto(v, blobs)[1] for v in iv.list.values], None
    if ik == "dictionary":
        return t, {_hashable(value_from_proto(kv.key, blobs)[1]): value_from_proto(kv.value, blobs)[1]
                   for kv in iv.dictionary.values}, None
    raise ModelFormatError(f"immediate value without content: {iv}")


def _hashable(v):
    v = v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v
    try:
        hash(v)
    except TypeError:
        raise ModelFormatError(f"a dictionary value has the key {v!r}; expected a scalar key") from None
    return v


class _Scope:
    def __init__(self, parent: "_Scope | None" = None):
        self.parent, self.vars = parent, {}

    def get(self, name: str, where: str) -> Var:
        s = self
        while s is not None:
            if name in s.vars:
                return s.vars[name]
            s = s.parent
        raise ModelFormatError(f"{where} refers to undefined variable {name!r}")


class _Builder:
    def __init__(self, blobs: _Blobs, opset: str):
        self.blobs, self.opset, self._anon = blobs, opset, 0

    def block(self, pb, scope: _Scope, where: str) -> Block:
        scope = _Scope(scope)
        inputs = [Var(nv.name, value_type_from_proto(nv.type)) for nv in pb.inputs]
        for v in inputs:
            scope.vars[v.name] = v
        ops = [self.operation(op, scope, where) for op in pb.operations]
        outputs = [scope.get(n, f"{where} block output") for n in pb.outputs]
        return Block(inputs, ops, outputs, self.attributes(pb.attributes))

    def attributes(self, attrs) -> dict:
        return {k: value_from_proto(v, self.blobs)[1] for k, v in attrs.items()}

    def operation(self, pb, scope: _Scope, where: str) -> Operation:
        attrs = self.attributes(pb.attributes)
        name = attrs.get("name") or (pb.outputs[0].name if pb.outputs else pb.type)
        name = str(name.item()) if isinstance(name, np.ndarray) else str(name)
        here = f"op {name!r} ({pb.type}) in {where}"
        inputs = {}
        for key, arg in pb.inputs.items():
            bound = []
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    bound.append(scope.get(b.name, here))
                else:
                    t, val, ref = value_from_proto(b.value, self.blobs)
                    if isinstance(t, (DictType, TupleType)):
                        raise ModelFormatError(f"{here}: input {key!r} is a {type(t).__name__} value; "
                                               f"expected a tensor, a list or a variable")
                    self._anon += 1
                    bound.append(Var(f"_imm{self._anon}", t, val, ref))
            inputs[key] = tuple(bound)
        outputs = [Var(nv.name, value_type_from_proto(nv.type)) for nv in pb.outputs]
        blocks = [self.block(b, scope, f"{here} nested block") for b in pb.blocks]
        _check_blocks(pb.type, blocks, inputs, outputs, here)
        if pb.type == "const":
            if "val" not in pb.attributes:
                raise ModelFormatError(f"{here} has no 'val' attribute")
            if len(outputs) != 1:
                raise ModelFormatError(f"{here}: expected one output, found {len(outputs)}")
            _, val, ref = value_from_proto(pb.attributes["val"], self.blobs)
            outputs[0].value, outputs[0].blob = val, ref
        for v in outputs:
            scope.vars[v.name] = v
        return Operation(pb.type, name, inputs, outputs, blocks, attrs)


def _check_blocks(op_type: str, blocks, inputs, outputs, here: str) -> None:
    """The nested blocks of ``cond`` and ``while_loop`` have the shape their lowering relies on."""
    if op_type == "cond":
        problems = [f"2 blocks, found {len(blocks)}"] if len(blocks) != 2 else [
            f"each block to return the op's {len(outputs)} outputs, found {len(b.outputs)}"
            for b in blocks if len(b.outputs) != len(outputs)]
    elif op_type == "while_loop":
        n = len(inputs.get("loop_vars", ()))
        if len(blocks) != 2:
            problems = [f"2 blocks (_cond, _body), found {len(blocks)}"]
        else:
            cond, body = blocks
            problems = [f"{what}, found {found}" for what, found, ok in (
                (f"{n} outputs (one per loop variable)", len(outputs), len(outputs) == n),
                (f"_cond with {n} inputs", len(cond.inputs), len(cond.inputs) == n),
                ("_cond with 1 output", len(cond.outputs), len(cond.outputs) == 1),
                (f"_body with {n} inputs", len(body.inputs), len(body.inputs) == n),
                (f"_body with {n} outputs", len(body.outputs), len(body.outputs) == n)) if not ok]
    else:
        return
    if problems:
        raise ModelFormatError(f"{here}: expected " + "; expected ".join(problems))


def program_from_proto(pb, model_dir: Path | None) -> Program:
    """Build the IR of every function; each uses the block of its own opset."""
    blobs = _Blobs(model_dir)
    functions = {}
    for fname, fpb in pb.functions.items():
        opset = fpb.opset
        if opset not in fpb.block_specializations:
            raise ModelFormatError(
                f"function {fname!r} declares opset {opset!r} but has blocks for "
                f"{sorted(fpb.block_specializations)}")
        builder = _Builder(blobs, opset)
        scope = _Scope()
        inputs = [Var(nv.name, value_type_from_proto(nv.type)) for nv in fpb.inputs]
        for v in inputs:
            scope.vars[v.name] = v
        block = builder.block(fpb.block_specializations[opset], scope, f"function {fname!r}")
        functions[fname] = Function(fname, inputs, opset, block, builder.attributes(fpb.attributes))
    return Program(int(pb.version), functions, {k: value_from_proto(v)[1] for k, v in pb.attributes.items()})
