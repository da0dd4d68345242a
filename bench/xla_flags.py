"""XLA:CPU's own paths, measured: does any runtime flag set make mljax faster?

XLA reads ``XLA_FLAGS`` once per process, so each flag set gets a persistent worker process
that loads the zoo models and compiles them; the parent then times every (model, batch)
in interleaved rounds across the workers (the same background load for each flag set) and
reports each flag set's CPU time relative to XLA's defaults.  Values are checked against
the default worker's outputs first: a flag set that changes results beyond 1e-4 is marked.

    python bench/xla_flags.py [--models cnn,dwcnn,...,resnet18,bert,...] [--rounds 5]

Writes a markdown table to stdout (and ``--out`` if given).  mljax sets a flag set by default
only if it wins on this table (today: LLVM's full unroll limit, ``mljax.cpu.LLVM_UNROLL``, which
``import mljax`` adds); every worker here runs with ``MLJAX_XLA_DEFAULTS=0``, so the *default* row
is XLA's own defaults and each other row exactly its flags.  See docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

sys.path.insert(0, str(HERE.parent))
from mljax.cpu import DEFAULTS_ENV, LLVM_UNROLL, RETAIN_ENV  # noqa: E402  (does not import JAX)
from mljax.cpu import EIGEN_SINGLE as _SINGLE  # noqa: E402

WIN_GEOMEAN, WIN_WORST = 0.95, 1.05
FLAG_SETS = {
    "default": "",
    "LLVM full unroll up to 8 iterations (mljax's default)": LLVM_UNROLL,
    "no thunk runtime": "--xla_cpu_use_thunk_runtime=false",
    "fast math": "--xla_cpu_enable_fast_math=true",
    "XNNPACK graph fusion (greedy)": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "512-bit vectors": "--xla_cpu_prefer_vector_width=512",
    "no thunk runtime, 512-bit vectors": "--xla_cpu_use_thunk_runtime=false --xla_cpu_prefer_vector_width=512",
    "oneDNN fusion (dot)": "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
    "YNNPACK fusion (dot, eltwise)":
        "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
    "YNNPACK fusion (conv, dot)":
        "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


# --- the worker: one process per flag set --------------------------------------------------
def _worker(names: list[str], work: str) -> None:
    import jax
    import mljax
    from measure import one_thread_as_parent
    one_thread_as_parent(mljax)       # flag_env's one thread, and calls inline as set_cpu_threads(1) runs them
    import real
    import zoo
    fns = {}
    for name in names:
        src = real if name in real.REAL else zoo
        path = src.build(name, Path(work), log=lambda *a: None)["fp32"]
        m = mljax.MLModel(path)
        for batch in (1, 32):
            x = src.example_input(name, batch)
            feed = {"x": jax.device_put(x if batch == 1 else x[:, None])}
            fn = m._predict_fn if batch == 1 else m._batched_fn
            fns[f"{name}/{batch}"] = (lambda fn=fn, m=m, feed=feed: jax.block_until_ready(fn(m.weights, feed, {})))
    outs = {k: float(np.asarray(next(iter(f()[0].values()))).astype(np.float64).sum()) for k, f in fns.items()}
    print(json.dumps({"ready": sorted(fns), "checksums": outs}), flush=True)
    for line in sys.stdin:
        key, budget = line.split()
        f = fns[key]
        times, walls, spent = [], [], 0.0
        while spent < float(budget) or len(times) < 3:
            c, w = time.process_time(), time.perf_counter()
            f()
            times.append(time.process_time() - c)
            walls.append(time.perf_counter() - w)
            spent += times[-1]
        print(json.dumps({"median": float(np.median(times)), "wall": float(np.median(walls))}), flush=True)


def flag_env(flags: str, mljax_defaults: bool = False, retain: bool = True) -> dict:
    """The environment of one flag set's worker: one thread (as the peers in bench/run.py), the
    flags, mljax's default flags only if ``mljax_defaults``, and freed memory kept (``RETAIN_ENV``,
    as bench/run.py's process: no page faults of fresh temporaries in the times) if ``retain``."""
    env = {"XLA_FLAGS": f"{_SINGLE} {flags}".strip(), "PJRT_NPROC": "1", **(RETAIN_ENV if retain else {})}
    return env if mljax_defaults else {**env, DEFAULTS_ENV: "0"}


def outputs_differ(got: float, want: float) -> bool:
    """Two workers' output checksums disagree beyond 1e-4 (relative, plus absolute near 0)."""
    return abs(got - want) > 1e-4 * (1 + abs(want))


def machine_line(load: float) -> str:
    import platform
    import jax
    return (f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
            f"load average at start {load:.1f} (above the core count: other processes competed)\n\n")


def parser(description: str, rounds: int, out: str) -> argparse.ArgumentParser:
    """The options of a study run over run_workers: models, cache, rounds, time budget, output file."""
    import zoo
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", default="cnn,dwcnn,transformer,lstm,gru,"
                                       "resnet18,mobilenet_v3_small,efficientnet_b0,bert,llama")
    p.add_argument("--work", default=str(zoo.default_work_dir()))
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--budget", type=float, default=0.3, help="CPU seconds per measurement")
    p.add_argument("--out", default=str(HERE.parent / "docs" / out))
    return p


def _start(config: dict, names, work):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **config)
    p = subprocess.Popen([sys.executable, __file__, "--worker", "--models", ",".join(names), "--work", work],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    return p


def _read(p) -> dict:
    while True:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("a flag-set worker died (its stderr is above)")
        if line.startswith("{"):
            return json.loads(line)


def run_workers(configs: dict, names, work, rounds: int, budget: float):
    """Each config (label -> environment variables) in its own worker; interleaved rounds over every
    (model, batch).  Returns the workers' ready messages and {"cpu"/"wall": {label: {key: [s...]}}}."""
    import real
    import zoo
    for name in names:   # converted once, here: the workers only read the cache
        (real if name in real.REAL else zoo).build(name, Path(work))
    workers = {label: _start(env, names, work) for label, env in configs.items()}
    ready = {label: _read(p) for label, p in workers.items()}
    labels = list(workers)
    keys = ready[labels[0]]["ready"]
    times = {label: {k: [] for k in keys} for label in workers}
    walls = {label: {k: [] for k in keys} for label in workers}
    for r in range(rounds):
        for key in keys:
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                p = workers[label]
                p.stdin.write(f"{key} {budget}\n")
                p.stdin.flush()
                got = _read(p)
                times[label][key].append(got["median"])
                walls[label][key].append(got["wall"])
    for p in workers.values():
        p.stdin.close()
        p.wait()
    return ready, {"cpu": times, "wall": walls}


def measure(names, work, rounds: int, budget: float):
    ready, t = run_workers({label: flag_env(flags) for label, flags in FLAG_SETS.items()},
                           names, work, rounds, budget)
    times, labels = t["cpu"], list(FLAG_SETS)
    keys, base_sums = ready["default"]["ready"], ready["default"]["checksums"]
    lines = ["| flag set | " + " | ".join(keys) + " | geomean |", "|---|" + "---:|" * (len(keys) + 1)]
    winners = []
    for label in labels:
        ratios = [float(np.median(np.asarray(times[label][k]) / np.asarray(times["default"][k]))) for k in keys]
        changed = [k for k in keys if outputs_differ(ready[label]["checksums"][k], base_sums[k])]
        cells = [f"{x:.2f}x" + (" (values differ)" if k in changed else "") for x, k in zip(ratios, keys)]
        geo = float(np.exp(np.mean(np.log(ratios))))
        if label != "default" and geo <= WIN_GEOMEAN and max(ratios) <= WIN_WORST and not changed:
            winners.append(f"{label} ({geo:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {geo:.2f}x |")
    base = ", ".join(f"{k} {1e3 * np.median(times['default'][k]):.2f} ms" for k in keys)
    verdict = (f"Flag sets that win across the table: {', '.join(winners)}." if winners else
               "No flag set wins across the table.")
    mine = next(label for label, flags in FLAG_SETS.items() if flags == LLVM_UNROLL)
    ratios = [float(np.median(np.asarray(times[mine][k]) / np.asarray(times["default"][k]))) for k in keys]
    verdict += (f"  mljax's default, *{mine}*: geomean {np.exp(np.mean(np.log(ratios))):.2f}x, best "
                f"{min(ratios):.2f}x, worst {max(ratios):.2f}x (`mljax.cpu.default_xla_flags` gives the "
                "elementwise loops it fixes, 4-6x per element).")
    return verdict, "\n".join(lines) + f"\n\nDefault flags, CPU ms per call (model/batch): {base}.\n"


def main(argv=None):
    p = parser(__doc__.splitlines()[0], 5, "xla_flags.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    names = a.models.split(",")
    if a.worker:
        return _worker(names, a.work)
    load = os.getloadavg()
    verdict, table = measure(names, a.work, a.rounds, a.budget)
    doc = ("<!-- Generated by bench/xla_flags.py; do not edit.  Regenerate: `python bench/xla_flags.py`. -->\n"
           "# XLA:CPU flag sets, measured on mljax's zoo and the real architectures\n\n"
           "Each flag set's CPU time per call relative to XLA's defaults (below 1: faster), the median of "
           f"{a.rounds} interleaved rounds; one thread each (`PJRT_NPROC=1 XLA_FLAGS={_SINGLE}`, calls inline) and freed "
           "memory kept (`mljax.cpu.RETAIN_ENV`, as in docs/performance.md), fp32 programs, batch 1 and a "
           f"vmapped batch of 32.  A flag set wins when its geomean is at most {WIN_GEOMEAN:.2f}x, no model "
           f"is slower than {WIN_WORST:.2f}x and no output changes.  {verdict}\n\n"
           "Flags are placed first in `XLA_FLAGS`: XLA stops reading the variable at the first token "
           "that is not a `--flag` (an earlier version of this study appended them after such a token "
           "and so measured XLA's defaults seven times).  `--xla_cpu_use_thunk_runtime=false` is "
           "accepted but no longer supported by this XLA (it warns and keeps the thunk runtime).\n\n"
           + machine_line(load[0]) + table)
    print(doc)
    Path(a.out).write_text(doc)


if __name__ == "__main__":
    main()
