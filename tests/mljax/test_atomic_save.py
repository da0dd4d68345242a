"""A save has no window: killed at any line of its own code, the destination holds a complete
old or new model, and the next save removes what the killed one left behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mljax
from mljax.format import fs

from helpers import convert_mil, tmp_path_for

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

_DRIVER = Path(__file__).with_name("save_kill_driver.py")


def _model(scale: float) -> Path:
    """``y = x @ w``; ``w`` large enough for coremltools to store it in the weight blob."""
    w = (np.arange(120, dtype=np.float32).reshape(3, 40) + 1) * scale

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.matmul(x=x, y=w, name="y")
    return convert_mil(prog)


@pytest.fixture(scope="module")
def two_models():
    return _model(1.0), _model(-2.0)


@pytest.mark.parametrize("mode", ["exchange", "no-exchange"])
def test_kill_at_every_line_of_a_save_leaves_a_complete_model(two_models, mode):
    if mode == "exchange" and fs._EXCHANGE is None:
        pytest.skip("this OS has no atomic exchange call")
    dest = tmp_path_for("killed.mlpackage")
    args = [sys.executable, str(_DRIVER), *map(str, two_models), str(dest)]
    if mode == "no-exchange":
        args.append("--no-exchange")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mljax.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["kill_points"] > 30          # every executed line of the save was a kill point
    assert report["leftovers"] == []           # the last save cleaned what the killed ones left
    assert report["data_items"] == ["com.apple.CoreML"] if mode == "exchange" else len(report["data_items"]) == 1
    assert report["final_is_a"]
    x = np.ones((2, 3), np.float32)
    expect = x @ ((np.arange(120, dtype=np.float32).reshape(3, 40) + 1) * 1.0)
    np.testing.assert_allclose(mljax.MLModel(dest).predict({"x": x})["y"], expect, rtol=1e-6)


def test_exchange_swaps_two_folders(tmp_path):
    if fs._EXCHANGE is None:
        pytest.skip("this OS has no atomic exchange call")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("A"), (b / "g").write_text("B")
    assert fs.exchange(a, b)
    assert (a / "g").read_text() == "B" and (b / "f").read_text() == "A"


def test_fallback_save_over_an_apple_layout_package(two_models, monkeypatch):
    """Without an exchange, a save over a package switches its Manifest.json; the result loads
    in mljax and in coremltools (which finds the weights through the manifest)."""
    monkeypatch.setattr(fs, "_EXCHANGE", None)
    dest = tmp_path_for("fallback.mlpackage")
    shutil.copytree(two_models[0], dest)
    mljax.MLModel(two_models[1]).save(dest)
    x = np.ones((2, 3), np.float32)
    expect = x @ ((np.arange(120, dtype=np.float32).reshape(3, 40) + 1) * -2.0)
    np.testing.assert_allclose(mljax.MLModel(dest).predict({"x": x})["y"], expect, rtol=1e-6)
    ct_model = ct.models.MLModel(str(dest), skip_model_load=True)
    assert Path(ct_model.weights_dir).resolve().is_relative_to(dest.resolve())
    assert os.listdir(dest / "Data") != ["com.apple.CoreML"] and len(os.listdir(dest / "Data")) == 1


def test_leftovers_of_dead_saves_are_removed_live_ones_kept(two_models):
    dest = tmp_path_for("left.mlpackage")
    dead = dest.parent / f".{dest.name}.mljax-999999999-abcdef.tmp"
    live = dest.parent / f".{dest.name}.mljax-{os.getppid()}-abcdef.tmp"
    dead.mkdir(), live.mkdir()
    mljax.MLModel(two_models[0]).save(dest)
    assert not dead.exists() and live.exists()
    live.rmdir()
