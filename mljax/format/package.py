"""Reading and writing Core ML model containers.

* ``.mlpackage`` folder: ``Manifest.json`` names the root spec item; item paths are
  relative to ``Data/``; the spec's weights live in ``Data/com.apple.CoreML/weights``.
* ``.mlmodel``: one serialized ``Model`` protobuf.
* in memory: serialized bytes, or any protobuf ``Model`` message (coremltools' too).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError, Message

from mljax.errors import MLJaxError, ModelFormatError
from mljax.format import fs
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


_MANIFEST_LIMIT = 1 << 20          # bytes; Apple's manifests are a few hundred
_SPEC_LIMIT = (1 << 31) - 1        # bytes; the protobuf wire format's own limit


def _read_manifest(root: Path) -> Path:
    """The spec file a package's Manifest.json names, checked to lie inside the package."""
    manifest = fs.inside(root, "Manifest.json", "Manifest.json")
    if not fs.exists(manifest):
        raise ModelFormatError(f"{root} is not an .mlpackage: expected {root / 'Manifest.json'}")
    raw = fs.read_regular(manifest, "Manifest.json", _MANIFEST_LIMIT)
    try:
        info = json.loads(raw)
        root_id = info["rootModelIdentifier"]
        entry = info["itemInfoEntries"][root_id]
        rel = entry["path"]
        if not isinstance(rel, str) or not rel:
            raise TypeError(f"path is {rel!r}, not a non-empty string")
    except RecursionError:
        raise ModelFormatError(f"{manifest} is malformed: its JSON is nested too deeply") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ModelFormatError(
            f"{manifest} is malformed: expected rootModelIdentifier naming an entry of "
            f"itemInfoEntries with a 'path'; failed on {e!r}") from None
    return fs.inside(root, Path(_DATA, rel), "Manifest.json item")


def load_spec(model, weights_dir=None) -> LoadedSpec:
    """Any accepted model reference -> :class:`LoadedSpec`.

    ``weights_dir`` follows coremltools: the folder holding the weight files (a package's
    ``Data/com.apple.CoreML/weights``); blob references ``@model_path/weights/...`` resolve
    against its parent.  A package's files must resolve (links included) inside the package
    folder and be regular files.
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
    root = fs.resolve(path, "model path")
    if not fs.exists(root):
        raise ModelFormatError(f"model path {path} does not exist")
    if root.is_dir():
        spec_path = _read_manifest(root)
        if not fs.exists(spec_path):
            raise ModelFormatError(f"{path}: Manifest.json names {spec_path}, which does not exist")
        spec = parse_spec(fs.read_regular(spec_path, "model spec", _SPEC_LIMIT), str(spec_path))
        return LoadedSpec(spec, _model_dir(weights_dir) or spec_path.parent, path)
    spec = parse_spec(fs.read_regular(root, "model file", _SPEC_LIMIT), str(path))
    return LoadedSpec(spec, _model_dir(weights_dir) or root.parent, path)


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
    target = fs.inside(model_dir, file_name[len(MODEL_PATH_PREFIX):], "weight reference")
    if not fs.exists(target):
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

    ``weights_from`` is a weights' parent folder (``Data/com.apple.CoreML``) to copy from: only
    bytes inside it are copied (a link leaving it is refused); ``write_weights(folder)`` may
    instead write fresh blob files into the new package's weights folder.

    No kill leaves the destination without a complete model: the new model is built beside it,
    then swapped in with one atomic exchange (Linux ``renameat2``, macOS ``renamex_np``) or,
    where the OS has none, switched inside the existing package by replacing its Manifest.json
    (:func:`_switch_in_place`).  Leftovers of a killed save are removed by the next save.
    """
    path = Path(path)
    parent = fs.resolve(path.parent, "save folder")
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / path.name
    fs.clean_leftovers(path)
    if path.suffix == ".mlmodel":
        if spec.WhichOneof("Type") == "mlProgram" or _has_mlprogram(spec):
            raise ModelFormatError(f"{path}: ML programs must be saved as .mlpackage, not .mlmodel")
        tmp = fs.staging_path(path, "tmp")
        try:
            with open(tmp, "xb") as f:
                f.write(spec.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path
    tmp = fs.staging_path(path, "tmp")
    try:
        _write_package(tmp, spec, weights_from, write_weights)
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_package(tmp: Path, spec, weights_from, write_weights) -> None:
    core = tmp / _DATA / "com.apple.CoreML"
    core.mkdir(parents=True)
    (core / "model.mlmodel").write_bytes(spec.SerializeToString())
    has_weights = False
    if weights_from is not None and os.path.lexists(Path(weights_from, "weights")):
        fs.copy_weights(Path(weights_from, "weights"), core / "weights", Path(weights_from))
        has_weights = True
    if write_weights is not None:
        (core / "weights").mkdir(exist_ok=True)
        write_weights(core / "weights")
        has_weights = True
    manifest = _manifest(str(uuid.uuid4()).upper(), str(uuid.uuid4()).upper() if has_weights else None)
    (tmp / "Manifest.json").write_text(json.dumps(manifest, indent=4))


def _swap_into_place(new: Path, dest: Path) -> None:
    """Put the complete package ``new`` at ``dest``; on return ``new`` holds what must be removed."""
    if not os.path.lexists(dest):
        os.rename(new, dest)   # nothing was there: one rename is atomic
        return
    if fs.exchange(new, dest):
        return
    if dest.is_dir() and not dest.is_symlink() and (dest / "Manifest.json").is_file():
        _switch_in_place(new, dest)
        return
    # not a package (a file, a link or a foreign folder) and no exchange: move it aside first
    old = fs.staging_path(dest, "old")
    os.rename(dest, old)
    os.rename(new, dest)
    os.rename(old, new)


def _switch_in_place(new: Path, dest: Path) -> None:
    """Without an atomic exchange: move the new ``com.apple.CoreML`` folder into the existing
    package under a fresh item folder, then replace Manifest.json (one atomic ``os.replace``),
    then remove the items the new manifest no longer names.  Before the replace the old model
    is complete, after it the new one is; a kill leaves only unnamed items behind."""
    data = dest / _DATA
    data.mkdir(exist_ok=True)
    _remove_unnamed_items(dest)
    item = f"mljax-{uuid.uuid4().hex[:12]}"
    (data / item).mkdir()
    os.rename(new / _DATA / "com.apple.CoreML", data / item / "com.apple.CoreML")
    manifest = json.loads((new / "Manifest.json").read_text())
    for entry in manifest["itemInfoEntries"].values():
        entry["path"] = f"{item}/{entry['path']}"
    staged = new / "Manifest.json"
    staged.write_text(json.dumps(manifest, indent=4))
    os.replace(staged, dest / "Manifest.json")
    _remove_unnamed_items(dest)


def _remove_unnamed_items(pkg: Path) -> None:
    """Delete the entries of ``pkg/Data`` that no item of its Manifest.json lies in."""
    try:
        info = json.loads(fs.read_regular(pkg / "Manifest.json", "Manifest.json", _MANIFEST_LIMIT))
        named = {Path(e["path"]).parts[0] for e in info["itemInfoEntries"].values()}
    except (MLJaxError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        return   # not a manifest this code wrote: leave the folder as it is
    for entry in os.scandir(pkg / _DATA):
        if entry.name not in named:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _has_mlprogram(spec) -> bool:
    kind = spec.WhichOneof("Type")
    if kind in ("pipeline", "pipelineClassifier", "pipelineRegressor"):
        pipe = getattr(spec, kind)
        pipe = pipe if kind == "pipeline" else pipe.pipeline
        return any(m.WhichOneof("Type") == "mlProgram" or _has_mlprogram(m) for m in pipe.models)
    return False
