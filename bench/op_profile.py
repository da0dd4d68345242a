"""Where a model's predict time goes, op by op: each MIL op of the lowered (optimized) program, run
alone, jitted, at the shapes it sees in the model, single-threaded, CPU time per call.

    python bench/op_profile.py model.mlpackage [--batch 32] [--top 25] [--rounds 5]

Ops run alone miss XLA's fusion with their neighbours, so the per-op sum is an upper bound of the
whole program's time (the *fusion gain* line); the table says which op kinds and shapes dominate.
A list predict of ``--batch`` samples is vmapped, so every op is timed vmapped the same way.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mljax.cpu import set_cpu_threads  # noqa: E402  (does not import JAX)

set_cpu_threads(1)   # one thread, as the ONNX Runtime / torch peers get

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mljax  # noqa: E402
from mljax.lower import LoweredFunction, _is_concrete  # noqa: E402


def _cpu_ms(fn, budget=0.2, rounds=5) -> float:
    fn()
    t = time.process_time()
    fn()
    n = int(np.clip(budget / max(time.process_time() - t, 1e-6), 1, 500))
    best = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn()
        best.append((time.process_time() - t) / n)
    return float(np.median(best)) * 1e3


def profile(model: mljax.MLModel, feed: dict, batch: int, rounds: int):
    lowered = model.stage.lowered
    records = []
    original = LoweredFunction._call

    def recording(self, op, env, *, eager=False, state=None):
        out = original(self, op, env, eager=eager, state=state)
        if not op.blocks and not eager and op.type not in ("const",):
            arrays = {v.name: env[v.name] for bound in op.inputs.values() for v in bound
                      if v.name in env and not _is_concrete(env[v.name])}
            records.append((op, {k: jax.ShapeDtypeStruct(a.shape, a.dtype) for k, a in arrays.items()}))
        return out

    LoweredFunction._call = recording
    try:
        jax.make_jaxpr(lambda w, x: jax.vmap(lambda xi: lowered(w, xi, {})[0])(x))(
            model.weights, {k: np.stack([v] * batch) for k, v in feed.items()})
    finally:
        LoweredFunction._call = original

    rows = []
    for op, avals in records:
        names = list(avals)

        def run_op(*vals, _op=op, _names=names):
            env = dict(zip(_names, vals))
            return lowered._call(_op, env)

        batched = [n for n in names if n not in model.weights]
        in_axes = tuple(0 if n in batched else None for n in names)
        f = jax.jit(jax.vmap(run_op, in_axes=in_axes) if batched else run_op)
        args = []
        for n in names:
            a = avals[n]
            shape = ((batch,) + a.shape) if n in batched else a.shape
            args.append(np.random.rand(*shape).astype(a.dtype) if np.issubdtype(a.dtype, np.floating)
                        else np.zeros(shape, a.dtype))
        args = [jax.device_put(a) for a in args]
        ms = _cpu_ms(lambda: jax.block_until_ready(f(*args)), rounds=rounds)
        shapes = " ".join("x".join(map(str, avals[n].shape)) for n in names[:3])
        if op.type == "conv":
            from mljax.ops.conv import conv_path
            st = op.inputs.get("strides")
            st = tuple(np.asarray(st[0].value).tolist()) if st else (1, 1)
            w = avals[names[1]].shape if len(names) > 1 else ()
            gr = op.inputs.get("groups")
            shapes += f" s{st} g{int(gr[0].value) if gr else 1}"
        rows.append((ms, op.type, op.name, shapes))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    model = mljax.MLModel(args.model)
    feed = {}
    for name, spec in model.input_description.items():
        shape = tuple(int(s) for s in spec.shape)
        feed[name] = np.random.rand(*shape).astype(np.float32) if spec.dtype.kind == "f" else np.zeros(shape, spec.dtype)
    feed_list = [feed] * args.batch
    whole = _cpu_ms(lambda: model.predict(feed_list if args.batch > 1 else feed), rounds=args.rounds)
    rows = profile(model, feed, args.batch, args.rounds)
    total = sum(r[0] for r in rows)
    print(f"whole predict {whole:.2f} ms; sum of {len(rows)} ops alone {total:.2f} ms")
    by_type = collections.defaultdict(lambda: [0.0, 0])
    for ms, typ, *_ in rows:
        by_type[typ][0] += ms
        by_type[typ][1] += 1
    print("\nby op type:")
    for typ, (ms, n) in sorted(by_type.items(), key=lambda kv: -kv[1][0]):
        print(f"  {typ:28s} {n:4d} ops {ms:8.2f} ms {100 * ms / total:5.1f}%")
    print(f"\ntop {args.top} ops:")
    for ms, typ, name, shapes in sorted(rows, reverse=True)[:args.top]:
        print(f"  {ms:7.3f} ms  {typ:20s} {name:40s} {shapes}")


if __name__ == "__main__":
    main()
