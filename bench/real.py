"""Real architectures for the benchmark: ResNet-18, MobileNetV3-Small, EfficientNet-B0, BERT, Llama.

The three CNNs are written here in plain ``torch.nn`` after their papers (He et al. 2015; Howard
et al. 2019, table 2; Tan & Le 2019, table 1); the transformers come from ``transformers``
configs (no download: random weights from a fixed seed).  Each is converted by coremltools to an
fp32 and an fp16 ML program (iOS16; fp16 is coremltools' default precision) and exported to ONNX
(opset 17), cached in ``$MLJAX_BENCH_DIR/real-v<N>/<name>-<input shape>``.  The CNNs' input is
``$MLJAX_BENCH_CNN_RES`` pixels square (default 128; the papers' 224 costs ~3x the time per call).
mljax's outputs are checked against torch eager before timing; a model that fails to build or to
match becomes a row, not a crash.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["REAL", "RealModel", "torch_model", "example_input", "build", "check", "runners", "measure"]

REAL_VERSION = 1     # bump when a network or its conversion changes, so cached files are rebuilt
CNN_RES = int(os.environ.get("MLJAX_BENCH_CNN_RES", 128))   # CNN input resolution
TOL = {"fp32": 1e-3, "fp16": 1e-2, "nn": 1e-3}   # relative L2 error of mljax's output against torch eager


def _nn():
    import torch
    return torch.nn


def _bn_act(nn, cin, cout, k, stride=1, groups=1, act=None):
    """conv (no bias, 'same'-style padding) + batch norm (+ activation)."""
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


# --- ResNet-18 ------------------------------------------------------------------------------------
def _resnet18(classes=1000):
    nn = _nn()

    class Basic(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(_bn_act(nn, cin, cout, 3, stride, act=nn.ReLU), _bn_act(nn, cout, cout, 3))
            self.skip = _bn_act(nn, cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + self.skip(x))

    blocks, cin = [], 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        blocks += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
        cin = cout
    return nn.Sequential(_bn_act(nn, 3, 64, 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1), *blocks,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


# --- inverted residuals with squeeze-and-excitation (MobileNetV3, EfficientNet) -------------------
def _divisible(v, d=8):
    """Round ``v`` to a multiple of ``d`` (not below 90% of ``v``), as both papers' reference code does."""
    out = max(d, int(v + d / 2) // d * d)
    return out + d if out < 0.9 * v else out


def _squeeze_excite(nn, ch, squeeze, act, gate):
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Sequential(nn.Conv2d(ch, squeeze, 1), act(), nn.Conv2d(squeeze, ch, 1), gate())

        def forward(self, x):
            return x * self.fc(self.pool(x))
    return SE()


def _inverted(nn, cin, exp, cout, k, stride, act, se=None):
    """expand 1x1 (if exp != cin) -> depthwise kxk -> [SE: (squeeze, act, gate)] -> project 1x1;
    residual when stride 1 and cin == cout."""
    layers = [] if exp == cin else [_bn_act(nn, cin, exp, 1, act=act)]
    layers.append(_bn_act(nn, exp, exp, k, stride, groups=exp, act=act))
    if se:
        layers.append(_squeeze_excite(nn, exp, *se))
    layers.append(_bn_act(nn, exp, cout, 1))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.residual = nn.Sequential(*layers), stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.residual else self.body(x)
    return Block()


def _mobilenet_v3_small(classes=1000):
    nn = _nn()
    # kernel, expansion, out, SE, activation (RE: ReLU, HS: hardswish), stride (paper, table 2)
    rows = [(3, 16, 16, 1, "RE", 2), (3, 72, 24, 0, "RE", 2), (3, 88, 24, 0, "RE", 1),
            (5, 96, 40, 1, "HS", 2), (5, 240, 40, 1, "HS", 1), (5, 240, 40, 1, "HS", 1),
            (5, 120, 48, 1, "HS", 1), (5, 144, 48, 1, "HS", 1), (5, 288, 96, 1, "HS", 2),
            (5, 576, 96, 1, "HS", 1), (5, 576, 96, 1, "HS", 1)]
    layers, cin = [_bn_act(nn, 3, 16, 3, 2, act=nn.Hardswish)], 16
    for k, exp, cout, se, a, s in rows:
        act = nn.ReLU if a == "RE" else nn.Hardswish
        squeeze = (_divisible(exp // 4), nn.ReLU, nn.Hardsigmoid) if se else None
        layers.append(_inverted(nn, cin, exp, cout, k, s, act, squeeze))
        cin = cout
    return nn.Sequential(*layers, _bn_act(nn, 96, 576, 1, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2),
                         nn.Linear(1024, classes))


def _efficientnet_b0(classes=1000):
    nn = _nn()
    # expansion, kernel, stride, out channels, repeats (paper, table 1)
    stages = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
    layers, cin = [_bn_act(nn, 3, 32, 3, 2, act=nn.SiLU)], 32
    for e, k, s, cout, n in stages:
        for i in range(n):
            # SE squeezes to a quarter of the block's *input* channels
            layers.append(_inverted(nn, cin, cin * e, cout, k, s if i == 0 else 1, nn.SiLU,
                                    (max(1, cin // 4), nn.SiLU, nn.Sigmoid)))
            cin = cout
    return nn.Sequential(*layers, _bn_act(nn, 320, 1280, 1, act=nn.SiLU), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, classes))


# --- transformers (random weights from a config) -------------------------------------------------
def _tensor_out(model, key, causal=False):
    """Wrap a ``transformers`` model so the traced module maps token ids to one tensor.

    ``causal``: pass the causal mask ready-made (4D, additive), as transformers allows:
    its own mask is built with ``torch.vmap``, which ``torch.jit.trace`` cannot record.
    """
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            mask = None
            if causal:
                t = input_ids.shape[1]
                mask = torch.full((t, t), -1e4).triu(1)[None, None].expand(input_ids.shape[0], 1, t, t)
            return getattr(self.model(input_ids=input_ids, attention_mask=mask, use_cache=False), key)
    return Wrapped()


def _bert():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=256, attn_implementation="eager")
    return _tensor_out(BertModel(cfg, add_pooling_layer=False), "last_hidden_state")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      use_cache=False, attn_implementation="eager")
    return _tensor_out(LlamaForCausalLM(cfg), "logits", causal=True)


@dataclass(frozen=True)
class RealModel:
    name: str
    make: Callable
    shape: tuple          # batch-1 input shape
    tokens: int           # vocabulary size for token inputs; 0 for images
    batches: tuple
    about: str


_IMG = (1, 3, CNN_RES, CNN_RES)
REAL = {m.name: m for m in [
    RealModel("resnet18", _resnet18, _IMG, 0, (1, 8, 32), f"ResNet-18 (He et al.), {CNN_RES}x{CNN_RES}x3"),
    RealModel("mobilenet_v3_small", _mobilenet_v3_small, _IMG, 0, (1, 8, 32),
              f"MobileNetV3-Small (Howard et al.; SE, hardswish), {CNN_RES}x{CNN_RES}x3"),
    RealModel("efficientnet_b0", _efficientnet_b0, _IMG, 0, (1, 8, 32),
              f"EfficientNet-B0 (Tan & Le; MBConv, SE, SiLU), {CNN_RES}x{CNN_RES}x3"),
    RealModel("bert", _bert, (1, 128), 8192, (1, 8, 32),
              "transformers BertModel: 4 layers, hidden 256, 4 heads, FFN 1024; 128 tokens"),
    RealModel("llama", _llama, (1, 64), 4096, (1, 8, 32),
              "transformers LlamaForCausalLM: 4 layers, hidden 256, 8 heads (4 KV), SwiGLU 688, "
              "vocab 4096; 64 tokens, no KV cache"),
]}


def torch_model(name: str):
    """``name`` in eval mode with seeded weights; batch-norm statistics set from one random batch."""
    import torch
    torch.manual_seed(0)
    m = REAL[name].make()
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    if bns:   # so activations keep a sane scale through deep random nets (fp16 too)
        for b in bns:
            b.momentum = None
        m.train()
        with torch.no_grad():
            m(torch.from_numpy(example_input(name, 8, seed=7)))
    return m.eval()


def example_input(name: str, batch: int = 1, seed: int = 1) -> np.ndarray:
    """Images as fp32 N(0, 1); token ids as int32 (Core ML's integer input type)."""
    spec, rng = REAL[name], np.random.default_rng(seed)
    shape = (batch,) + spec.shape[1:]
    if spec.tokens:
        return rng.integers(0, spec.tokens, shape).astype(np.int32)
    return rng.standard_normal(shape).astype(np.float32)


# --- conversion ---------------------------------------------------------------------------------
def _convert(name, m, x, paths) -> None:
    import coremltools as ct
    import torch
    xt = torch.from_numpy(x).long() if REAL[name].tokens else torch.from_numpy(x)
    with torch.no_grad():
        traced = torch.jit.trace(m, xt, check_trace=False)
    kind = dict(dtype=np.int32) if REAL[name].tokens else {}
    for precision in ("fp32", "fp16"):
        cp = ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape, **kind)],
                        outputs=[ct.TensorType(name="y")], convert_to="mlprogram",
                        minimum_deployment_target=ct.target.iOS16, compute_precision=cp)
        ml.save(str(paths[precision]))
    torch.onnx.export(m, (xt,), str(paths["onnx"]), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    if "nn" in paths:
        _convert_nn(traced, x, paths["nn"])


def _convert_nn(traced, x, path) -> None:
    """The same network as a NeuralNetwork ``.mlmodel`` (fp32): the ML program's twin on the other path.
    A network coremltools cannot convert that way just has no twin (the file is not written)."""
    import coremltools as ct
    try:
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], outputs=[ct.TensorType(name="y")],
                        convert_to="neuralnetwork")
    except Exception as e:  # noqa: BLE001 - coremltools' NeuralNetwork backend lacks some ops
        print(f"    (no NeuralNetwork twin: {type(e).__name__}: {str(e)[:200]})")
        return
    ml.save(str(path))


def build(name: str, work: Path, *, rebuild: bool = False, log=print) -> dict[str, Path]:
    """Convert ``name`` (cached): {'fp32': .mlpackage, 'fp16': .mlpackage, 'onnx': .onnx}."""
    folder = Path(work) / f"real-v{REAL_VERSION}" / f"{name}-{'x'.join(map(str, REAL[name].shape[1:]))}"
    paths = {"fp32": folder / "fp32.mlpackage", "fp16": folder / "fp16.mlpackage", "onnx": folder / "model.onnx"}
    if not REAL[name].tokens:   # CNNs also as NeuralNetwork models (coremltools converts torch CNNs to both)
        paths["nn"] = folder / "nn.mlmodel"
    done = folder / "done.json"
    if done.exists() and not rebuild and all(p.exists() for k, p in paths.items() if k != "nn"):
        if "nn" in paths and not paths["nn"].exists():   # a cache from before the NeuralNetwork twins
            import torch
            log(f"  converting {name} to a NeuralNetwork ...")
            m, x = torch_model(name), example_input(name)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                _convert_nn(torch.jit.trace(m, torch.from_numpy(x), check_trace=False), x, paths["nn"])
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    log(f"  converting {name} (coremltools fp32/fp16, ONNX opset 17) ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _convert(name, torch_model(name), example_input(name), paths)
    done.write_text(json.dumps({"version": REAL_VERSION}))
    return paths


# --- checking and timing -------------------------------------------------------------------------
def _torch_call(m, x):
    import torch
    xt = torch.from_numpy(x).long() if x.dtype.kind == "i" else torch.from_numpy(x)

    def call():
        with torch.inference_mode():
            return m(xt)
    return call


def _rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64).reshape(ref.shape), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def _feed(x: np.ndarray):
    """One dict at batch 1; a list of per-sample dicts (vmapped into one call) above."""
    return {"x": x} if len(x) == 1 else [{"x": x[i:i + 1]} for i in range(len(x))]


def check(name: str, models: dict, m, batch: int) -> dict[str, float]:
    """Relative L2 error of each mljax program's output at ``batch`` against torch eager."""
    x = example_input(name, batch, seed=3)
    ref = _torch_call(m, x)().numpy()
    errs = {}
    for precision, mm in models.items():
        out = mm.predict(_feed(x))
        errs[precision] = _rel_err(out["y"] if batch == 1 else np.stack([o["y"] for o in out]), ref)
    return errs


def runners(name: str, paths: dict, models: dict, m, batch: int, threads: int) -> dict[str, Callable]:
    """{runtime: zero-argument callable predicting one batch of ``batch``}, the runtimes of the table."""
    import onnxruntime as ort
    x = example_input(name, batch)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(paths["onnx"]), so, providers=["CPUExecutionProvider"])
    xo = x.astype(np.int64) if REAL[name].tokens else x
    feed = _feed(x)
    out = {f"mljax {p}": (lambda mm=mm: mm.predict(feed)) for p, mm in models.items()}
    out["onnxruntime"] = lambda: sess.run(None, {"x": xo})
    out["torch"] = _torch_call(m, x)
    return out


def _failed(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def _measure_batch(name, paths, models, m, batch, args, interleaved) -> dict:
    row = dict(name=name, batch=batch, about=REAL[name].about, error=None)
    try:
        row["errors"] = errs = check(name, models, m, batch)
        bad = [p for p, e in errs.items() if not e <= TOL[p]]
        if bad:
            row["error"] = "; ".join(f"{p} output differs from torch (rel. error {errs[p]:.1e} > {TOL[p]})"
                                     for p in bad)
        row["t"] = interleaved(runners(name, paths, models, m, batch, args.threads), rounds=args.rounds,
                               budget=args.budget)
    except Exception as e:  # noqa: BLE001 - a failing model is a row of the report
        row["error"] = _failed(e)
    return row


def measure(names, work: Path, args, *, interleaved, log=print) -> list[dict]:
    """One result dict per model and batch: timings (or the error that stopped the model) and errors."""
    import mljax
    rows = []
    for name in names:
        try:
            paths = build(name, work, rebuild=args.rebuild, log=log)
            m = torch_model(name)
            models = {p: mljax.MLModel(paths[p]) for p in ("fp32", "fp16", "nn") if p in paths and paths[p].exists()}
        except Exception as e:  # noqa: BLE001 - a failing model is a row of the report
            rows.append(dict(name=name, batch=None, about=REAL[name].about, error=_failed(e)))
            log(f"  real {name}: FAILED {rows[-1]['error']}")
            continue
        for batch in REAL[name].batches:
            log(f"  real {name} batch {batch}")
            rows.append(_measure_batch(name, paths, models, m, batch, args, interleaved))
            r = rows[-1]
            errs = ", ".join(f"{k} {v:.1e}" for k, v in r.get("errors", {}).items())
            log(f"    rel. errors vs torch: {errs or '-'}" + (f"; FAILED {r['error']}" if r["error"] else ""))
    return rows
