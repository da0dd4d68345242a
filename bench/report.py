"""Collects benchmark results and renders docs/performance.md."""
from __future__ import annotations

import os
import platform
import time

import numpy as np

from measure import Timing, ratio

TARGETS = {"b32_vs_ort": 1.0, "b1_vs_ort": 1.5, "vs_torch": 0.5, "lowering": 1.05,
           "cold_s": 2.0, "warm_s": 0.3, "rss_x": 1.3, "personalize_s": 1.0, "real_worst": 2.0, "fp16_x": 1.1,
           "nn_x": 1.1}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> str:
    out = []
    for mod in ("jax", "jaxlib", "onnxruntime", "onnx", "torch", "coremltools", "numpy"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing peer is reported, not fatal
            out.append(f"{mod} (missing)")
    return ", ".join(out)


def _ms(t: float) -> str:
    return f"{t * 1e3:.2f}" if t < 1 else f"{t * 1e3:.0f}"


def _x(r: float, iqr: float | None = None) -> str:
    return f"{r:.2f}x" + (f" (±{iqr / 2:.2f})" if iqr is not None else "")


def _ok(good: bool) -> str:
    return "yes" if good else "**no**"


def _med(rows: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


class Report:
    def __init__(self, args):
        self.args = args
        self.load_start = os.getloadavg()
        self.sections: list[str] = []
        self.targets: list[tuple[str, str, bool]] = []
        self.misses: list[str] = []
        self.results: dict = {}
        self.breakdowns: dict = {}
        self.phases: dict = {}
        self.rss_note = ""

    # --- sections ---------------------------------------------------------------------------
    def predict(self, name: str, batch: int, t: dict[str, Timing]) -> None:
        if not any(s.startswith("## Predict") for s in self.sections):
            self.sections.append(
                "## Predict latency\n\n"
                "Median milliseconds per `predict` call: CPU time of the process (all threads) and wall "
                "time.  Batch 32: `MLModel.predict` on a list of 32 dicts, vmapped into one call; ONNX "
                "Runtime and torch get one `(32, ...)` array.  Ratios are mljax / peer (below 1: mljax "
                "faster), the median of per-round ratios, ± half their interquartile range; targets are "
                "judged on CPU-time ratios, which other workers' load disturbs least.  Noise = IQR / "
                "median of a runtime's per-round CPU times.  ONNX Runtime runs the fp32 ONNX export in "
                "every row; *mljax fp16* is the fp16 program at the default typed execution "
                "(`compute_precision=\"auto\"`: fp32 compute on the CPU), *fp16 declared* the same program "
                "computed in exact fp16 (`compute_precision=\"declared\"`, the default before typed "
                "execution).\n\n"
                "| model | batch | runtime | CPU ms | wall ms | noise | vs ONNX Runtime (CPU / wall) "
                "| vs torch eager (CPU / wall) |\n"
                "|---|---:|---|---:|---:|---:|---:|---:|")
        ort, pt = t["onnxruntime"], t["torch"]
        lines = []
        for k, v in t.items():
            row = f"| {name} | {batch} | {k} | {_ms(v.median)} | {_ms(v.wall_median)} | {v.noise:.0%} |"
            if k.startswith("mljax"):
                r_o, i_o = ratio(v, ort)
                r_t, i_t = ratio(v, pt)
                row += (f" {_x(r_o, i_o)} / {_x(ratio(v, ort, wall=True)[0])} |"
                        f" {_x(r_t, i_t)} / {_x(ratio(v, pt, wall=True)[0])} |")
                if k == "mljax":
                    lim = TARGETS["b32_vs_ort"] if batch == 32 else TARGETS["b1_vs_ort"]
                    self.targets.append((f"{name} batch {batch}: mljax/ONNX Runtime <= {lim}", _x(r_o), r_o <= lim))
                    self.targets.append((f"{name} batch {batch}: mljax/torch <= {TARGETS['vs_torch']}", _x(r_t),
                                         r_t <= TARGETS["vs_torch"]))
                    self.results[name, batch] = (r_o, r_t)
            else:
                row += " | |"
            lines.append(row)
        self.sections[-1] += "\n" + "\n".join(lines)

    def breakdown(self, name: str, batch: int, parts: dict[str, Timing], t: dict[str, Timing]) -> None:
        """Kept for the misses section: where mljax's predict time goes, next to ONNX Runtime's."""
        self.breakdowns[name, batch] = (parts, t["onnxruntime"].median, t["torch"].median)

    def lowering(self, rows) -> None:
        out = ["## Lowering overhead (cnn, hand-written JAX with the same weights)\n",
               "`bench/zoo.py: cnn_jax` is the cnn written directly with `lax.conv_general_dilated` "
               "(batch norm folded, NCHW).  *Lowered fn* calls the jitted function mljax builds from the "
               "ML program with device arrays (no host conversion); *predict* adds mljax's input "
               "checks and NumPy outputs, against the hand-written function with NumPy in and out.\n",
               "CPU ms per call (wall-time ratio after the slash).\n",
               "| batch | hand-written JAX ms | mljax lowered fn ms | ratio | hand + NumPy ms | MLModel.predict ms | ratio |",
               "|---:|---:|---:|---:|---:|---:|---:|"]
        for batch in (1, 32):
            t = rows[batch]
            hand, low = t["hand-written JAX"], t["mljax lowered fn"]
            hn, pr = t["hand-written JAX + NumPy in/out"], t["mljax MLModel.predict"]
            r1, i1 = ratio(low, hand)
            r2, i2 = ratio(pr, hn)
            out.append(f"| {batch} | {_ms(hand.median)} | {_ms(low.median)} | {_x(r1, i1)} / "
                       f"{_x(ratio(low, hand, wall=True)[0])} | {_ms(hn.median)} | {_ms(pr.median)} | "
                       f"{_x(r2, i2)} / {_x(ratio(pr, hn, wall=True)[0])} |")
            self.targets.append((f"lowering overhead batch {batch}: lowered/hand-written <= {TARGETS['lowering']}",
                                 _x(r1), r1 <= TARGETS["lowering"]))
        out += ["", "Optimized HLO of the entry computation (instruction counts):", "",
                "| batch | function | " + " | ".join(rows[1, "hlo"][0]) + " |",
                "|---:|---|" + "---:|" * len(rows[1, "hlo"][0])]
        for batch in (1, 32):
            for label, counts in zip(("hand-written", "mljax"), rows[batch, "hlo"]):
                out.append(f"| {batch} | {label} | " + " | ".join(str(v) for v in counts.values()) + " |")
        self.sections.append("\n".join(out))

    def load(self, name: str, res: dict[str, list[dict]]) -> None:
        if not any(s.startswith("## Load") for s in self.sections):
            self.sections.append(
                "## Load + first prediction (fresh processes)\n\n"
                "Each line is a new Python process.  *import* = importing the runtime (jax + mljax, "
                "onnxruntime, torch); *load + first* = from a loaded interpreter to the first prediction's "
                "result: mljax's `MLModel(path)` + `predict`, ONNX Runtime's `InferenceSession` + `run`, "
                "`torch.jit.load` + call.  *cold*: empty caches; *warm*: the caches filled by the cold "
                "process: JAX's persistent compilation cache (`jax_compilation_cache_dir`, "
                "`jax_persistent_cache_min_compile_time_secs=0`) and, beside it, mljax's executable cache "
                "(`mljax.cache`: the compiled executable serialized per program and input signature, so a "
                "warm load neither traces, lowers nor compiles).  CPU s = user + system time of the "
                "process during that phase (less sensitive to other workers' load than wall time).  "
                "Peak RSS = the process's maximum resident set; + load = above the RSS after import.\n\n"
                "| model | runtime | import s | load + first s | CPU s | vs ONNX Runtime | peak RSS MB | + load MB |\n"
                "|---|---|---:|---:|---:|---:|---:|---:|")
        ort = _med(res["onnxruntime"], "load_first_s")
        lines = []
        for k, rows in res.items():
            lf = _med(rows, "load_first_s")
            inc = float(np.median([r["peak_rss_mb"] - r["base_rss_mb"] for r in rows]))
            lines.append(f"| {name} | {k} | {_med(rows, 'import_s'):.2f} | {lf:.2f} | "
                         f"{_med(rows, 'load_first_cpu_s'):.2f} | {_x(lf / ort)} | {_med(rows, 'peak_rss_mb'):.0f} | {inc:.0f} |")
        cold, warm = _med(res["mljax cold"], "load_first_s"), _med(res["mljax warm"], "load_first_s")
        self.targets.append((f"{name}: load + first, cold < {TARGETS['cold_s']} s", f"{cold:.2f} s "
                             f"(CPU {_med(res['mljax cold'], 'load_first_cpu_s'):.2f} s)", cold < TARGETS["cold_s"]))
        self.targets.append((f"{name}: load + first, warm < {TARGETS['warm_s']} s", f"{warm:.2f} s "
                             f"(CPU {_med(res['mljax warm'], 'load_first_cpu_s'):.2f} s)", warm < TARGETS["warm_s"]))
        self.sections[-1] += "\n" + "\n".join(lines)

    def big(self, nbytes: int, res: dict[str, list[dict]]) -> None:
        mb = nbytes / 2**20
        out = [f"## Peak memory with {mb:.0f} MiB of weights\n",
               f"An MLP of 4096x4096 fp32 linear layers ({mb:.0f} MiB of weights) as an ML program and as ONNX "
               "(same weights), loaded in a fresh process and run once.  *x weights* = (peak RSS - RSS after "
               "import) / weight bytes.\n",
               "| runtime | RSS after import MiB | peak RSS MiB | + load MiB | x weights | load + first s |",
               "|---|---:|---:|---:|---:|---:|"]
        for k, rows in res.items():
            inc = float(np.median([r["peak_rss_mb"] - r["base_rss_mb"] for r in rows]))
            out.append(f"| {k} | {_med(rows, 'base_rss_mb'):.0f} | {_med(rows, 'peak_rss_mb'):.0f} | {inc:.0f} | "
                       f"{inc / mb:.2f} | {_med(rows, 'load_first_s'):.2f} |")
            if k == "mljax":
                self.targets.append((f"peak RSS loading {mb:.0f} MiB of weights <= {TARGETS['rss_x']}x weights",
                                     f"{inc / mb:.2f}x (+{inc:.0f} MiB; whole process {_med(rows, 'peak_rss_mb') / mb:.2f}x)",
                                     inc / mb <= TARGETS["rss_x"]))
        self.sections.append("\n".join(out))

    def update(self, res, *, n, epochs, batch, shape) -> None:
        out = ["## Update throughput\n",
               f"A dense head {shape[0]} -> {shape[1]} (ReLU) -> {shape[2]} (softmax, cross-entropy), both layers "
               f"updatable, SGD, mini-batch {batch}, {n} samples x {epochs} epochs, shuffled.  mljax: "
               "`updatable.UpdateTask` on the NeuralNetworkBuilder model (jitted step, one host sync per "
               "mini-batch for the loss); torch: the same head and optimizer in an eager loop calling "
               "`loss.item()` per mini-batch.  *Overall* includes the first epoch (mljax compiles its "
               "step there); *steady* = epochs after the first.\n",
               "| runtime | overall samples/s | steady samples/s | overall vs torch | steady vs torch |",
               "|---|---:|---:|---:|---:|"]
        tp = {k: (np.median([n * epochs / a for a, _ in v]), np.median([n / b for _, b in v])) for k, v in res.items()}
        base = tp["torch loop"]
        for k, (o, s) in tp.items():
            out.append(f"| {k} | {o:,.0f} | {s:,.0f} | {o / base[0]:.2f}x | {s / base[1]:.2f}x |")
        self.sections.append("\n".join(out))

    def layers(self, rows: list[dict], *, batch: int) -> None:
        out = ["## Per-layer profile (batch %d)\n" % batch,
               "Where the predict gap to ONNX Runtime comes from: each convolution of the cnn and dwcnn, at the "
               "shape it sees in the network, and the matrix products of the recurrent and transformer models, "
               "run alone: mljax's own MIL op (`conv`, `linear`; jitted, weights as arguments, as in a lowered "
               "program) against the same layer exported from PyTorch to ONNX Runtime.  Values checked against "
               "PyTorch first.  CPU ms per call.\n",
               "| layer | kind | shape | mljax ms | ONNX Runtime ms | mljax / ORT |", "|---|---|---|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['layer']} | {r['kind']} | {r['shape']} | {r['mljax_ms']:.3f} | {r['ort_ms']:.3f} | "
                       f"{r['mljax_ms'] / r['ort_ms']:.2f}x |")
        notes = []
        for model in ("cnn", "dwcnn"):
            mine = [r for r in rows if r["layer"].startswith(model + " #")]
            if mine:
                a, b = sum(r["mljax_ms"] for r in mine), sum(r["ort_ms"] for r in mine)
                out.append(f"| **{model}: all convolutions** | | | **{a:.2f}** | **{b:.2f}** | **{a / b:.2f}x** |")
                if (model, batch) in self.breakdowns:
                    parts, ort, _ = self.breakdowns[model, batch]
                    ex = parts["XLA executable (device input, no host work)"].median * 1e3
                    notes.append(f"{model}: the convolutions alone take {a:.1f} ms in mljax and {b:.1f} ms in ONNX "
                                 f"Runtime, of the whole network's {ex:.1f} ms (XLA executable) and {ort * 1e3:.1f} ms; "
                                 f"the remaining {max(ex - a, 0):.1f} ms vs {max(ort * 1e3 - b, 0):.1f} ms are the "
                                 "layers between them (batch norm folded by coremltools, ReLU, pooling), which ONNX "
                                 "Runtime fuses into its convolution kernels and XLA:CPU runs as separate fusions "
                                 "around Eigen's convolution calls.")
        if notes:
            out.append("\n" + "  ".join(notes))
        self.layer_rows = rows
        self.sections.append("\n".join(out))

    def personalize(self, res: dict, *, samples: int, epochs: int) -> None:
        first = float(np.median([r["first_s"] for r in res]))
        again = float(np.median([r["again_s"] for r in res]))
        steady = float(np.median([r["steady_s"] for r in res]))
        self.sections.append("\n".join([
            "## Personalizing the demo pipeline\n",
            f"`mljax demo`'s updatable pipeline (frozen ML-program feature extractor -> updatable neural-network "
            f"classifier), {samples} personal digits x {epochs} epochs, `updatable.UpdateTask` in one process.  "
            "*First task*: includes computing the frozen features and compiling the training step; *second task*: "
            "a new task on the same model (tasks share the compiled step); *epochs only*: the second task's "
            "epochs, from its `training_begin` event to its last `epoch_end`.\n",
            "| first task s | second task s | epochs only s |", "|---:|---:|---:|",
            f"| {first:.3f} | {again:.3f} | {steady:.3f} |"]))
        self.targets.append((f"personalize demo ({samples} x {epochs} epochs) after compilation < "
                             f"{TARGETS['personalize_s']} s", f"{again:.3f} s (first task, compiling: {first:.2f} s)",
                             again < TARGETS["personalize_s"]))

    def real(self, rows: list[dict]) -> None:
        """Real architectures: mljax (fp32 and fp16 programs) vs ONNX Runtime and torch, with geomeans."""
        out = ["## Real architectures\n",
               "`bench/real.py`: ResNet-18, MobileNetV3-Small and EfficientNet-B0 written in `torch.nn` after their "
               "papers, BERT and a Llama-style decoder from `transformers` configs; random weights (fixed seed), "
               "converted by coremltools to ML programs (iOS16) in fp32 and in fp16 (coremltools' default "
               "precision; run with mljax's default `compute_precision`), and to ONNX (opset 17) for ONNX Runtime "
               "(fp32).  Batches 8 and 32: `MLModel.predict` on a list of 8 or 32 dicts; ONNX Runtime and torch get "
               "one `(8, ...)` or `(32, ...)` array.  The targets judge batches 1 and 32 (the worst model: every "
               "batch); batch 8, a user's small list predict, is reported beside them.  CPU ms per call (medians of interleaved rounds); ratios are medians of "
               "per-round CPU-time ratios.  *Rel. error*: relative L2 error of mljax's output against torch "
               "eager (checked before timing: fp32 <= 1e-3, fp16 program <= 1e-2); a model that fails to convert or "
               "to match is reported as such and left out of the geomeans.\n"]
        out += [f"- {n}: {a}" for n, a in dict((r["name"], r["about"]) for r in rows).items()]
        out += ["", "| model | batch | mljax fp32 ms | mljax fp16 ms | ONNX Runtime ms | torch ms | fp32 / ORT "
               "| fp16 / ORT | fp16 / fp32 | fp32 / torch | rel. error fp32 / fp16 |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        ok = [r for r in rows if not r["error"]]
        for r in rows:
            out.append(self._real_row(r))
        out += ["", "| batch | geomean fp32 / ORT | geomean fp16 / ORT | worst / ORT | geomean fp16 / fp32 "
                "| worst fp16 / fp32 |", "|---:|---:|---:|---:|---:|---:|"]
        for batch in sorted({r["batch"] for r in ok}):
            b = [r for r in ok if r["batch"] == batch]
            g = {k: float(np.exp(np.mean(np.log([r[k] for r in b])))) for k in ("fp32_ort", "fp16_ort", "fp16_fp32")}
            worst = max(b, key=lambda r: max(r["fp32_ort"], r["fp16_ort"]))
            w16 = max(b, key=lambda r: r["fp16_fp32"])
            out.append(f"| {batch} | {_x(g['fp32_ort'])} | {_x(g['fp16_ort'])} | "
                       f"{_x(max(worst['fp32_ort'], worst['fp16_ort']))} ({worst['name']}) | {_x(g['fp16_fp32'])} | "
                       f"{_x(w16['fp16_fp32'])} ({w16['name']}) |")
            if batch not in (1, 32):
                continue
            lim = TARGETS["b32_vs_ort"] if batch == 32 else TARGETS["b1_vs_ort"]
            self.targets.append((f"real architectures batch {batch}: geomean mljax/ONNX Runtime <= {lim}",
                                 _x(g["fp32_ort"]), g["fp32_ort"] <= lim))
        self._real_targets(rows, ok)
        out += self._nn_twins(ok)
        self.sections.append("\n".join(out))

    def _nn_twins(self, ok: list[dict]) -> list[str]:
        """The CNNs converted by coremltools to NeuralNetwork models too, against their ML-program twins."""
        twins = [r for r in ok if "mljax nn" in r["t"]]
        if not twins:
            return []
        out = ["", "NeuralNetwork twins: the same CNNs converted by coremltools with `convert_to=\"neuralnetwork\"` "
               "(fp32 `.mlmodel`), whose layers mljax translates into the same `mljax.ops` calls as the ML program's "
               "ops; ratio to the fp32 ML program, measured in the same rounds.", "",
               "| model | batch | mljax NeuralNetwork ms | mljax ML program ms | NeuralNetwork / ML program | rel. error |",
               "|---|---:|---:|---:|---:|---:|"]
        worst = None
        for r in twins:
            nn, f32 = r["t"]["mljax nn"], r["t"]["mljax fp32"]
            x = ratio(nn, f32)
            worst = max(worst or x[0], x[0])
            out.append(f"| {r['name']} | {r['batch']} | {_ms(nn.median)} | {_ms(f32.median)} | {_x(*x)} | "
                       f"{r['errors']['nn']:.0e} |")
        self.targets.append((f"NeuralNetwork models <= {TARGETS['nn_x']}x their ML-program twins", _x(worst),
                             worst <= TARGETS["nn_x"]))
        return out

    @staticmethod
    def _real_row(r: dict) -> str:
        if r["error"] and "t" not in r:
            return f"| {r['name']} | {r['batch'] or ''} | **failed**: {r['error']} | | | | | | | | |"
        t = r["t"]
        f32, f16, ort, pt = t["mljax fp32"], t["mljax fp16"], t["onnxruntime"], t["torch"]
        r.update(fp32_ort=ratio(f32, ort)[0], fp16_ort=ratio(f16, ort)[0], fp16_fp32=ratio(f16, f32)[0])
        err = f"{r['errors']['fp32']:.0e} / {r['errors']['fp16']:.0e}" + (f" **{r['error']}**" if r["error"] else "")
        return (f"| {r['name']} | {r['batch']} | {_ms(f32.median)} | {_ms(f16.median)} | {_ms(ort.median)} | "
                f"{_ms(pt.median)} | {_x(*ratio(f32, ort))} | {_x(r['fp16_ort'])} | {_x(*ratio(f16, f32))} | "
                f"{_x(ratio(f32, pt)[0])} | {err} |")

    def _real_targets(self, rows: list[dict], ok: list[dict]) -> None:
        failed = sorted({r["name"] for r in rows if r["error"]})
        self.targets.append(("real architectures: every model converts and matches torch",
                             f"failed: {', '.join(failed)}" if failed else "all", not failed))
        if ok:
            w = max(ok, key=lambda r: max(r["fp32_ort"], r["fp16_ort"]))
            worst = max(w["fp32_ort"], w["fp16_ort"])
            self.targets.append((f"real architectures: no model worse than {TARGETS['real_worst']}x ONNX Runtime",
                                 f"{_x(worst)} ({w['name']} batch {w['batch']})", worst <= TARGETS["real_worst"]))
            w = max(ok, key=lambda r: r["fp16_fp32"])
            self.targets.append((f"real architectures: fp16 programs <= {TARGETS['fp16_x']}x their fp32 twins",
                                 f"{_x(w['fp16_fp32'])} ({w['name']} batch {w['batch']})",
                                 w["fp16_fp32"] <= TARGETS["fp16_x"]))

    def note(self, text: str) -> None:
        self.misses.append(text)

    def finish(self, seconds: float) -> None:
        self.seconds = seconds
        self.load_end = os.getloadavg()

    # --- misses, with the profiles that show where the time goes ------------------------------
    def _predict_misses(self) -> list[str]:
        missed = [(k, r) for k, r in self.results.items()
                  if r[0] > (TARGETS["b32_vs_ort"] if k[1] == 32 else TARGETS["b1_vs_ort"]) or r[1] > TARGETS["vs_torch"]]
        if not missed:
            return []
        out = ["### Predict\n",
               "Each missed predict target, with mljax's fp32 predict split into its parts (CPU ms, measured "
               "separately in interleaved rounds, so the parts need not add up exactly):\n",
               "| model | batch | predict | XLA executable | share | host inputs | host outputs | ONNX Runtime "
               "| torch | executable / ONNX Runtime |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        shares = []
        for (name, batch), _ in missed:
            parts, ort, pt = self.breakdowns[name, batch]
            tot, ex = parts["predict (total)"].median, parts["XLA executable (device input, no host work)"].median
            hin = parts["input checks + stacking (host)"].median
            hout = parts["outputs to NumPy + per-sample dicts (host)"].median
            shares.append(ex / tot)
            out.append(f"| {name} | {batch} | {_ms(tot)} | {_ms(ex)} | {ex / tot:.0%} | {_ms(hin)} | {_ms(hout)} | "
                       f"{_ms(ort)} | {_ms(pt)} | {ex / ort:.2f}x |")
        out.append(
            f"\nThe compiled XLA executable accounts for {min(shares):.0%}-{max(shares):.0%} of mljax's predict "
            "time in these rows (parts over 100% are within the noise); mljax's own host work (input checks, "
            "stacking the 32 dicts, outputs back to per-sample dicts) is the rest.  The lowering adds "
            "nothing measurable on top of XLA (see *Lowering overhead*: the cnn runs as fast as the same "
            "network written by hand in JAX, with the same convolution/fusion counts in the optimized HLO), "
            "so the gap to ONNX Runtime is in XLA:CPU's generated code against ONNX Runtime's MLAS kernels "
            "(the *Per-layer profile* shows it layer by layer: the same convolutions and matrix products, alone, "
            "in mljax's ops and in ONNX Runtime).  "
            "Already rewritten where XLA:CPU was the bottleneck: `linear` contracts the weight in place "
            "(no transposed copy per call), depthwise convolutions run as fused shifted products instead of "
            "grouped convolutions (15-25x faster per layer), 1x1 convolutions as GEMMs (1.5-2.7x).  "
            "Dense convolutions now take the path `mljax.ops.conv.conv_path` picks by shape (measured by "
            "`bench/conv_paths.py`): Winograd F(4x4,3x3) batched products for 3x3 stride-1 layers with >= 16 "
            "channels, F(2x2,3x3) where F(4x4) would have fewer than 64 tiles (the weight becomes 36 or 16 "
            "matrices, which the products then stream: ResNet-18's last stage at batch 32 0.81x the F(4x4) "
            "time); the weight transform is computed once per weight values with the weight prologue, for "
            "the variant one sample's shapes pick (ResNet-18 batch 1 1.13x ONNX Runtime against 1.45x "
            "transforming on every call, the zoo's cnn 1.43x against 1.70x), and for a list predict also the variant "
            "its folded batch picks where that differs (F(4x4) where one sample takes F(2x2), F(2x2) where it takes im2col; "
            "computed once per weight values and batch size: ResNet-18 batch 32 0.87x the time, three processes, "
            "where its 256- and 512-channel layers had been transformed on every call); a region's dense layer that runs by "
            "XLA's convolution (ResNet's stride-2 3x3 layers) gets its weight laid out HWIO the same way instead of "
            "transposing it on every call (ResNet-18 batch 32 0.96x, batch 1 0.97x, three processes each), im2col + one GEMM for first layers and small maps, except a channel-last region's first layer (an RGB stem into depthwise layers), which is a direct sum over its 27 taps of a strided input window times that tap's output-channel weights (laid out HWIO at load), channel-first in and channel-last out, in a loop over two blocks of output rows so that XLA computes it once (as one elementwise expression XLA fused it into each consumer, up to three times after a SiLU): alone 0.41-0.72x the im2col time, whole models at batch 32 MobileNetV3-Small 1.20-1.26x ONNX Runtime against 1.38-1.42x, EfficientNet-B0 1.10-1.18x against 1.21-1.22x, batch 1 MobileNetV3-Small 1.50-1.78x against 1.94-2.1x; depthwise taps sum in one chain per kernel row, added pairwise (a 5x5 layer of 240 channels at 16x16 alone 0.70x), and channel-last depthwise layers sum over blocks of 16 channels, the input viewed as [N, C/16, H, W, 16] and the output moved back to [N, H, W, C] (XLA folds both moves into its loops' indexing; the fused loops still iterate in [N, H, W, C] order, so the gain is in the emitted indexing and measured, not derived: EfficientNet-B0 batch 32 0.92x the unblocked time over six processes, batch 1 1.00x; MobileNetV3-Small 0.99x / 1.03x); a list predict's inputs enter the chunk loop without their size-1 axes (with them XLA copied the whole batch into the loop in another order of that axis: MobileNetV3-Small batch 32 about 2.5%, EfficientNet-B0 3.5%); a single predict passes the weights of at most 4 KB packed into one buffer per dtype, sliced back out inside the trace (`mljax.packing`: a call costs about a microsecond per argument; MobileNetV3-Small batch 1 0.86x with 161 arguments down to 93); XLA's own convolution for the rest, issued channel-last (inside a loop body, a `lax.map`, `lax.scan` or MIL `while_loop`, XLA:CPU ran a channel-first convolution as a generic loop 13-140x slower, jax-ml/jax#12868; outside loops both forms time the same); im2col and Winograd run a batch in chunks of about 2 MiB of temporaries (one image each in early layers), so that patches, tiles and products stay in cache (ResNet-18 batch 32 0.95x ONNX Runtime against 1.07x with 32 MiB chunks, the zoo's cnn 1.14-1.18x against 1.38-1.44x); a chunk of several images multiplies a weight larger than an image's output (late layers' small maps) once, transposing the [K, N, P] product, instead of copying the weight per image (ResNet-18 as a list predict of 8: 1.11x ONNX Runtime against 1.52x, of 4: 1.26x against 1.62x; batch 32 unchanged within noise); "
            "max/avg pools of small windows reduce strided slices (4x faster than reduce_window); linears "
            "reading one input merge into one product (`mljax.optimize`); a `matmul` with transpose flags and equal batch axes "
            "(attention's Q K^T) contracts the transposed axes in one product, where XLA:CPU had materialized K^T after the rotary embedding and "
            "the grouped-query repeat (Llama-style decoder at batch 32: transposing fusions 5.4 -> 1.0 ms per call, profiled); "
            "attention, as coremltools writes it before iOS18 (`matmul`, scale, mask `add`, `softmax`, `matmul`), runs as "
            "one op (`mljax.optimize.passes.fuse_attention`): its leading axes flattened into one, so that a list "
            "predict's sample axis beside the program's batch of 1 no longer made XLA copy the scores between the two "
            "products and run them as two library fusions, the scale applied to the query, and in fp32 the softmax "
            "normalized after the second product (BERT batch 32 0.965x the time, Llama-style 0.99x, three processes "
            "each); a `linear` at a function output with at least twice as many features as inputs (Llama's "
            "vocabulary projection) takes its bias into the product as one more input feature "
            "(`bias_into_product`), where XLA added it in a pass over the whole output (2-2.8 ms of 32 MB logits a "
            "call at batch 32).  "
            "What remains: depthwise layers of small maps and many channels (EfficientNet-B0's and MobileNetV3-Small's "
            "5x5 layers at 8x8 and 4x4, 240-1152 channels) run 2-4.5x slower than ONNX Runtime's (XLA's fused loop, "
            "channel vectors innermost, loads each tap's weights and inputs from L2 for every output vector; ONNX "
            "Runtime's NCHWc kernel holds the weights in registers and skips the padding: per layer at batch 32, "
            "8x8x672 2.8 ms against 0.62, 4x4x1152 1.4 ms against 0.31; in EfficientNet-B0 about 11 ms of the gap); "
            "YNNPACK's products run at MLAS's speed alone (Llama's vocabulary projection, 2048x256 by 256x4096: "
            "19.4 ms against 20.7) but 5-15% slower on the mid-sized ones in the models; Winograd's transforms as "
            "separate XLA fusions (ONNX Runtime fuses them into its kernels); and recurrent loops.  "
            "The `lstm`/`gru`/`rnn` ops compute every step's input projection in one GEMM; "
            "lstm and gru pass each step's slice to the loop through its carry (XLA:CPU emits a fusion that reads a "
            "slice at the loop index as a scalar loop: the gate activations were several times slower); "
            "XLA:CPU's library packs a product's right operand on every call, and as h @ w_hh^T (the weight [out, "
            "in]) it transposed the whole weight in that packing on every step: recurrences of several rows first "
            "ran feature-major (the state [H, b], w_hh @ h, the weight the left operand), and since a later session "
            "gru and rnn of several rows multiply h by w_hh^T laid out [in, out] once per call (gru 0.65-0.89x the "
            "feature-major time at 2-64 rows, 0.52x at 12; rnn 0.61-0.83x), lstm below 16 rows [x_t, h] by "
            "[w_ih | w_hh]^T (0.79x at 2 rows, 0.95x at 8, 0.42x at 12, where the feature-major product ran 2x "
            "slower; from 16 rows feature-major stays faster, 1.14x at 32; the graph pass `lstm_weights_in_out` "
            "lays [w_ih | w_hh]^T out once per weight values for the internal op `mljax.lstm`: the zoo lstm as "
            "list predicts of 2, 4 and 8 samples 2.16x -> 1.58x, 1.97x -> 1.47x, 1.46x -> 1.23x ONNX Runtime), "
            "and a list "
            "predict's samples fold into the recurrence's batch instead of XLA batching one recurrence per sample "
            "(zoo lstm batch 32: 0.86x the time over three processes; a single sequence stays batch-major, where "
            "feature-major was 1.00-1.06x); an `lstm` of several rows multiplies [w_ih | w_hh] by [x_t; h] "
            "once per step instead of projecting the sequence first (zoo lstm batch 32 1.57x -> 1.22x ONNX "
            "Runtime, batch 8 1.96x -> 1.56x; Intel Xeon), and `out[:, -1]` of a forward lstm reads its final "
            "state (`lstm_last_step`: batch 1 0.97x the time, batch 32 0.98x).  The zoo's gru is no `gru` op: coremltools converts torch's "
            "GRU into a `while_loop` of gathers, six `linear`s and a scatter per step (computing the gathered "
            "`linear` over the whole sequence before the loop made it 1.3-2x slower: XLA:CPU fused the loop's "
            "slice of the result into the gate activations as scalar loops); its per-step `scatter` of one row "
            "runs as a `dynamic_update_slice` (batch 1 1.48x -> 1.28x), and the graph pass `loop_weights_in_out` "
            "gives a `linear` inside a loop body its weight laid out [D_in, D_out] by a transpose in the weight "
            "prologue, for the same reason as the recurrences' layout (batch 32 1.19x -> 1.00x ONNX Runtime, batch "
            "8 2.00x -> 1.15x, batch 1 1.13x -> 1.04x).  A list predict checks its first sample in full and the "
            "others by names, dtypes and shapes, and converts each output once for the batch (zoo lstm at 32 "
            "samples 1.565 -> 1.530 ms a call; its executable takes 1.31).  Single predicts leave unaligned "
            "inputs of at most 64 KiB to XLA's own copy (`mljax.cpu.ALIGN_ABOVE`; mljax's aligned copy cost "
            "8 us more a call on an Intel Xeon: zoo lstm 148 -> 136 us, transformer 315 -> 295 us).  "
            "XLA:CPU's flag sets (fast math, 512-bit vectors, XNNPACK/oneDNN/YNNPACK library fusions, LLVM's "
            "unrolling) are measured model by model in `docs/xla_flags.md` (`bench/xla_flags.py`); `import "
            "mljax` sets one (`mljax.cpu.LLVM_UNROLL`): LLVM fully unrolled loops over minor "
            "dimensions of 9-24 elements (16- and 24-channel maps, Winograd's tiles) and vectorized the loop "
            "around them with gathers, elementwise fusions 4-6x slower per element than at 32 channels; "
            "limited to 8 iterations, those loops run at the 32-channel speed and whole models 0.98x "
            "in the geomean, single models within the study's noise.  On a CPU with AVX-512, list predicts "
            "compile with 512-bit vectors (`mljax.cpu.batched_compiler_options`, a per-executable option; "
            "XLA's default is 256): at 32 samples on an Intel Xeon EfficientNet-B0 0.90x its time, "
            "MobileNetV3-Small 0.94-0.96x, the rest 0.97-1.01x; since a later session one sample's "
            "executable too (batch 1: EfficientNet-B0 0.88-0.93x, the zoo's lstm 0.86-0.95x and gru "
            "0.90-0.92x, MobileNetV3-Small 0.97-0.99x, the zoo's transformer 1.01-1.03x).  mljax runs here on one "
            "thread (`mljax.set_cpu_threads(1)`), as its peers do, each call inline on the calling thread "
            "(JAX's asynchronous dispatch to a one-thread pool cost two thread wake-ups, 50-80 us, per call): "
            "XLA's default pool (one thread per core) "
            "ran independent ops and YNNPACK's products on a second thread, for more CPU time with the same "
            "work: one thread takes 0.60-1.06x the default's CPU time, 0.82x in the geomean "
            "(`docs/cpu_settings.md`, `bench/cpu_settings.py`).  Large batches also "
            "page-fault their temporaries in again on every call (glibc returns blocks above 32 MiB to the "
            "kernel); `mljax.retain_freed_memory()` keeps them, opt-in for users, measured in the same document, "
            "and on in this benchmark's process for all three runtimes (`--no-retain` turns it off).  "
            "Padding the minor axis is slow in XLA:CPU's loops: a fusion whose root pads it is not vectorized, "
            "activation included (a SiLU fused into the pad of a depthwise layer ran 5-7x slower than alone); "
            "convolutions therefore pad the minor axis by concatenating zero columns (EfficientNet-B0 batch 1: "
            "0.75x the XLA time), except when vmapped over a list predict's samples, where the concatenation "
            "is faster only after costly activations and slower after cheap ones (MobileNetV3-Small's "
            "hardswish, the dwcnn's ReLU6: 1.05-1.23x); the graph pass `mark_convs_after_costly_ops` tells "
            "a convolution fed by SiLU, sigmoid, GELU... to concatenate there too (EfficientNet-B0 batch 32: "
            "0.90-0.93x).  1x1 convolutions of several images loop over one GEMM per "
            "image instead of one GEMM whose columns span the batch, which XLA fed through transposes around "
            "every layer (dwcnn batch 32: 0.77x).  Depthwise networks run channel-last: the graph pass "
            "`channels_last_regions` holds each connected region of layout-free ops around depthwise "
            "convolutions as [N, H, W, C] (ONNX Runtime's NCHWc transformer does the same), with the depthwise "
            "and 1x1 weights re-laid out HWIO once per weight values by the lowering's weight prologue: with "
            "MIL's weight layout each tap gathered its channel weights at a stride and XLA's loop ran 2-5x "
            "slower than channel-first; with it, depthwise layers ran 1-5x faster per layer, and "
            "MobileNetV3-Small / EfficientNet-B0 at batch 32 take 0.75-0.9x their channel-first time (batch 1: "
            "0.8-1.05x); 1x1 weights as [C_in, C_out], the orientation XLA:CPU's products run fastest at few "
            "rows, took those models' batch-32 time a further 0.9-0.95x.  Dense CNNs run channel-last too: "
            "a dense convolution with a spatial kernel seeds a region as a depthwise one does, max and average "
            "pools are region ops, Winograd runs channel-last (its transforms over whole channel vectors, the "
            "transformed weights the product's left operand; alone 0.85-0.87x the channel-first time at 64-128 "
            "channels, 0.93-0.96x at 256-512; with the activations as the left operand the late layers ran 1.6-2.6x "
            "slower; since a later session layers of at most 64 x 128 filter weights take the tiles as the left "
            "operand, so that the product comes out channel-last and the output transform is two separable passes "
            "of constant combinations instead of a product and a transpose of the channels to the minor axis: per "
            "layer at batch 32 0.65x the time at 32 -> 64 channels, 0.81x at 64 -> 64, 0.90x at 64 -> 128; the zoo's "
            "cnn batch 32 1.13x -> 0.93x ONNX Runtime, batch 1 1.33x -> 1.19x, ResNet-18 batch 32 0.83x -> "
            "0.79x) and XLA's convolution is issued NHWC without the transposes around each layer, so a "
            "ResNet's stem, pools, 3x3 layers and residual adds form one region: the transposes that were "
            "11% of ResNet-18's batch-32 time (the stem's output, before its pool, alone 5%) went; ResNet-18 "
            "batch 32 0.86x the time, batch 1 0.91x, the zoo's cnn batch 32 0.93x (four processes).  A first "
            "layer whose only reader is a pool of non-overlapping windows (the zoo's cnn: ReLU, 2x2/2 max pool) "
            "runs as one expression, which XLA fuses into the pool, instead of in its row loop (0.90x).  "
            "Not pursued further, measured: "
            "HWIO weights laid out at load for the dense layers that run by XLA's convolution or im2col (im2col "
            "then channel-last, patches [P, taps*C] times [taps*C, K]; ResNet-18 batch 32 1.07x, batch 1 "
            "1.16x: the weight became the product's right operand, packed on every call); the first layer as "
            "im2col with channel-last patch rows (zoo cnn batch 32 1.49x, MobileNetV3-Small 1.23x); "
            "channel-last Winograd with the activations the left operand for layers of small weights, the "
            "output transform still a product (within noise; with separable output passes it is the path above); separable pools, one spatial axis at a time (ResNet-18 0.99x, zoo cnn 1.00x); "
            "XLA's Eigen products instead of YNNPACK's (per executable, through compile options; faster "
            "alone at few rows with [K, N] weights, 1.1-1.2x slower inside the depthwise networks); "
            "transformer `linear` weights laid out [D_in, D_out] in the prologue (no change at batch 1 "
            "within noise, for a second copy of the weights; measured again on an Intel Xeon: zoo transformer "
            "batch 1 0.96x, BERT and Llama 0.99x, Llama batch 32 1.02x); reading the windows through "
            "flattened shifted slices left whole models unchanged (0.97-1.04x); per-op transposes to NHWC "
            "around depthwise layers (1.07-1.26x slower whole); batched 1x1 products with the weights "
            "broadcast per image (0.9-1.3x); running a whole list predict as a loop over micro-batches of k "
            "samples, which helped some models and hurt others (batch 32 against ONNX Runtime, one call / "
            "micro-batches: BERT 1.05x / 0.88x at k = 8-16, EfficientNet-B0 1.30x / 1.17x at k = 8, "
            "MobileNetV3-Small 1.21x / 1.38x, Llama 1.08x / 1.12x, ResNet-18 1.02x / 1.08x): what stays is "
            "the chunk plan (`mljax.schedule`), which loops over chunks only through the activation-heavy "
            "prefix (EfficientNet-B0 batch 32 1.22x against 1.39x, BERT "
            "0.88x against 0.95x, MobileNetV3-Small 1.38x against 1.44x, Llama and ResNet-18 unchanged; "
            "in BERT YNNPACK's products ran faster on 1024 rows than on 4096, and XLA gave its layer norms "
            "to a slow YNNPACK reduce fusion only at "
            "batch 32), and since a later session a further span in larger chunks through the middle of a "
            "network whose activations for the batch still overflow a core's L2 (MobileNetV3-Small batch 32 "
            "0.94-0.95x the time without it, the zoo's depthwise CNN 0.90-0.92x, EfficientNet-B0 "
            "0.997-1.01x; Intel Xeon, three processes), which since a later session, where its chunks would be "
            "no larger than the first span's, merges into the first span instead of being dropped (in-process "
            "ratios to ONNX Runtime, merged / dropped: the zoo's depthwise CNN at 16 samples 1.07x / 1.22x, at 24 "
            "1.15x / 1.25x, its cnn at 16 0.89x / 0.96x, at 24 0.87x / 1.00x, EfficientNet-B0 at 8 1.05x / "
            "1.09x, BERT at 32 0.96x / 1.005x).  A span holding a pool reads each chunk from its "
            "loop's carry, sliced out by the iteration before: with the chunk sliced in place XLA fused the slice "
            "into the first layer's expression and, under the pool's strided windows, emitted scalar code (the zoo "
            "cnn's stem, ReLU and pool at batch 32: 19.2 ms against 3.8; without retained memory the whole cnn at "
            "batch 32 2.3x ONNX Runtime, now 1.12x), and with that networks of dense convolutions get plans too "
            "(they had none where memory is retained: zoo cnn batch 32 1.13x against 1.21x, ResNet-18 0.81x "
            "against 0.85x); `linear` looping over blocks of 1024 rows (faster alone, [4096, 1024] @ [1024, 256] "
            "181 against 150 GFLOP/s, but 1.08-1.18x slower inside BERT and Llama); YNNPACK fusions of "
            "single products only (`--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`: "
            "BERT batch 32 0.92x, EfficientNet-B0 1.26x).")
        return out

    def _load_misses(self) -> list[str]:
        if not self.phases:
            return []
        missed = [t for t in self.targets if "load + first" in t[0] and not t[2]]
        name, (cold, warm) = next(iter(self.phases.items()))
        out = ["### Load + first prediction\n",
               (f"Missed: {'; '.join(t[0] + ' (' + t[1] + ')' for t in missed)}.  " if missed else "All met.  ")
               + f"Where a fresh process spends it ({name}, the steps of `MLModel(path)` + `predict` run one at "
               "a time; wall s / CPU s; a step a process did not take is blank):\n",
               "| step | cold wall | cold CPU | warm wall | warm CPU |", "|---|---:|---:|---:|---:|"]
        last = [k for k in cold if k == "first execution"]
        steps = [k for k in cold if k not in last] + [k for k in warm if k not in cold] + last
        cell = lambda ph, k, i: f"{ph[k][i]:.3f}" if k in ph else ""   # noqa: E731
        for step in steps:
            out.append(f"| {step} | {cell(cold, step, 0)} | {cell(cold, step, 1)} | {cell(warm, step, 0)} | "
                       f"{cell(warm, step, 1)} |")
        tot = lambda ph: sum(v[1] for k, v in ph.items() if not k.startswith("import"))  # noqa: E731
        out.append(
            f"\nExcluding the import, the CPU time is {tot(cold):.2f} s cold and {tot(warm):.2f} s warm.  Cold, "
            "XLA's compilation dominates.  Warm, mljax's executable cache replaces tracing, lowering to StableHLO "
            "(whose first use in a process also pays MLIR's one-time set-up) and the compile-cache read by one "
            "deserialization; what is left is building the MIL program from the spec (which imports the op "
            "modules) and the first execution.  Wall time above CPU time is other processes holding the cores "
            "(see the load average).")
        return out

    def _rss_misses(self) -> list[str]:
        missed = [t for t in self.targets if "peak RSS" in t[0] and not t[2]]
        if not missed:
            return []
        return ["### Peak memory\n", f"Missed: {missed[0][0]} ({missed[0][1]}).  " + self.rss_note]

    # --- rendering ------------------------------------------------------------------------------
    def markdown(self) -> str:
        a = self.args
        mode = "--quick" if a.quick else "full"
        head = [
            "<!-- Generated by bench/run.py; do not edit.  Regenerate: `python bench/run.py` "
            "(or `python bench/run.py --quick`). -->",
            "# Performance: mljax vs ONNX Runtime vs PyTorch eager (CPU)\n",
            f"- Machine: {_cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}",
            f"- Load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in self.load_start)}, at end "
            f"{'/'.join(f'{x:.1f}' for x in self.load_end)} (the machine is shared: above {os.cpu_count()} "
            "means other processes competed for the cores; compare ratios, not absolute times)",
            f"- Run: {mode} mode, {time.strftime('%Y-%m-%d %H:%M')}, {self.seconds:.0f} s; {a.rounds} interleaved rounds "
            f"per measurement; {a.threads} thread(s) per runtime"
            + (" (mljax: `mljax.set_cpu_threads(1)`, i.e. `PJRT_NPROC=1`, "
               "`--xla_cpu_multi_thread_eigen=false` and calls inline, `jax_cpu_enable_async_dispatch` off; ONNX Runtime "
               "`intra_op_num_threads=1`, `torch.set_num_threads(1)`)" if a.threads == 1 else "")
            + ("; freed memory kept by the process (`mljax.retain_freed_memory()`: glibc's allocator, so for all "
               "three runtimes; ONNX Runtime keeps its own arena anyway)" if getattr(a, "retain", False) else
               "; glibc's default allocator settings"),
            f"- Versions: {_versions()}",
            "",
        ]
        tgt = ["## Targets\n", "| target | measured | met |", "|---|---|---|"]
        tgt += [f"| {name} | {val} | {_ok(ok)} |" for name, val, ok in self.targets]
        parts = ["\n".join(head)] + ["\n".join(tgt)] + self.sections
        misses = self._predict_misses() + self._load_misses() + self._rss_misses() + self.misses
        if misses:
            parts.append("## Misses and where the time goes\n\n" + "\n".join(
                ("\n" + m) if m.startswith("###") else m for m in misses))
        return "\n\n".join(parts) + "\n"
