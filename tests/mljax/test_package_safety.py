"""Packages are self-contained: links that leave them, special files and oversized files are refused
with ModelFormatError, and save copies only bytes from inside the source package."""
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

import mljax
from mljax.errors import ModelFormatError
from mljax.format import fs

from helpers import convert_mil, tmp_path_for

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0
CORE = Path("Data", "com.apple.CoreML")


@mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
def _prog(x):
    return mb.matmul(x=x, y=W, name="y")


@pytest.fixture(scope="module")
def package():
    return convert_mil(_prog)


@pytest.fixture(autouse=True)
def _no_hang():
    """A FIFO opened the naive way blocks for ever: fail the test instead."""
    def alarm(*_):
        raise TimeoutError("the test blocked (a FIFO was opened?)")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _copy(package) -> Path:
    dst = tmp_path_for("copy.mlpackage")
    shutil.copytree(package, dst)
    return dst


def _predicts(path) -> None:
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(mljax.MLModel(path).predict({"x": x})["y"], x @ W, rtol=1e-6)


def _replace_with(path: Path, make) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    make(path)


def test_data_folder_linking_outside_is_refused(package):
    bad, outside = _copy(package), _copy(package)
    _replace_with(bad / "Data", lambda p: p.symlink_to(outside / "Data"))
    with pytest.raises(ModelFormatError, match="escapes the package folder"):
        mljax.MLModel(bad)


def test_manifest_linking_outside_is_refused(package):
    bad, outside = _copy(package), _copy(package)
    _replace_with(bad / "Manifest.json", lambda p: p.symlink_to(outside / "Manifest.json"))
    with pytest.raises(ModelFormatError, match="escapes"):
        mljax.MLModel(bad)
    _replace_with(bad / "Manifest.json", lambda p: p.symlink_to("/etc/passwd"))
    with pytest.raises(ModelFormatError, match="escapes"):
        mljax.MLModel(bad)


def test_weights_linking_outside_are_refused(package):
    bad, outside = _copy(package), _copy(package)
    _replace_with(bad / CORE / "weights", lambda p: p.symlink_to(outside / CORE / "weights"))
    with pytest.raises(ModelFormatError, match="escapes"):
        mljax.MLModel(bad)


def test_links_inside_the_package_are_followed(package):
    ok = _copy(package)
    (ok / "Data" / "real").mkdir()
    shutil.move(ok / CORE, ok / "Data" / "real" / "com.apple.CoreML")
    (ok / CORE).symlink_to(ok / "Data" / "real" / "com.apple.CoreML")
    _predicts(ok)


@pytest.mark.parametrize("which", ["Manifest.json", "Data/com.apple.CoreML/model.mlmodel",
                                   "Data/com.apple.CoreML/weights/weight.bin"])
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_special_files_are_refused(package, which, kind):
    bad = _copy(package)
    _replace_with(bad / which, os.mkfifo if kind == "fifo" else os.mkdir)
    with pytest.raises(ModelFormatError, match="expected a regular file, found a " + ("FIFO" if kind == "fifo" else "folder")):
        mljax.MLModel(bad)


def test_devices_and_sizes_are_bounded(tmp_path):
    with pytest.raises(ModelFormatError, match="found a character device"):
        fs.read_regular(Path("/dev/zero"), "Manifest.json", 1 << 20)
    big = tmp_path / "big"
    big.write_bytes(b" " * 2000)
    with pytest.raises(ModelFormatError, match="expected at most 1,000 bytes, found 2,000"):
        fs.read_regular(big, "Manifest.json", 1000)


def test_malformed_manifests(package):
    bad = _copy(package)
    (bad / "Manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFormatError, match="nested too deeply"):
        mljax.MLModel(bad)
    (bad / "Manifest.json").write_text(" " * (2 << 20))
    with pytest.raises(ModelFormatError, match="expected at most"):
        mljax.MLModel(bad)
    info = json.loads((package / "Manifest.json").read_text())
    info["itemInfoEntries"][info["rootModelIdentifier"]]["path"] = 12
    (bad / "Manifest.json").write_text(json.dumps(info))
    with pytest.raises(ModelFormatError, match="malformed"):
        mljax.MLModel(bad)


def test_link_loops_and_long_names(package):
    bad = _copy(package)
    _replace_with(bad / "Manifest.json", lambda p: p.symlink_to(p))
    with pytest.raises(ModelFormatError, match="Manifest.json"):
        mljax.MLModel(bad)
    with pytest.raises(ModelFormatError):
        mljax.MLModel(str(bad / ("x" * 5000)))
    with pytest.raises(ModelFormatError):
        mljax.MLModel(str(bad / "a\0b"))


def test_save_refuses_weights_linking_outside(package):
    src, outside = _copy(package), tmp_path_for("secret.bin")
    outside.write_bytes(b"secret bytes outside the package")
    (src / CORE / "weights" / "extra.bin").symlink_to(outside)
    model = mljax.MLModel(src)          # loads: extra.bin is never read
    dest = tmp_path_for("saved.mlpackage")
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        model.save(dest)
    assert not dest.exists() and not list(dest.parent.glob(f".{dest.name}.*"))


def test_save_copies_links_inside_as_plain_files(package):
    src = _copy(package)
    (src / CORE / "weights" / "alias.bin").symlink_to(src / CORE / "weights" / "weight.bin")
    dest = mljax.MLModel(src).save(tmp_path_for("saved.mlpackage"))
    alias = dest / CORE / "weights" / "alias.bin"
    assert not alias.is_symlink() and alias.read_bytes() == (src / CORE / "weights" / "weight.bin").read_bytes()
    _predicts(dest)
