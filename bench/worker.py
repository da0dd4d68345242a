"""Fresh-process measurements: load + first prediction and peak resident memory.

Run by ``bench/run.py`` as ``run.py --worker load RUNTIME PATH SHAPE [--cache DIR] [--threads N]``;
prints one JSON line.  Import time is measured separately from load + first prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import cpu_seconds, one_thread_as_parent, rss_mb  # noqa: E402


def peak_rss_mb() -> float:
    """This process's high-water resident set (VmHWM; ru_maxrss would carry the parent's across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _load_mljax(path, x, cache, compute_precision):
    t0, c0 = time.perf_counter(), cpu_seconds()
    import jax
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import mljax
    one_thread_as_parent(mljax)
    jax.devices()
    t1, c1, base = time.perf_counter(), cpu_seconds(), rss_mb()
    m = mljax.MLModel(path, compute_precision=compute_precision)
    m.predict({"x": x})
    return t0, c0, t1, c1, base


def _load_ort(path, x, threads):
    t0, c0 = time.perf_counter(), cpu_seconds()
    import onnxruntime as ort
    t1, c1, base = time.perf_counter(), cpu_seconds(), rss_mb()
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(None, {s.get_inputs()[0].name: x})
    return t0, c0, t1, c1, base


def _load_torch(path, x, threads):
    t0, c0 = time.perf_counter(), cpu_seconds()
    import torch
    torch.set_num_threads(threads)
    t1, c1, base = time.perf_counter(), cpu_seconds(), rss_mb()
    m = torch.jit.load(path)
    with torch.inference_mode():
        m(torch.from_numpy(x))
    return t0, c0, t1, c1, base


def _phases(path, x, cache):
    """Where mljax's load + first prediction goes: the same steps as MLModel + predict, one at a time."""
    marks = [("start", time.perf_counter(), cpu_seconds())]

    def mark(name):
        marks.append((name, time.perf_counter(), cpu_seconds()))
    import jax
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import mljax
    from mljax.format.package import load_spec
    from mljax.stage import build_stage
    one_thread_as_parent(mljax)
    jax.devices()
    mark("import jax + mljax")
    loaded = load_spec(path)
    mark("read spec (protobuf)")
    stage = build_stage(loaded.spec, loaded.model_dir)
    mark("MIL program + LoweredFunction")
    weights = jax.device_put(stage.weights)
    mark("weights to device")
    from mljax import cache as exec_cache
    cached = exec_cache.CachedJit(jax.jit(stage.fn), stage.digest)
    folder = exec_cache.cache_dir()
    entry = cached.entry(folder, weights, {"x": x}, {}) if folder is not None else None
    compiled = exec_cache.load(entry) if entry is not None else None
    if compiled is not None:
        mark("executable from mljax's cache (deserialize)")
    else:
        traced = jax.jit(stage.fn).trace(weights, {"x": x}, {})
        mark("trace (interpret MIL ops)")
        lowered = traced.lower()
        mark("lower to StableHLO")
        compiled = lowered.compile()
        mark("XLA compile" + (" / JAX cache read" if cache else ""))
        if entry is not None:
            exec_cache.store(entry, compiled)
            mark("store in mljax's cache (serialize)")
    jax.block_until_ready(compiled(weights, {"x": x}, {}))
    mark("first execution")
    del mljax
    return {name: (t - marks[i][1], c - marks[i][2]) for i, (name, t, c) in enumerate(marks[1:])}


def _personalize(samples: int, epochs: int):
    """Personalize the demo pipeline twice in this process: the first task compiles, the second not."""
    import numpy as np

    import mljax
    from mljax import MLModel
    from updatable import UpdateTask
    one_thread_as_parent(mljax)
    from updatable.demo import demo_data, demo_model_path
    x, y = demo_data()
    idx = np.random.default_rng(0).permutation(np.arange(int(len(x) * 0.6), len(x)))[:samples]
    model = MLModel(demo_model_path())
    out = {}
    for key in ("first", "again"):
        marks = []
        t0 = time.perf_counter()
        task = UpdateTask(model, {"pixels": x[idx], "digit": y[idx]}, parameters={"epochs": epochs},
                          progress_handler=lambda c: marks.append((c.event, time.perf_counter())))
        task.run()
        out[f"{key}_s"] = time.perf_counter() - t0
        if key == "again":
            out["steady_s"] = marks[-1][1] - marks[0][1]
    return out


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["load", "phases", "personalize"])
    p.add_argument("runtime", choices=["mljax", "mljax-fp32", "ort", "torch"])
    p.add_argument("path")
    p.add_argument("shape")
    p.add_argument("--cache", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args(argv)
    if a.what == "personalize":
        print(json.dumps(_personalize(int(a.shape), a.epochs)))
        return
    import numpy as np
    x = np.random.default_rng(0).standard_normal([int(s) for s in a.shape.split(",")]).astype(np.float32)
    start_rss = rss_mb()
    if a.what == "phases":
        print(json.dumps(_phases(a.path, x, a.cache)))
        return
    if a.runtime.startswith("mljax"):
        t0, c0, t1, c1, base = _load_mljax(a.path, x, a.cache, "float32" if a.runtime == "mljax-fp32" else None)
    elif a.runtime == "ort":
        t0, c0, t1, c1, base = _load_ort(a.path, x, a.threads)
    else:
        t0, c0, t1, c1, base = _load_torch(a.path, x, a.threads)
    t2, c2 = time.perf_counter(), cpu_seconds()
    print(json.dumps({"import_s": t1 - t0, "import_cpu_s": c1 - c0, "load_first_s": t2 - t1,
                      "load_first_cpu_s": c2 - c1, "start_rss_mb": start_rss, "base_rss_mb": base,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main(sys.argv[1:])
