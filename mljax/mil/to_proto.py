"""MIL IR -> MILSpec protobuf (+ weight blob), and ML programs -> ``.mlpackage`` folders.

Written the way Apple's tools write programs: every op carries a ``name`` attribute,
``const`` ops carry ``val``; a constant goes to the weight blob when it has at least 10
elements of a blob-storable dtype (fp16/fp32/int8/uint8 and the sub-byte types; from
iOS18 also 16/32-bit integers), otherwise it is written inline ("immediate").
Immediate tensors use the field coremltools uses for each dtype (fp32 -> floats,
fp16/int8/uint8/uint32/sub-byte -> bytes, int64 -> longInts, ...).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable
import numpy as np

from mljax.errors import ModelFormatError
from mljax.format.blob import BlobWriter, _pack_bits
from mljax.format.package import save_spec
from mljax.mil.ir import Block, Function, Operation, Program, Var
from mljax.mil.types import (DTYPES, DictType, DType, ListType, StateType, TensorType, TupleType,
                             ValueType, dtype_from_numpy)
from mljax.mil.opspec import input_order, opset_number
from mljax.proto import MIL_pb2, Model_pb2

__all__ = ["program_to_proto", "write_mlprogram_package", "value_type_to_proto", "value_to_proto",
           "SPEC_VERSION_OF_OPSET", "BLOB_FILE_NAME", "input_order_key"]

#: Where Apple's tools put the single weight file of a package (relative to ``@model_path``).
BLOB_FILE_NAME = "@model_path/weights/weight.bin"
_BLOB_BASENAME = "weight.bin"
_BLOB_MIN_SIZE = 10
_BLOB_DTYPES = {"fp16", "fp32", "uint8", "int8", "int4", "uint1", "uint2", "uint3", "uint4", "uint6"}
_BLOB_DTYPES_IOS18 = _BLOB_DTYPES | {"int16", "uint16", "int32", "uint32", "bf16", "fp8e4m3fn", "fp8e5m2"}
#: The ``specificationVersion`` a program of each opset needs.
SPEC_VERSION_OF_OPSET = {"CoreML5": 6, "CoreML6": 7, "CoreML7": 8, "CoreML8": 9, "CoreML9": 10}
_IN_BYTES = {"fp16", "bf16", "fp8e4m3fn", "fp8e5m2", "int8", "uint8", "uint32",
             "int4", "uint1", "uint2", "uint3", "uint4", "uint6"}


# --- types ------------------------------------------------------------------------------
def value_type_to_proto(t: ValueType) -> MIL_pb2.ValueType:
    """A :mod:`mljax.mil.types` type -> ``MILSpec.ValueType``."""
    pb = MIL_pb2.ValueType()
    if isinstance(t, TensorType):
        tt = pb.tensorType
        tt.dataType = t.dtype.proto
        if t.shape is None:
            tt.rank = -1
            return pb
        tt.rank = len(t.shape)
        for d in t.shape:
            _set_dim(tt.dimensions.add(), d)
    elif isinstance(t, ListType):
        pb.listType.type.CopyFrom(value_type_to_proto(t.elem))
        _set_dim(pb.listType.length, t.length)
    elif isinstance(t, TupleType):
        pb.tupleType.types.extend(value_type_to_proto(e) for e in t.elems)
    elif isinstance(t, DictType):
        pb.dictionaryType.keyType.CopyFrom(value_type_to_proto(t.key))
        pb.dictionaryType.valueType.CopyFrom(value_type_to_proto(t.value))
    elif isinstance(t, StateType):
        pb.stateType.wrappedType.CopyFrom(value_type_to_proto(t.wrapped))
    else:
        raise ModelFormatError(f"cannot write MIL type {t!r}: expected a tensor, list, tuple, dict or state type")
    return pb


def _set_dim(pb_dim, d) -> None:
    if isinstance(d, (int, np.integer)):
        pb_dim.constant.size = int(d)
    else:
        pb_dim.unknown.variadic = False


def _infer_type(value) -> ValueType:
    """The MIL type of a Python / NumPy attribute value."""
    if isinstance(value, str):
        return TensorType(DTYPES["string"], ())
    if isinstance(value, (bool, np.bool_)):
        return TensorType(DTYPES["bool"], ())
    if isinstance(value, int):
        return TensorType(DTYPES["int32"], ())
    if isinstance(value, float):
        return TensorType(DTYPES["fp32"], ())
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        dt = DTYPES["string"] if arr.dtype.kind in "OUS" else dtype_from_numpy(arr.dtype)
        return TensorType(dt, tuple(int(s) for s in arr.shape))
    if isinstance(value, tuple):
        return TupleType(tuple(_infer_type(v) for v in value))
    if isinstance(value, list):
        elem = _infer_type(value[0]) if value else TensorType(DTYPES["fp32"], ())
        return ListType(elem, len(value))
    if isinstance(value, dict):
        if not value:
            return DictType(TensorType(DTYPES["string"], ()), TensorType(DTYPES["string"], ()))
        k, v = next(iter(value.items()))
        return DictType(_infer_type(k), _infer_type(v))
    raise ModelFormatError(f"cannot write a value of type {type(value).__name__} into a MIL program")


# --- immediate values -------------------------------------------------------------------
def _fill_tensor(tv: MIL_pb2.TensorValue, value, dtype: DType) -> None:
    name = dtype.name
    arr = np.asarray(value)
    if name == "string":
        tv.strings.values.extend(str(s) for s in arr.ravel())
        tv.strings.SetInParent()
    elif name in _IN_BYTES:
        if dtype.bits % 8:
            data = _pack_bits(arr, dtype.bits)[0] if arr.size else b""
        else:
            data = np.ascontiguousarray(arr.astype(dtype.numpy)).tobytes()  # little-endian hosts
        tv.bytes.values = data
    elif name == "bool":
        tv.bools.values.extend(bool(b) for b in arr.ravel())
        tv.bools.SetInParent()
    elif name in ("int64", "uint64"):
        tv.longInts.values.extend(int(i) for i in arr.ravel())
        tv.longInts.SetInParent()
    elif name == "fp64":
        tv.doubles.values.extend(arr.astype(np.float64).ravel().tolist())
        tv.doubles.SetInParent()
    elif name == "fp32":
        tv.floats.values.extend(arr.astype(np.float32).ravel().tolist())
        tv.floats.SetInParent()
    elif dtype.is_int:
        tv.ints.values.extend(int(i) for i in arr.ravel())
        tv.ints.SetInParent()
    else:
        raise ModelFormatError(f"cannot write an immediate value of dtype {name}")


def value_to_proto(value, vtype: ValueType | None = None) -> MIL_pb2.Value:
    """An immediate ``MILSpec.Value`` for ``value`` (type inferred when ``vtype`` is None)."""
    t = vtype if vtype is not None else _infer_type(value)
    pb = MIL_pb2.Value()
    pb.type.CopyFrom(value_type_to_proto(t))
    iv = pb.immediateValue
    if isinstance(t, TensorType):
        _fill_tensor(iv.tensor, value, t.dtype)
    elif isinstance(t, TupleType):
        iv.tuple.values.extend(value_to_proto(v, et) for v, et in zip(value, t.elems))
        iv.tuple.SetInParent()
    elif isinstance(t, ListType):
        iv.list.values.extend(value_to_proto(v, t.elem) for v in value)
        iv.list.SetInParent()
    elif isinstance(t, DictType):
        for k, v in value.items():
            kv = iv.dictionary.values.add()
            kv.key.CopyFrom(value_to_proto(k, t.key))
            kv.value.CopyFrom(value_to_proto(v, t.value))
        iv.dictionary.SetInParent()
    else:
        raise ModelFormatError(f"cannot write an immediate value of type {t}")
    return pb


# --- program ----------------------------------------------------------------------------
def input_order_key(op_type: str, opset) -> Callable[[str], int]:
    """Sort key for an op's input names: its MIL input order (:mod:`mljax.mil.opspec`'s table).

    Proto maps have no order; writing inline blob values in this order reproduces the
    offsets Apple's tools choose, and the text printer shows inputs in it.
    """
    rank = {n: i for i, n in enumerate(input_order(op_type, opset))}
    return lambda key: rank.get(key, len(rank))


class _Writer:
    """Writes one program; shares blob entries between the uses of one Var."""

    def __init__(self, blob_writer, weights: dict | None, function_name: str | None):
        self.blob_writer = blob_writer
        self.weights = weights or {}
        self.function_name = function_name
        self._written: dict[int, MIL_pb2.Value] = {}
        self._blob_dtypes = _BLOB_DTYPES
        self._opset = 15
        self._override = False

    def function(self, name: str, fn: Function) -> MIL_pb2.Function:
        self._opset = opset_number(fn.opset)
        self._blob_dtypes = _BLOB_DTYPES_IOS18 if self._opset >= 18 else _BLOB_DTYPES
        self._override = self.function_name is None or self.function_name == name
        pb = MIL_pb2.Function()
        pb.opset = fn.opset
        for v in fn.inputs:
            pb.inputs.add(name=v.name, type=value_type_to_proto(v.type))
        scope = {v.name for v in fn.inputs}
        pb.block_specializations[fn.opset].CopyFrom(self.block(fn.block, scope, top=True))
        for k, v in fn.attributes.items():
            pb.attributes[k].CopyFrom(value_to_proto(v))
        return pb

    def block(self, block: Block, scope: set, top: bool = False) -> MIL_pb2.Block:
        pb = MIL_pb2.Block()
        scope = set(scope)
        if not top:
            for v in block.inputs:
                pb.inputs.add(name=v.name, type=value_type_to_proto(v.type))
                scope.add(v.name)
        for op in block.operations:
            pb.operations.append(self.operation(op, scope))
            scope.update(v.name for v in op.outputs)
        for v in block.outputs:
            if v.name not in scope:
                raise ModelFormatError(f"block output {v.name!r} is not defined in its block")
            pb.outputs.append(v.name)
        for k, v in block.attributes.items():
            pb.attributes[k].CopyFrom(value_to_proto(v))
        return pb

    def operation(self, op: Operation, scope: set) -> MIL_pb2.Operation:
        if op.type.startswith("constexpr_") and self._override and \
                any(v.name in self.weights for v in op.outputs) and len(op.outputs) == 1:
            # a trained weight replaces a compressed one: store it dense
            op = Operation("const", op.name, {}, op.outputs)
        pb = MIL_pb2.Operation(type=op.type)
        pb.attributes["name"].CopyFrom(value_to_proto(str(op.name)))
        if op.type == "const":
            var = op.outputs[0]
            pb.attributes["val"].CopyFrom(self.const_value(var))
        order = self._input_order(op.type)
        for k in sorted(op.attributes, key=order):
            if k in ("name", "val") and (k == "name" or op.type == "const"):
                continue
            pb.attributes[k].CopyFrom(self.attribute_value(op.attributes[k]))
        for key in sorted(op.inputs, key=order):
            bound = op.inputs[key]
            arg = pb.inputs[key]
            for var in bound:
                b = arg.arguments.add()
                if var.name in scope:
                    b.name = var.name
                elif var.value is not None:
                    b.value.CopyFrom(self.const_value(var))
                else:
                    raise ModelFormatError(
                        f"op {op.name!r} ({op.type}) input {key!r} refers to {var.name!r}, which is "
                        f"neither defined before it nor a constant")
        for v in op.outputs:
            pb.outputs.add(name=v.name, type=value_type_to_proto(v.type))
        pb.blocks.extend(self.block(b, scope) for b in op.blocks)
        return pb

    def _input_order(self, op_type: str):
        return input_order_key(op_type, self._opset)

    def _value_of(self, var: Var):
        if self._override and var.name in self.weights:
            new = np.asarray(self.weights[var.name])
            t = var.type
            if isinstance(t, TensorType) and t.shape is not None and tuple(new.shape) != tuple(t.shape):
                raise ModelFormatError(
                    f"replacement weight {var.name!r} has shape {tuple(new.shape)}; the program "
                    f"declares {t}")
            return new.astype(t.dtype.numpy) if isinstance(t, TensorType) else new, True
        return var.value, False

    def const_value(self, var: Var) -> MIL_pb2.Value:
        key = id(var)
        if key in self._written:
            return self._written[key]
        value, replaced = self._value_of(var)
        t = var.type if var.type is not None else _infer_type(value)
        if self._to_blob(var, value, t):
            pb = self._blob_value(value, t)
        else:
            pb = value_to_proto(value, t)
        self._written[key] = pb
        return pb

    def attribute_value(self, value) -> MIL_pb2.Value:
        """Attributes (e.g. constexpr inputs before iOS18): blob-stored under the same rule."""
        if isinstance(value, np.ndarray) and value.dtype.kind not in "OUS":
            t = _infer_type(value)
            if self._to_blob(None, value, t):
                return self._blob_value(value, t)
        return value_to_proto(value)

    def _to_blob(self, var: Var | None, value, t) -> bool:
        if self.blob_writer is None or not isinstance(t, TensorType) or not isinstance(value, np.ndarray):
            return False
        if var is not None and var.blob is not None:
            return True
        return value.size >= _BLOB_MIN_SIZE and t.dtype.name in self._blob_dtypes

    def _blob_value(self, value: np.ndarray, t: TensorType) -> MIL_pb2.Value:
        offset = self.blob_writer.write(np.asarray(value).ravel(), t.dtype)
        pb = MIL_pb2.Value()
        pb.type.CopyFrom(value_type_to_proto(TensorType(t.dtype, tuple(int(s) for s in value.shape))))
        pb.blobFileValue.fileName = BLOB_FILE_NAME
        pb.blobFileValue.offset = offset
        return pb


def program_to_proto(program: Program, weights_dir_writer: BlobWriter | None, *,
                     weights: dict | None = None, function_name: str | None = None) -> MIL_pb2.Program:
    """The ``MILSpec.Program`` of ``program``; large constants go to ``weights_dir_writer``.

    Args:
      program: the MIL IR.
      weights_dir_writer: a :class:`~mljax.format.blob.BlobWriter` for the package's
        ``weights/weight.bin``; ``None`` writes every constant inline.
      weights: optional replacement values by var name (e.g. an ``MLModel``'s trained
        weights pytree); cast to each constant's declared dtype.  A compressed
        (``constexpr_*``) weight that is replaced is written as a dense ``const``.
      function_name: apply ``weights`` only to this function (default: all functions).
    Returns:
      the protobuf message (this project's schema).
    """
    writer = _Writer(weights_dir_writer, weights, function_name)
    pb = MIL_pb2.Program(version=program.version)
    for name, fn in program.functions.items():
        pb.functions[name].CopyFrom(writer.function(name, fn))
    for k, v in program.attributes.items():
        pb.attributes[k].CopyFrom(value_to_proto(v))
    return pb


# --- packages ---------------------------------------------------------------------------
def _as_model_spec(template) -> Model_pb2.Model:
    if isinstance(template, Model_pb2.ModelDescription):
        spec = Model_pb2.Model()
        spec.description.CopyFrom(template)
        return spec
    if isinstance(template, Model_pb2.Model):
        spec = Model_pb2.Model()
        spec.CopyFrom(template)
        return spec
    if hasattr(template, "SerializeToString"):
        name = type(template).__name__
        data = template.SerializeToString()
        if name == "ModelDescription":
            return _as_model_spec(Model_pb2.ModelDescription.FromString(data))
        return Model_pb2.Model.FromString(data)
    raise ModelFormatError(
        f"expected a Model spec or a ModelDescription to take the description from; "
        f"found {type(template).__name__}")


def mlprogram_spec(template, program: Program, blob_writer: BlobWriter | None, *,
                   weights: dict | None = None, function_name: str | None = None) -> Model_pb2.Model:
    """A ``Model`` spec: ``template``'s description (and metadata) with ``program`` as its ML program."""
    spec = _as_model_spec(template)
    spec.mlProgram.CopyFrom(program_to_proto(program, blob_writer, weights=weights,
                                             function_name=function_name))
    needed = max(SPEC_VERSION_OF_OPSET.get(f.opset, 6) for f in program.functions.values())
    spec.specificationVersion = max(spec.specificationVersion, needed)
    return spec


def write_mlprogram_package(model_spec_template_or_description, program: Program, path, weights=None,
                            *, function_name: str | None = None) -> Path:
    """Write ``program`` as an ``.mlpackage`` (spec + ``weights/weight.bin``) at ``path``, atomically.

    The description comes from a ``Model`` spec (its ``mlProgram`` is replaced) or a
    ``ModelDescription``; ``weights`` optionally replaces constants by var name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent.resolve(), prefix=f".{path.name}.", suffix=".blob"))
    try:
        blob_path = staging / _BLOB_BASENAME
        with BlobWriter(blob_path) as blob:
            spec = mlprogram_spec(model_spec_template_or_description, program, blob,
                                  weights=weights, function_name=function_name)

        def write_weights(folder: Path) -> None:
            shutil.move(str(blob_path), str(Path(folder) / _BLOB_BASENAME))

        return save_spec(spec, path, write_weights=write_weights)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
