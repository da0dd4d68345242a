"""``mljax bench MODEL``: load time, first prediction, latency and throughput after warm-up."""
from __future__ import annotations

import time

import numpy as np

from mljax.errors import MLJaxError

__all__ = ["add_subcommand", "bench"]


def _example_inputs(model, rng) -> dict:
    data = {}
    for name, spec in model.input_description.items():
        if spec.kind == "multiArray":
            shape = tuple(spec.enumerated[0]) if spec.enumerated else \
                tuple(lo for lo, _ in spec.ranges) if spec.ranges else tuple(spec.shape or ())
            data[name] = rng.normal(size=shape).astype(spec.dtype) if np.dtype(spec.dtype).kind == "f" \
                else rng.integers(0, 2, size=shape).astype(spec.dtype)
        elif spec.kind == "image":
            h, w = spec.shape
            channels = 1 if spec.color_space and "GRAY" in spec.color_space else 3
            data[name] = rng.integers(0, 256, size=(h, w, channels)).astype(np.uint8)
        elif spec.kind in ("double", "int64"):
            data[name] = 1
        else:
            raise MLJaxError(f"mljax bench cannot invent a value for input {name!r} of kind {spec.kind!r}")
    return data


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def bench(path, *, repeats: int = 50, batch: int = 32, compute_precision=None) -> dict:
    """Measure one model; returns the numbers ``mljax bench`` prints."""
    from mljax import MLModel
    t0 = time.perf_counter()
    model = MLModel(path, compute_precision=compute_precision)
    load_s = time.perf_counter() - t0
    example = _example_inputs(model, np.random.default_rng(0))
    t0 = time.perf_counter()
    model.predict(example)
    first_s = time.perf_counter() - t0
    for _ in range(3):
        model.predict(example)
    latency = _median_ms(lambda: model.predict(example), repeats)
    items = [example] * batch
    model.predict(items)
    batch_ms = _median_ms(lambda: model.predict(items), max(3, repeats // 5))
    return {"load_s": load_s, "first_predict_s": first_s, "latency_ms": latency,
            "batch": batch, "batch_ms": batch_ms, "throughput_per_s": batch / (batch_ms / 1e3)}


def _cmd_bench(args) -> int:
    r = bench(args.model, repeats=args.repeats, batch=args.batch, compute_precision=args.compute_precision)
    print(f"load                 {r['load_s'] * 1e3:9.1f} ms")
    print(f"first predict        {r['first_predict_s'] * 1e3:9.1f} ms (includes compiling)")
    print(f"latency (batch 1)    {r['latency_ms']:9.3f} ms  (median of {args.repeats})")
    print(f"batch {r['batch']:<3d}            {r['batch_ms']:9.3f} ms  -> {r['throughput_per_s']:.1f} samples/s")
    return 0


def add_subcommand(sub, name: str) -> None:
    p = sub.add_parser(name, help="latency and throughput of a model after warm-up")
    p.add_argument("model", help=".mlpackage folder or .mlmodel file")
    p.add_argument("--repeats", type=int, default=50, help="timed predictions per measurement (default 50)")
    p.add_argument("--batch", type=int, default=32, help="samples of the throughput measurement (default 32)")
    p.add_argument("--compute-precision", choices=["auto", "declared", "float16", "float32"], default="auto",
                      help="auto (default): fp16 programs compute in fp32 on the CPU, declared types elsewhere; "
                           "declared/float16: exact declared types; float32: always fp32")
    p.set_defaults(func=_cmd_bench)
