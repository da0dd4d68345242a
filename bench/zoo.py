"""The benchmark zoo: small PyTorch networks, converted to Core ML ML programs and to ONNX.

Every network is built from a fixed seed, so the Core ML (fp32 and fp16) and ONNX files
hold the same weights.  Converted files are cached in a work folder keyed by the zoo
version; delete the folder (or pass ``--rebuild`` to ``bench/run.py``) to convert again.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["ZOO", "ZooModel", "build", "big_weights_model", "updatable_head", "cnn_jax"]

ZOO_VERSION = 1   # bump when a network changes, so cached conversions are rebuilt


def _torch():
    import torch
    return torch


# --- the networks ------------------------------------------------------------------------
def _cnn():
    nn = _torch().nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _dwcnn():
    """MobileNet-style depthwise-separable blocks."""
    nn = _torch().nn

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
    layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    for cin, cout, s in [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)]:
        layers += block(cin, cout, s)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)]
    return nn.Sequential(*layers)


def _transformer(d=128, heads=4, ffn=512):
    """A pre-norm encoder block written by hand (no nn.TransformerEncoderLayer fast path)."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))
    return Block()


def _recurrent(kind):
    nn = _torch().nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(nn, kind)(64, 128, batch_first=True)
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])
    return Net()


@dataclass(frozen=True)
class ZooModel:
    name: str
    make: Callable
    shape: tuple          # batch-1 input shape
    about: str


ZOO = {m.name: m for m in [
    ZooModel("cnn", _cnn, (1, 3, 64, 64), "3x(conv3x3+BN+ReLU), 2 max pools, global avg pool, linear; 64x64x3"),
    ZooModel("dwcnn", _dwcnn, (1, 3, 96, 96), "MobileNet-style: 5 depthwise-separable blocks (BN, ReLU6); 96x96x3"),
    ZooModel("transformer", _transformer, (1, 64, 128), "pre-norm encoder block by hand, d=128, 4 heads, FFN 512 (GELU); 64 tokens"),
    ZooModel("lstm", lambda: _recurrent("LSTM"), (1, 32, 64), "LSTM(64->128) over 32 steps, linear head on the last step"),
    ZooModel("gru", lambda: _recurrent("GRU"), (1, 32, 64), "GRU(64->128) over 32 steps, linear head on the last step"),
]}


def torch_model(name: str):
    """The zoo network ``name`` in eval mode, with seeded weights (BN statistics randomised)."""
    torch = _torch()
    torch.manual_seed(0)
    m = ZOO[name].make()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def example_input(name: str, batch: int = 1, seed: int = 1) -> np.ndarray:
    shape = (batch,) + ZOO[name].shape[1:]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- conversion ----------------------------------------------------------------------------
def _convert_coreml(m, x, path: Path, precision: str) -> None:
    import coremltools as ct
    torch = _torch()
    traced = torch.jit.trace(m, torch.from_numpy(x))
    cp = ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32
    ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], outputs=[ct.TensorType(name="y")],
                    convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16, compute_precision=cp)
    ml.save(str(path))


def _export_onnx(m, x, path: Path) -> None:
    torch = _torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.from_numpy(x),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)


def build(name: str, work: Path, *, rebuild: bool = False, log=print) -> dict[str, Path]:
    """Convert zoo model ``name`` (cached): {'fp32': .mlpackage, 'fp16': .mlpackage, 'onnx': .onnx, 'torch': .pt}."""
    torch = _torch()
    folder = Path(work) / f"zoo-v{ZOO_VERSION}" / name
    paths = {"fp32": folder / "fp32.mlpackage", "fp16": folder / "fp16.mlpackage",
             "onnx": folder / "model.onnx", "torch": folder / "traced.pt"}
    done = folder / "done.json"
    if done.exists() and not rebuild and all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    log(f"  converting {name} (coremltools fp32/fp16, ONNX opset 17, TorchScript) ...")
    m, x = torch_model(name), example_input(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for precision in ("fp32", "fp16"):
            _convert_coreml(m, x, paths[precision], precision)
        _export_onnx(m, x, paths["onnx"])
        torch.jit.save(torch.jit.trace(m, torch.from_numpy(x)), str(paths["torch"]))
    done.write_text(json.dumps({"version": ZOO_VERSION}))
    return paths


def big_weights_model(work: Path, megabytes: int, *, log=print) -> dict[str, Path]:
    """An MLP whose weights total ``megabytes`` MB (fp32), as an ML program and as ONNX (same weights)."""
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb, types
    import onnx
    from onnx import helper, numpy_helper

    width = 4096
    n_layers = max(1, round(megabytes * 1e6 / (width * width * 4)))
    folder = Path(work) / f"big-v{ZOO_VERSION}-{n_layers}x{width}"
    paths = {"mlpackage": folder / "big.mlpackage", "onnx": folder / "big.onnx", "bytes": n_layers * width * width * 4}
    if (folder / "done.json").exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    log(f"  building a {paths['bytes'] / 1e6:.0f} MB MLP ({n_layers} x {width}x{width} fp32) ...")
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((width, width), np.float32) / 64) for _ in range(n_layers)]

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, width), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def prog(x):
        for w in ws:
            x = mb.relu(x=mb.linear(x=x, weight=w))
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                        compute_precision=ct.precision.FLOAT32)
    ml.save(str(paths["mlpackage"]))
    nodes, inits, cur = [], [], "x"
    for i, w in enumerate(ws):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        cur = f"r{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(cur, onnx.TensorProto.FLOAT, [1, width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(paths["onnx"]))
    del ws, prog, ml
    (folder / "done.json").write_text("{}")
    return paths


# --- the hand-written JAX CNN (for the lowering-overhead comparison) -----------------------
def cnn_jax(m):
    """The ``cnn`` zoo network written directly in JAX (BN folded into the convs, NCHW).

    Returns ``(fn, weights)`` with ``fn(weights, x)`` the jittable forward pass.
    """
    import jax
    import jax.numpy as jnp

    convs, bns, linear = [], [], None
    for mod in m.modules():
        kind = type(mod).__name__
        if kind == "Conv2d":
            convs.append(mod)
        elif kind == "BatchNorm2d":
            bns.append(mod)
        elif kind == "Linear":
            linear = mod
    weights = {}
    for i, (c, bn) in enumerate(zip(convs, bns)):
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().numpy()
        weights[f"w{i}"] = c.weight.detach().numpy() * scale[:, None, None, None]
        weights[f"b{i}"] = (c.bias.detach().numpy() - bn.running_mean.numpy()) * scale + bn.bias.detach().numpy()
    weights["fc_w"] = linear.weight.detach().numpy().T.copy()
    weights["fc_b"] = linear.bias.detach().numpy()

    def conv_relu(x, w, b):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return jax.nn.relu(y + b[None, :, None, None])

    def maxpool(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def fn(w, x):
        x = maxpool(conv_relu(x, w["w0"], w["b0"]))
        x = maxpool(conv_relu(x, w["w1"], w["b1"]))
        x = conv_relu(x, w["w2"], w["b2"]).mean(axis=(2, 3))
        return x @ w["fc_w"] + w["fc_b"]
    return fn, weights


# --- the updatable head (for update throughput) --------------------------------------------
def updatable_head(work: Path, n_in: int, n_hidden: int, n_classes: int, *, lr: float, batch: int,
                   epochs: int) -> tuple[Path, dict]:
    """features -> dense+ReLU -> dense -> softmax, updatable (both layers, SGD), via NeuralNetworkBuilder."""
    import coremltools as ct
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder, SgdParams

    rng = np.random.default_rng(0)
    w = dict(w1=rng.normal(scale=1 / np.sqrt(n_in), size=(n_hidden, n_in)).astype(np.float32),
             b1=np.zeros(n_hidden, np.float32),
             w2=rng.normal(scale=1 / np.sqrt(n_hidden), size=(n_classes, n_hidden)).astype(np.float32),
             b2=np.zeros(n_classes, np.float32))
    labels = list(range(n_classes))
    b = NeuralNetworkBuilder([("features", datatypes.Array(n_in))], [("probs", None)], mode="classifier")
    b.add_inner_product("dense1", W=w["w1"], b=w["b1"], input_channels=n_in, output_channels=n_hidden,
                        has_bias=True, input_name="features", output_name="h")
    b.add_activation("relu1", "RELU", "h", "hr")
    b.add_inner_product("dense2", W=w["w2"], b=w["b2"], input_channels=n_hidden, output_channels=n_classes,
                        has_bias=True, input_name="hr", output_name="logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(labels, predicted_feature_name="label", prediction_blob="probs")
    b.make_updatable(["dense1", "dense2"])
    b.set_categorical_cross_entropy_loss(name="loss", input="probs")
    b.set_sgd_optimizer(SgdParams(lr=lr, batch=batch, momentum=0.0))
    b.set_epochs(epochs, allowed_set=list(range(1, 1001)))
    b.nn_spec.updateParams.shuffle.defaultValue = True
    path = Path(work) / "updatable_head.mlmodel"
    Path(work).mkdir(parents=True, exist_ok=True)
    ct.models.utils.save_spec(b.spec, str(path))
    return path, w


def default_work_dir() -> Path:
    return Path(os.environ.get("MLJAX_BENCH_DIR", Path.home() / ".cache" / "mljax-bench"))
