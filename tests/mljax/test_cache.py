"""The persistent executable cache: a warm load deserializes instead of tracing and compiling."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import mljax
import mljax.cache
from helpers import convert_mil, tmp_path_for


def _conv_program():
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    idx = np.array([2, 0, 1], np.int32)   # an integer constant baked into the trace

    @mb.program(input_specs=[mb.TensorSpec((1, 3, 8, 8), types.fp32)])
    def prog(x):
        y = mb.conv(x=x, weight=w, pad_type="same")
        y = mb.gather(x=y, indices=idx, axis=1)
        return mb.relu(x=y)
    return prog, w, idx


def _reference(x, w, idx):
    import torch
    y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    return np.maximum(y[:, idx], 0)


@pytest.fixture
def cache(monkeypatch):
    folder = tmp_path_for("cache")
    monkeypatch.setattr(mljax.cache, "_DIR", [folder])
    return folder


@pytest.fixture(scope="module")
def package():
    prog, w, idx = _conv_program()
    return convert_mil(prog), w, idx


def test_second_load_deserializes_the_executable(cache, package):
    path, w, idx = package
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    first = mljax.MLModel(path)
    out1 = first.predict({"x": x})
    assert first._cached_fn.loaded_from_disk == 0
    assert len(list(cache.glob("*.bin"))) == 1
    second = mljax.MLModel(path)
    out2 = second.predict({"x": x})
    assert second._cached_fn.loaded_from_disk == 1
    assert second.stage.fn.trace_count == 0            # never traced: the executable came from disk
    (name,) = out1
    np.testing.assert_allclose(out2[name], _reference(x, w, idx), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out1[name], out2[name])


def test_new_shapes_and_precisions_get_their_own_entries(cache, package):
    path, _, _ = package
    x = np.ones((1, 3, 8, 8), np.float32)
    mljax.MLModel(path).predict({"x": x})
    mljax.MLModel(path, compute_precision="float32").predict({"x": x})   # "auto" on the CPU: the same key
    mljax.MLModel(path, compute_precision="declared").predict({"x": x})  # another precision: its own entry
    mljax.MLModel(path).predict([{"x": x}, {"x": x}])                    # batched: the vmapped jit
    assert len(list(cache.glob("*.bin"))) == 2


def test_a_damaged_entry_is_recompiled_and_replaced(cache, package):
    path, w, idx = package
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    mljax.MLModel(path).predict({"x": x})
    (entry,) = cache.glob("*.bin")
    entry.write_bytes(b"not an executable")
    model = mljax.MLModel(path)
    out = model.predict({"x": x})
    assert model._cached_fn.loaded_from_disk == 0
    np.testing.assert_allclose(next(iter(out.values())), _reference(x, w, idx), rtol=1e-4, atol=1e-4)
    assert entry.read_bytes() != b"not an executable"


def test_changed_constant_changes_the_key(cache):
    """Two programs that differ only in a baked-in integer constant must not share an executable."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    outs = []
    for idx in ([0, 1, 2], [5, 4, 3]):
        @mb.program(input_specs=[mb.TensorSpec((1, 6), types.fp32)])
        def prog(x):
            return mb.gather(x=x, indices=np.array(idx, np.int32), axis=1)
        outs.append((idx, next(iter(mljax.MLModel(convert_mil(prog)).predict({"x": x}).values()))))
    for idx, out in outs:
        np.testing.assert_array_equal(out, x[:, idx])
    assert len(list(cache.glob("*.bin"))) == 2


def test_off_without_a_folder(monkeypatch, package):
    monkeypatch.setattr(mljax.cache, "_DIR", [None])
    monkeypatch.delenv("MLJAX_CACHE_DIR", raising=False)
    import jax
    if jax.config.jax_compilation_cache_dir:
        pytest.skip("this process has a JAX compilation cache configured")
    assert mljax.cache.cache_dir() is None
    model = mljax.MLModel(package[0])
    model.predict({"x": np.ones((1, 3, 8, 8), np.float32)})
    assert model._cached_fn._compiled == {}


def test_fresh_process_loads_from_disk(package):
    """Across processes, as a user sees it: MLJAX_CACHE_DIR set, the second process deserializes."""
    path, w, idx = package
    folder = tmp_path_for("proc-cache")
    script = textwrap.dedent(f"""
        import json, numpy as np, mljax
        m = mljax.MLModel({str(path)!r})
        out = m.predict({{"x": np.full((1, 3, 8, 8), 0.5, np.float32)}})
        print(json.dumps({{"disk": m._cached_fn.loaded_from_disk, "traces": m.stage.fn.trace_count,
                          "y": next(iter(out.values())).ravel().tolist()}}))
    """)
    env = {"MLJAX_CACHE_DIR": str(folder), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    assert (runs[0]["disk"], runs[1]["disk"]) == (0, 1)
    assert runs[1]["traces"] == 0
    ref = _reference(np.full((1, 3, 8, 8), 0.5, np.float32), w, idx)
    np.testing.assert_allclose(np.reshape(runs[1]["y"], ref.shape), ref, rtol=1e-4, atol=1e-4)


def test_cli_predict_keeps_executables_unless_told_not_to(package, monkeypatch, capsys):
    from mljax import cli
    path, w, idx = package
    folder = tmp_path_for("cli-cache")
    monkeypatch.setenv("MLJAX_CACHE_DIR", str(folder))
    monkeypatch.setattr(mljax.cache, "_DIR", [False])     # off outside the command
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    npy, out = tmp_path_for("x.npy"), tmp_path_for("out.npz")
    np.save(npy, x)
    assert cli.main(["predict", str(path), "-i", f"x={npy}", "--no-cache"]) == 0
    assert not folder.exists()
    for _ in range(2):
        assert cli.main(["predict", str(path), "-i", f"x={npy}", "-o", str(out)]) == 0
        got = np.load(out)
        np.testing.assert_allclose(got[got.files[0]], _reference(x, w, idx), rtol=1e-4, atol=1e-4)
    assert len(list((folder / "executables").glob("*.bin"))) == 1
    assert mljax.cache._DIR[0] is False                 # restored after the command
