"""Reading and writing Core ML model containers.

* ``.mlpackage`` folder: ``Manifest.json`` names the root spec item; item paths are
  relative to ``Data/``; the spec's weights live in ``Data/com.apple.CoreML/weights``.
* ``.mlmodel``: one serialized ``Model`` protobuf.
* in memory: serialized bytes, or any protobuf ``Model`` message (coremltools' too).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError, Message

from mljax.errors import ModelFormatError
from mljax.proto import Model_pb2

__all__ = ["LoadedSpec", "load_spec", "save_spec", "parse_spec", "resolve_blob_path"]

_DATA = "Data"
_SPEC_PATH = "com.apple.CoreML/model.mlmodel"
_WEIGHTS_PATH = "com.apple.CoreML/weights"
MODEL_PATH_PREFIX = "@model_path/"


@dataclass
class LoadedSpec:
    spec: Model_pb2.Model
    model_dir: Path | None   # the folder "@model_path/" refers to (Data/com.apple.CoreML)
    path: Path | None = None   # where the model was read from, if a file


def parse_spec(data: bytes, where: str = "model") -> Model_pb2.Model:
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelFormatError(f"{where} is not a valid Core ML Model protobuf: {e}") from None
    if spec.specificationVersion <= 0 or spec.WhichOneof("Type") is None:
        raise ModelFormatError(
            f"{where} parsed as a protobuf but holds no Core ML model: expected a specificationVersion "
            f"and a model type, found version {spec.specificationVersion} and type "
            f"{spec.WhichOneof('Type')}")
    return spec


def _inside(root: Path, rel: str, what: str) -> Path:
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ModelFormatError(f"{what} path {rel!r} escapes the package folder {root}")
    return target


def _read_manifest(pkg: Path) -> Path:
    manifest = pkg / "Manifest.json"
    try:
        info = json.loads(manifest.read_text())
        root_id = info["rootModelIdentifier"]
        entry = info["itemInfoEntries"][root_id]
        rel = entry["path"]
    except FileNotFoundError:
        raise ModelFormatError(f"{pkg} is not an .mlpackage: expected {manifest}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(
            f"{manifest} is malformed: expected rootModelIdentifier naming an entry of "
            f"itemInfoEntries with a 'path'; failed on {e!r}") from None
    return _inside(pkg / _DATA, rel, "Manifest.json item")


def load_spec(model, weights_dir=None) -> LoadedSpec:
    """Any accepted model reference -> :class:`LoadedSpec`.

    ``weights_dir`` follows coremltools: the folder holding the weight files (a package's
    ``Data/com.apple.CoreML/weights``); blob references ``@model_path/weights/...`` resolve
    against its parent.
    """
    if isinstance(model, LoadedSpec):
        return model
    if isinstance(model, (bytes, bytearray, memoryview)):
        return LoadedSpec(parse_spec(bytes(model), "model bytes"), _model_dir(weights_dir))
    if isinstance(model, Message):
        if isinstance(model, Model_pb2.Model):
            spec = Model_pb2.Model()
            spec.CopyFrom(model)
        else:
            spec = parse_spec(model.SerializeToString(), type(model).__name__)
        return LoadedSpec(spec, _model_dir(weights_dir))
    if hasattr(model, "get_spec") and not isinstance(model, (str, os.PathLike)):
        # coremltools.models.MLModel (or mljax.MLModel): its spec and its weights folder.
        wd = weights_dir or getattr(model, "weights_dir", None)
        return load_spec(model.get_spec(), wd)
    if not isinstance(model, (str, os.PathLike)):
        raise ModelFormatError(
            f"expected a path to a .mlpackage/.mlmodel, model bytes or a Model protobuf; "
            f"found {type(model).__name__}")
    path = Path(model)
    if not path.exists():
        raise ModelFormatError(f"model path {path} does not exist")
    if path.is_dir():
        spec_path = _read_manifest(path)
        if not spec_path.is_file():
            raise ModelFormatError(f"{path}: Manifest.json names {spec_path}, which does not exist")
        spec = parse_spec(spec_path.read_bytes(), str(spec_path))
        return LoadedSpec(spec, _model_dir(weights_dir) or spec_path.parent, path)
    spec = parse_spec(path.read_bytes(), str(path))
    return LoadedSpec(spec, _model_dir(weights_dir) or path.parent, path)


def _model_dir(weights_dir) -> Path | None:
    return None if weights_dir is None else Path(weights_dir).parent


def resolve_blob_path(model_dir: Path | None, file_name: str) -> Path:
    """``@model_path/weights/weight.bin`` -> the file, refusing paths outside the package."""
    if not file_name.startswith(MODEL_PATH_PREFIX):
        raise ModelFormatError(
            f"weight reference {file_name!r}: expected a path starting with {MODEL_PATH_PREFIX!r}")
    if model_dir is None:
        raise ModelFormatError(
            f"the program reads weights from {file_name!r} but no weights folder is known; "
            f"pass weights_dir= (the package's Data/com.apple.CoreML/weights folder)")
    target = _inside(model_dir, file_name[len(MODEL_PATH_PREFIX):], "weight reference")
    if not target.is_file():
        raise ModelFormatError(f"weight file {target} (from {file_name!r}) does not exist")
    return target


def _manifest(spec_id: str, weights_id: str | None) -> dict:
    entries = {spec_id: {"author": "com.apple.CoreML", "description": "CoreML Model Specification",
                         "name": "model.mlmodel", "path": _SPEC_PATH}}
    if weights_id:
        entries[weights_id] = {"author": "com.apple.CoreML", "description": "CoreML Model Weights",
                               "name": "weights", "path": _WEIGHTS_PATH}
    return {"fileFormatVersion": "1.0.0", "itemInfoEntries": entries, "rootModelIdentifier": spec_id}


def save_spec(spec: Model_pb2.Model, path, weights_from: Path | None = None,
              write_weights=None) -> Path:
    """Write ``spec`` atomically: a ``.mlmodel`` file, or an ``.mlpackage`` folder.

    ``weights_from`` is a weights folder to copy; ``write_weights(folder)`` may instead
    write fresh blob files into the new package's weights folder.  The target appears
    only once complete (written beside it, then renamed into place).
    """
    path = Path(path)
    parent = path.parent.resolve()
    parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mlmodel":
        if spec.WhichOneof("Type") == "mlProgram" or _has_mlprogram(spec):
            raise ModelFormatError(f"{path}: ML programs must be saved as .mlpackage, not .mlmodel")
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(spec.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        core = tmp / _DATA / "com.apple.CoreML"
        core.mkdir(parents=True)
        (core / "model.mlmodel").write_bytes(spec.SerializeToString())
        has_weights = False
        if weights_from is not None and Path(weights_from, "weights").is_dir():
            shutil.copytree(Path(weights_from, "weights"), core / "weights")
            has_weights = True
        if write_weights is not None:
            (core / "weights").mkdir(exist_ok=True)
            write_weights(core / "weights")
            has_weights = True
        manifest = _manifest(str(uuid.uuid4()).upper(), str(uuid.uuid4()).upper() if has_weights else None)
        (tmp / "Manifest.json").write_text(json.dumps(manifest, indent=4))
        if path.exists():
            old = parent / f".{path.name}.{uuid.uuid4().hex}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _has_mlprogram(spec) -> bool:
    kind = spec.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = getattr(spec, kind)
        pipe = pipe if kind == "pipeline" else pipe.pipeline
        return any(m.WhichOneof("Type") == "mlProgram" or _has_mlprogram(m) for m in pipe.models)
    return False
