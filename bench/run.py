"""mljax vs ONNX Runtime vs PyTorch eager on CPU, side by side; writes docs/performance.md.

    python bench/run.py            # full run (about 20-25 minutes on 2 cores, real architectures included)
    python bench/run.py --quick    # under 3 minutes: fewer models, rounds and repeats

Converted models are cached in ``$MLJAX_BENCH_DIR`` (default ``~/.cache/mljax-bench``).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import zoo  # noqa: E402
from measure import interleaved, ratio, run_worker  # noqa: E402
import real  # noqa: E402
from report import Report  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --- predict ------------------------------------------------------------------------------
def _ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def predict_runners(name, paths, batch, threads, variants):
    """{runner name: zero-argument callable} predicting one batch of ``batch`` samples."""
    import torch
    import mljax
    x = zoo.example_input(name, batch)
    tm = zoo.torch_model(name)
    sess = _ort_session(paths["onnx"], threads)
    xt = torch.from_numpy(x)

    def torch_call():
        with torch.inference_mode():
            return tm(xt)
    runners = {"onnxruntime": lambda: sess.run(None, {"x": x}), "torch": torch_call}
    models = {"mljax": (paths["fp32"], None)}
    if "fp16" in variants:
        models["mljax fp16"] = (paths["fp16"], None)                   # the default: "auto"
        models["mljax fp16 declared"] = (paths["fp16"], "float16")     # exact fp16 ("declared"; this alias also names it before typed execution)
    for label, (path, cp) in models.items():
        m = mljax.MLModel(path, compute_precision=cp)
        if batch == 1:
            feed = {"x": x}
        else:
            feed = [{"x": x[i:i + 1]} for i in range(batch)]
        runners[label] = (lambda m=m, feed=feed: m.predict(feed))
    return runners


def bench_predict(rep: Report, names, work, args):
    for name in names:
        paths = zoo.build(name, work, rebuild=args.rebuild, log=log)
        for batch in (1, 32):
            log(f"  predict {name} batch {batch}")
            runners = predict_runners(name, paths, batch, args.threads, args.variants)
            timings = interleaved(runners, rounds=args.rounds, budget=args.budget)
            rep.predict(name, batch, timings)
            rep.breakdown(name, batch, predict_breakdown(name, paths, batch, args), timings)


def predict_breakdown(name, paths, batch, args):
    """mljax's fp32 predict split into host input checks, the XLA executable and host outputs (CPU ms)."""
    import jax
    import mljax
    m = mljax.MLModel(paths["fp32"])
    x = zoo.example_input(name, batch)
    feed = {"x": x} if batch == 1 else [{"x": x[i:i + 1]} for i in range(batch)]
    fn = m._predict_fn if batch == 1 else m._batched_fn
    xd = jax.device_put(x if batch == 1 else x[:, None])
    compiled = fn.lower(m.weights, {"x": xd}, {}).compile()
    out = compiled(m.weights, {"x": xd}, {})[0]
    parts = {
        "predict (total)": lambda: m.predict(feed),
        "XLA executable (device input, no host work)": lambda: jax.block_until_ready(compiled(m.weights, {"x": xd}, {})),
        "input checks + stacking (host)": (lambda: m._prepare(feed)) if batch == 1 else
        (lambda: {"x": np.stack([m._prepare(d)["x"] for d in feed])}),
        "outputs to NumPy + per-sample dicts (host)": (lambda: m._finish(out)) if batch == 1 else
        (lambda: [m._finish({k: np.asarray(v)[i] for k, v in out.items()}) for i in range(batch)]),
    }
    return interleaved(parts, rounds=max(3, args.rounds // 2), budget=args.budget)


# --- lowering overhead ----------------------------------------------------------------------
def bench_lowering(rep: Report, work, args):
    """The cnn through mljax vs the same network written in JAX by hand (same weights)."""
    import jax
    import mljax
    paths = zoo.build("cnn", work, log=log)
    fn, w = zoo.cnn_jax(zoo.torch_model("cnn"))
    hand = jax.jit(fn)
    rows = {}
    for batch in (1, 32):
        x = zoo.example_input("cnn", batch)
        m = mljax.MLModel(paths["fp32"])
        wd, xd = jax.device_put(w), jax.device_put(x)
        if batch == 1:
            low = m._predict_fn
        else:
            low = m._batched_fn
            xd = jax.device_put(x[:, None])
        ref = np.asarray(hand(wd, xd if batch == 1 else xd[:, 0]))
        got = np.asarray(low(m.weights, {"x": xd}, {})[0]["y"]).reshape(ref.shape)
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
        hand_x = xd if batch == 1 else xd[:, 0]
        runners = {
            "hand-written JAX": lambda: hand(wd, hand_x).block_until_ready(),
            "mljax lowered fn": lambda: jax.block_until_ready(low(m.weights, {"x": xd}, {})),
            "hand-written JAX + NumPy in/out": lambda: np.asarray(hand(wd, x if batch == 1 else x)),
            "mljax MLModel.predict": (lambda: m.predict({"x": x})) if batch == 1 else
            (lambda feed=[{"x": x[i:i + 1]} for i in range(batch)]: m.predict(feed)),
        }
        log(f"  lowering overhead cnn batch {batch}")
        rows[batch] = interleaved(runners, rounds=args.rounds, budget=args.budget)
        rows[batch, "hlo"] = (_hlo_ops(hand, wd, hand_x), _hlo_ops(low, m.weights, {"x": xd}, {}))
    rep.lowering(rows)


def _hlo_ops(fn, *a) -> dict:
    """Counts of the main instruction kinds in the optimized HLO of ``fn(*a)``."""
    text = fn.lower(*a).compile().as_text()
    kinds = ["convolution", "fusion", "reduce-window", "dot", "copy", "transpose", "custom-call"]
    ops = [ln for ln in text.splitlines() if " = " in ln]
    return {k: sum(1 for ln in ops if f" {k}(" in ln) for k in kinds} | {"instructions": len(ops)}


# --- load + first prediction, peak memory -------------------------------------------------------
def _shape_arg(shape):
    return ",".join(map(str, shape))


def bench_load(rep: Report, names, work, args):
    for name in names[:1] if args.quick else names:
        paths = zoo.build(name, work, log=log)
        shape = _shape_arg(zoo.ZOO[name].shape)
        log(f"  load + first prediction {name} ({args.load_repeats} fresh processes per line)")
        res = {"mljax cold": [], "mljax warm": [], "onnxruntime": [], "torch (TorchScript)": []}
        for _ in range(args.load_repeats):
            cache = tempfile.mkdtemp(prefix="mljax-bench-jaxcache-")
            try:
                res["mljax cold"].append(run_worker(["load", "mljax", str(paths["fp32"]), shape, "--cache", cache]))
                res["mljax warm"].append(run_worker(["load", "mljax", str(paths["fp32"]), shape, "--cache", cache]))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            res["onnxruntime"].append(run_worker(["load", "ort", str(paths["onnx"]), shape,
                                                  "--threads", str(args.threads)]))
            res["torch (TorchScript)"].append(run_worker(["load", "torch", str(paths["torch"]), shape,
                                                          "--threads", str(args.threads)]))
        rep.load(name, res)
        if name == names[0]:
            cache = tempfile.mkdtemp(prefix="mljax-bench-jaxcache-")
            try:
                cold = run_worker(["phases", "mljax", str(paths["fp32"]), shape, "--cache", cache])
                warm = run_worker(["phases", "mljax", str(paths["fp32"]), shape, "--cache", cache])
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            rep.phases[name] = (cold, warm)


def bench_big(rep: Report, work, args):
    big = zoo.big_weights_model(work, args.big_mb, log=log)
    log(f"  peak memory, {big['bytes'] / 1e6:.0f} MB of weights")
    res = {"mljax": [], "onnxruntime": []}
    for _ in range(args.load_repeats):
        res["mljax"].append(run_worker(["load", "mljax", str(big["mlpackage"]), "1,4096"]))
        res["onnxruntime"].append(run_worker(["load", "ort", str(big["onnx"]), "1,4096",
                                              "--threads", str(args.threads)]))
    rep.big(big["bytes"], res)
    rep.rss_note = _weight_copies_note(big["mlpackage"], big["bytes"])


def _weight_copies_note(path, nbytes) -> str:
    """Where the memory goes: per-call copies of weights in the optimized HLO of the big model."""
    import re
    import jax
    import mljax
    m = mljax.MLModel(path)
    x = np.zeros((1, 4096), np.float32)
    text = m._predict_fn.lower(m.weights, {"x": x}, {}).compile().as_text()
    entry = text[text.find("\nENTRY"):]
    copies = [ln for ln in entry.splitlines() if " = " in ln and "transpose" in ln.split(" = ")[0]]
    size = 0
    for ln in copies:
        dims = re.search(r"= f32\[([\d,]+)\]", ln)
        if dims:
            size += 4 * int(np.prod([int(d) for d in dims.group(1).split(",")]))
    del jax
    if not copies:
        return ("The optimized HLO of this model holds no transpose-copy of a weight parameter (`linear` "
                "contracts over the weight's second axis in place), and the weights are not copied at load "
                "(`jax.device_put` aliases the memory-mapped blob on CPU); the rest is XLA's activation buffers "
                "and the executable.")
    return (f"The optimized HLO of this model holds {len(copies)} transpose-copy fusions of weight parameters "
            f"({size / 2**20:.0f} MiB for {nbytes / 2**20:.0f} MiB of weights), materialized on every call; "
            "the weights themselves are not copied at load (`jax.device_put` aliases the memory-mapped blob "
            "on CPU), so the peak is the mapped file plus those copies.")


# --- per-layer profile ----------------------------------------------------------------------------
def bench_layers(rep: Report, work, args, batch: int = 32):
    import layers
    log(f"  per-layer profile at batch {batch}: convolutions of cnn, dwcnn; matrix products")
    convs = layers.conv_rows([n for n in ("cnn", "dwcnn") if n in args.names], batch, args, log=log)
    rep.layers(convs + layers.gemm_rows(args, log=log), batch=batch)


# --- personalizing the demo pipeline --------------------------------------------------------------
def bench_personalize(rep: Report, work, args, samples: int = 100, epochs: int = 10):
    """The demo's personalization in a fresh process: first task (compiles) and a second one."""
    res = [run_worker(["personalize", "mljax", "-", str(samples), "--epochs", str(epochs)])
           for _ in range(args.load_repeats)]
    log(f"  personalize demo: {samples} samples x {epochs} epochs")
    rep.personalize(res, samples=samples, epochs=epochs)


# --- update throughput ----------------------------------------------------------------------------
def bench_update(rep: Report, work, args):
    import torch
    import updatable
    n_in, n_hidden, n_classes, batch, lr = 256, 512, 10, 32, 0.05
    n, epochs = args.update_samples, args.update_epochs
    path, w = zoo.updatable_head(work, n_in, n_hidden, n_classes, lr=lr, batch=batch, epochs=epochs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    data = {"features": x, "label": y.astype(np.int64)}
    log(f"  update throughput: {n} samples x {epochs} epochs, batch {batch}")

    def run_mljax():
        marks = []
        task = updatable.UpdateTask(str(path), data, progress_handler=lambda c: marks.append(
            (c.event, time.perf_counter())))
        t0 = time.perf_counter()
        task.run()
        t1 = time.perf_counter()
        ends = [t for e, t in marks if e == "epoch_end"]
        return t1 - t0, (ends[-1] - ends[0]) / (len(ends) - 1)

    def run_torch():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(n_in, n_hidden), torch.nn.ReLU(), torch.nn.Linear(n_hidden, n_classes))
        with torch.no_grad():
            net[0].weight.copy_(torch.from_numpy(w["w1"]))
            net[0].bias.zero_()
            net[2].weight.copy_(torch.from_numpy(w["w2"]))
            net[2].bias.zero_()
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        g = torch.Generator().manual_seed(0)
        t0, ends = time.perf_counter(), []
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=g).split(batch):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                loss.item()
            ends.append(time.perf_counter())
        return ends[-1] - t0, (ends[-1] - ends[0]) / (len(ends) - 1)

    res = {"mljax UpdateTask": [], "torch loop": []}
    for _ in range(args.update_repeats):
        res["mljax UpdateTask"].append(run_mljax())
        res["torch loop"].append(run_torch())
    rep.update(res, n=n, epochs=epochs, batch=batch, shape=(n_in, n_hidden, n_classes))


# --- real architectures ---------------------------------------------------------------------------
def bench_real(rep: Report, work, args):
    """resnet18, mobilenet_v3_small, efficientnet_b0, BERT, Llama: fp32/fp16 programs vs ORT and torch."""
    log(f"  real architectures: {', '.join(args.real_names)}")
    rep.real(real.measure(args.real_names, work, args, interleaved=interleaved, log=log))


# --- main ---------------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run (< 3 minutes)")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "performance.md"))
    p.add_argument("--work", default=str(zoo.default_work_dir()), help="cache of converted models")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per runtime (1: XLA, ONNX Runtime and torch single-threaded, so CPU time per "
                        "call measures work even on a loaded machine)")
    p.add_argument("--no-retain", dest="retain", action="store_false",
                   help="leave glibc's default of returning large freed blocks to the kernel (by default the "
                        "benchmark process keeps them: mljax.retain_freed_memory(), for every runtime in it)")
    p.add_argument("--models", default=None, help="comma-separated zoo and real models (default: all; quick: "
                   "cnn,transformer)")
    p.add_argument("--rebuild", action="store_true", help="convert the zoo again")
    p.add_argument("--only", default=None,
                   help="comma-separated sections: predict,lowering,load,big,update,personalize,layers,real")
    a = p.parse_args(argv)
    a.variants = ("fp16",)
    names = a.models.split(",") if a.models else (["cnn", "transformer"] if a.quick else list(zoo.ZOO))
    a.names = [n for n in names if n not in real.REAL]
    a.real_names = [n for n in names if n in real.REAL] if a.models else list(real.REAL)
    if a.quick:
        a.rounds, a.budget, a.load_repeats, a.big_mb = 5, 0.02, 1, 100
        a.update_samples, a.update_epochs, a.update_repeats = 1024, 3, 1
    else:
        a.rounds, a.budget, a.load_repeats, a.big_mb = 15, 0.05, 3, 500
        a.update_samples, a.update_epochs, a.update_repeats = 4096, 5, 3
    a.sections = a.only.split(",") if a.only else ["predict", "layers", "lowering", "load", "big", "update", "personalize"]
    if not a.only and not a.quick:
        a.sections.append("real")
    return a


def _xla_threads(threads: int) -> None:
    """Single-threaded XLA when asked (inherited by the worker processes too); before jax starts."""
    if threads == 1:
        # XLA's pools sized to one thread (PJRT_NPROC=1) and single-threaded ops; without the first,
        # XLA still ran independent ops and YNNPACK's calls on a pool of one thread per core
        from mljax.cpu import set_cpu_threads
        set_cpu_threads(1)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        import worker
        return worker.main(argv[1:])
    args = parse(argv)
    _xla_threads(args.threads)
    if args.retain:
        # glibc otherwise unmaps every freed block above 32 MiB and page-faults it in again on the next
        # call (XLA allocates each call's temporaries anew); ONNX Runtime keeps its own arena.  Set in
        # this process only, so it holds for all three runtimes here; the load / peak-memory workers
        # run with glibc's defaults.  docs/cpu_settings.md measures it per model.
        from mljax.cpu import retain_freed_memory
        args.retain = retain_freed_memory()
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    rep = Report(args)
    t0 = time.perf_counter()
    log(f"mljax benchmark ({'quick' if args.quick else 'full'}): {', '.join(args.names + args.real_names)}; "
        f"sections {args.sections}")
    sections = {"predict": lambda: bench_predict(rep, args.names, work, args),
                "lowering": lambda: bench_lowering(rep, work, args),
                "load": lambda: bench_load(rep, args.names, work, args),
                "big": lambda: bench_big(rep, work, args),
                "update": lambda: bench_update(rep, work, args),
                "personalize": lambda: bench_personalize(rep, work, args),
                "layers": lambda: bench_layers(rep, work, args),
                "real": lambda: bench_real(rep, work, args)}
    for s in args.sections:
        log(f"[{time.perf_counter() - t0:6.1f}s] {s}")
        sections[s]()
    rep.finish(time.perf_counter() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(rep.markdown())
    log(f"[{time.perf_counter() - t0:6.1f}s] wrote {args.out}")


if __name__ == "__main__":
    main()
