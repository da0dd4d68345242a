"""The executable cache key holds a digest of mljax's own code; a damaged entry is logged."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import mljax
import mljax.cache
from helpers import convert_mil, tmp_path_for

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

W = np.linspace(-1, 1, 120, dtype=np.float32).reshape(3, 40)


@mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
def _prog(x):
    return mb.relu(x=mb.matmul(x=x, y=W), name="y")


@pytest.fixture(scope="module")
def package():
    return convert_mil(_prog)


@pytest.fixture
def cache(monkeypatch):
    folder = tmp_path_for("cache")
    monkeypatch.setattr(mljax.cache, "_DIR", [folder])
    return folder


def test_source_digest_follows_every_source_file():
    src = tmp_path_for("mljax-src")
    shutil.copytree(Path(mljax.__file__).parent, src, ignore=shutil.ignore_patterns("__pycache__"))
    before = mljax.cache.source_digest(src)
    lowering = src / "ops" / "activation.py"
    lowering.write_text(lowering.read_text() + "\n# a changed lowering\n")
    assert mljax.cache.source_digest(src) != before


def test_a_code_change_misses_the_cache(cache, package, monkeypatch):
    x = np.ones((2, 3), np.float32)
    model = mljax.MLModel(package)
    model.predict({"x": x})
    entry = model._cached_fn.entry(cache, model.weights, {"x": x}, {})
    assert entry.exists()
    monkeypatch.setattr(mljax.cache, "SOURCE_DIGEST", b"another version of mljax's code")
    assert model._cached_fn.entry(cache, model.weights, {"x": x}, {}) != entry
    again = mljax.MLModel(package)
    np.testing.assert_allclose(again.predict({"x": x})["y"], np.maximum(x @ W, 0), rtol=1e-6)
    assert again._cached_fn.loaded_from_disk == 0       # compiled, not the old code's executable


def test_a_damaged_entry_is_logged_and_recompiled(cache, package, caplog):
    x = np.ones((2, 3), np.float32)
    mljax.MLModel(package).predict({"x": x})
    (entry,) = cache.glob("*.bin")
    entry.write_bytes(b"not an executable")
    with caplog.at_level(logging.WARNING, logger="mljax.cache"):
        model = mljax.MLModel(package)
        np.testing.assert_allclose(model.predict({"x": x})["y"], np.maximum(x @ W, 0), rtol=1e-6)
    assert model._cached_fn.loaded_from_disk == 0
    (record,) = [r for r in caplog.records if r.name == "mljax.cache"]
    assert record.levelno == logging.WARNING and str(entry) in record.getMessage()
    assert "compiling it again" in record.getMessage()
