"""Per-layer profile: each convolution / matrix product of the zoo alone, mljax's op vs ONNX Runtime.

Where the whole-network gap to ONNX Runtime comes from, layer by layer: every ``Conv2d`` of the
cnn and dwcnn (at the shapes it sees in the network) and the matrix products of the recurrent
and transformer models run alone through mljax's own MIL op implementation (jitted, the weights
as arguments, as in a lowered program) and through ONNX Runtime (the same layer exported from
PyTorch).  Values are checked against PyTorch before timing.  Each conv row names the path
``mljax.ops.conv.conv_path`` picks for it (im2col, winograd, pointwise, depthwise or lax).
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

import zoo
from measure import interleaved


def _conv_inputs(name: str, batch: int):
    """(layer index, Conv2d module, the input it receives) for each Conv2d of zoo model ``name``."""
    torch = zoo._torch()
    model = zoo.torch_model(name)
    seen = []
    hooks = [mod.register_forward_hook(lambda m, inp, out, i=i: seen.append((i, m, inp[0].detach().numpy())))
             for i, mod in enumerate(model) if isinstance(mod, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.from_numpy(zoo.example_input(name, batch)))
    for h in hooks:
        h.remove()
    return seen


def _ort_session(module, x, path: Path, threads: int):
    import onnxruntime as ort
    torch = zoo._torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _mljax_conv(module):
    import jax

    from mljax.ops.conv import conv
    w = module.weight.detach().numpy()
    b = module.bias.detach().numpy() if module.bias is not None else None
    pad = np.array([p for p in module.padding for _ in range(2)])
    fn = jax.jit(lambda w, b, x: conv(x, w, b, strides=np.array(module.stride), pad_type="custom", pad=pad,
                                      groups=module.groups))
    wd, bd = jax.device_put(w), (jax.device_put(b) if b is not None else None)
    return lambda x: jax.block_until_ready(fn(wd, bd, x))


def _conv_path(module, x) -> str:
    """The implementation mljax's ``conv`` picks for this layer (``mljax.ops.conv.conv_path``)."""
    from mljax.ops.conv import conv_path
    pads = [(p, p) for p in module.padding]
    return conv_path(x.shape, tuple(module.weight.shape), x.dtype, module.stride, pads, module.dilation,
                     module.groups)


def _mljax_linear(module):
    import jax

    from mljax.ops.linear import linear
    w, b = jax.device_put(module.weight.detach().numpy()), jax.device_put(module.bias.detach().numpy())
    fn = jax.jit(linear)
    return lambda x: jax.block_until_ready(fn(x, w, b))


def conv_rows(names, batch: int, args, log=print) -> list[dict]:
    """One row per Conv2d of the given zoo models: shapes, mljax ms, ONNX Runtime ms."""
    torch = zoo._torch()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for i, module, x in _conv_inputs(name, batch):
                sess = _ort_session(module, x, Path(tmp) / f"{name}-{i}.onnx", args.threads)
                with torch.no_grad():
                    ref = module(torch.from_numpy(x)).numpy()
                kind = ("depthwise" if module.groups > 1 and module.groups == module.in_channels else
                        "1x1" if module.kernel_size == (1, 1) else "x".join(map(str, module.kernel_size)))
                stride = f" /{module.stride[0]}" if module.stride[0] > 1 else ""
                kind = f"conv {kind}{stride} ({_conv_path(module, x)})"
                rows.append(_timed(f"{name} #{i}", kind, x, ref, _mljax_conv(module), sess, args))
                log(f"    {rows[-1]['layer']}: {rows[-1]['kind']} {rows[-1]['mljax_ms']:.3f} ms vs "
                    f"{rows[-1]['ort_ms']:.3f} ms")
    return rows


# (where, rows of x, in features, out features): the matrix products of the zoo at batch 32
GEMMS = [("lstm/gru recurrent step", 32, 128, 512), ("lstm input projection", 1024, 64, 512),
         ("transformer qkv", 2048, 128, 384), ("transformer ffn", 2048, 128, 512), ("head", 32, 128, 10)]


def gemm_rows(args, log=print) -> list[dict]:
    """One row per matrix-product shape of ``GEMMS``: ``linear`` in mljax vs ``Gemm`` in ONNX Runtime."""
    torch = zoo._torch()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (where, n, k, m) in enumerate(GEMMS):
            module = torch.nn.Linear(k, m).eval()
            x = np.random.default_rng(i).standard_normal((n, k)).astype(np.float32)
            sess = _ort_session(module, x, Path(tmp) / f"gemm-{i}.onnx", args.threads)
            with torch.no_grad():
                ref = module(torch.from_numpy(x)).numpy()
            rows.append(_timed(where, f"linear {n}x{k} @ {k}x{m}", x, ref, _mljax_linear(module), sess, args))
            log(f"    {where}: {rows[-1]['mljax_ms']:.3f} ms vs {rows[-1]['ort_ms']:.3f} ms")
    return rows


def _timed(layer: str, kind: str, x, ref, ours, sess, args) -> dict:
    np.testing.assert_allclose(np.asarray(ours(x)), ref, rtol=1e-3, atol=1e-3)
    t = interleaved({"mljax": lambda: ours(x), "ort": lambda: sess.run(None, {"x": x})},
                    rounds=max(3, args.rounds // 3), budget=args.budget)
    return {"layer": layer, "kind": kind, "shape": f"{tuple(x.shape)} -> {tuple(ref.shape)}",
            "mljax_ms": t["mljax"].median * 1e3, "ort_ms": t["ort"].median * 1e3}
