"""The newcomer's main job: ``mljax demo`` and ``mljax update`` from the command line."""
import subprocess
import sys

import numpy as np

import mljax
from updatable.demo import demo_data, demo_model_path, run_demo


def test_demo_improves_accuracy_and_writes_an_updatable_model(tmp_path):
    before_bytes = (demo_model_path() / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes()
    result = run_demo(tmp_path / "me.mlpackage", progress=False, echo=lambda *_: None)
    assert result["after"] >= result["before"] + 0.1
    assert result["losses"][-1] < result["losses"][0]
    model = mljax.MLModel(result["path"])
    assert model.get_spec().isUpdatable
    # the embedded model is untouched
    assert (demo_model_path() / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes() == before_bytes


def test_cli_update_and_errors(tmp_path):
    x, y = demo_data()
    data = tmp_path / "mine.npz"
    np.savez(data, pixels=x[-30:], digit=y[-30:])
    out = tmp_path / "out.mlpackage"
    run = subprocess.run([sys.executable, "-m", "mljax", "update", str(demo_model_path()), "--data", str(data),
                          "--epochs", "3", "--output", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and out.is_dir()
    bad = subprocess.run([sys.executable, "-m", "mljax", "update", str(demo_model_path()), "--data", str(data),
                          "--learning-rate", "7", "--output", str(tmp_path / "x.mlpackage")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "learning_rate" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.mlpackage").exists()


def test_cli_bench_and_help():
    run = subprocess.run([sys.executable, "-m", "mljax", "bench", str(demo_model_path()), "--repeats", "5",
                          "--batch", "4"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "latency (batch 1)" in run.stdout and "samples/s" in run.stdout
    helps = subprocess.run([sys.executable, "-m", "mljax", "--help"], capture_output=True, text=True).stdout
    for command in ("info", "predict", "update", "demo", "bench"):
        assert command in helps
    missing = subprocess.run([sys.executable, "-m", "mljax", "bench", "nope.mlpackage"], capture_output=True, text=True)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
