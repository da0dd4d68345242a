"""Which 2-D convolution implementation is fastest on XLA:CPU, shape by shape: the data behind ``conv_path``.

Every implementation of ``mljax.ops.conv`` that applies to a shape (``lax``: XLA's convolution;
``im2col``; ``winograd`` F(2x2,3x3) and F(4x4,3x3)) runs jitted, the weights as arguments, single
threaded, timed in interleaved rounds (process CPU time).  Prints, per shape, each path's ms, its
ratio to ``lax`` (median of per-round ratios), its error against ``lax`` (relative to the output's
largest magnitude), and the path ``conv_path`` picks.  ``python bench/conv_paths.py [--rounds 7]``
(about 3 minutes); the table in ``mljax/ops/conv.py`` is its output on the project's machine.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mljax.cpu import set_cpu_threads  # noqa: E402  (does not import JAX)

set_cpu_threads(1)   # one thread, as the ONNX Runtime / torch peers get

import numpy as np  # noqa: E402

from measure import interleaved  # noqa: E402

# name: (x shape, C_out, kernel, stride, pad): the cnn/dwcnn layers of docs/performance.md and a few others
SHAPES = {
    "cnn #0": ((32, 3, 64, 64), 32, 3, 1, 1),
    "cnn #4": ((32, 32, 32, 32), 64, 3, 1, 1),
    "cnn #8": ((32, 64, 16, 16), 128, 3, 1, 1),
    "dwcnn #0 /2": ((32, 3, 96, 96), 32, 3, 2, 1),
    "stem 7x7 /2": ((8, 3, 112, 112), 64, 7, 2, 3),
    "first 224": ((8, 3, 224, 224), 32, 3, 1, 1),
    "b32 c64 56x56": ((32, 64, 56, 56), 64, 3, 1, 1),
    "c8 3x3": ((32, 8, 32, 32), 16, 3, 1, 1),
    "c16 3x3": ((32, 16, 32, 32), 16, 3, 1, 1),
    "c64 3x3 /2": ((32, 64, 32, 32), 128, 3, 2, 1),
    "b1 c64 56x56": ((1, 64, 56, 56), 64, 3, 1, 1),
    "b8 c128 28x28": ((8, 128, 28, 28), 128, 3, 1, 1),
    "b8 c256 14x14": ((8, 256, 14, 14), 256, 3, 1, 1),
    "b1 c256 14x14": ((1, 256, 14, 14), 256, 3, 1, 1),
    "b1 c512 7x7": ((1, 512, 7, 7), 512, 3, 1, 1),
    "1x1 c64->128": ((32, 64, 24, 24), 128, 1, 1, 0),
}


def _runners(x_shape, c_out, k, s, p):
    import jax
    from jax import lax

    from mljax.ops import conv as C
    pads, strides = [(p, p)] * 2, (s, s)
    fns = {"lax": lambda x, w: lax.conv_general_dilated(x, w, strides, pads,
                                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))}
    if k == 1:
        fns["pointwise"] = lambda x, w: C._pointwise(x, w, strides)
    else:
        fns["im2col"] = lambda x, w: C._im2col(x, w, strides, pads, (1, 1))
    if k == 3 and s == 1:
        fns["winograd2"] = lambda x, w: C._winograd(x, w, pads, C._WINOGRAD_F2)
        fns["winograd4"] = lambda x, w: C._winograd(x, w, pads, C._WINOGRAD_F4)
    w_shape = (c_out, x_shape[1], k, k)
    picked = C.conv_path(x_shape, w_shape, np.float32, strides, pads, (1, 1), 1)
    return {name: jax.jit(f) for name, f in fns.items()}, w_shape, picked


def main(argv=None):
    import jax
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated shape names")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| shape | path | ms | / lax | error | picked |\n|---|---|---:|---:|---:|---|")
    for name, (x_shape, c_out, k, s, p) in SHAPES.items():
        if args.only and name not in args.only.split(","):
            continue
        fns, w_shape, picked = _runners(x_shape, c_out, k, s, p)
        x = jax.device_put(rng.standard_normal(x_shape).astype(np.float32))
        w = jax.device_put((rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32))
        ref = np.asarray(fns["lax"](x, w))
        err = {n: float(np.abs(np.asarray(f(x, w)) - ref).max() / np.abs(ref).max()) for n, f in fns.items()}
        t = interleaved({n: (lambda f=f: jax.block_until_ready(f(x, w))) for n, f in fns.items()},
                        rounds=args.rounds, budget=0.15)
        for n in fns:
            r = float(np.median(t[n].rounds / t["lax"].rounds))
            print(f"| {name} {x_shape}->{c_out} | {n} | {t[n].median * 1e3:.2f} | {r:.2f}x | {err[n]:.1e} | "
                  f"{'<-' if n == picked or (picked == 'winograd' and n == 'winograd4') else ''} {picked} |",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
