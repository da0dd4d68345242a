"""The ``mljax`` command: info, predict, update, bench, demo."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np

from mljax.errors import MLJaxError

__all__ = ["main"]


def _cmd_info(args) -> int:
    from mljax.inspect import describe
    print(describe(args.model, mil=args.mil))
    return 0


def _load_inputs(pairs: list[str]) -> dict:
    inputs = {}
    for pair in pairs:
        if "=" not in pair:
            raise MLJaxError(f"--input expects NAME=FILE (.npy or .npz); found {pair!r}")
        name, file = pair.split("=", 1)
        path = Path(file)
        if not path.is_file():
            raise MLJaxError(f"--input {name}: file {path} does not exist")
        try:
            value = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise MLJaxError(f"--input {name}: {path} is not a NumPy .npy/.npz file ({e})") from None
        if hasattr(value, "files"):
            value = value[value.files[0]]
        inputs[name] = value
    return inputs


def _cmd_predict(args) -> int:
    from mljax import cache
    if args.no_cache:
        return _predict(args)
    with cache.using():      # an unwritable folder only costs the cache (a warning), never the prediction
        return _predict(args)


def _predict(args) -> int:
    from mljax import MLModel
    model = MLModel(args.model, compute_precision=args.compute_precision)
    outputs = model.predict(_load_inputs(args.input))
    arrays = {k: np.asarray(v) for k, v in outputs.items() if not isinstance(v, dict)}
    if args.output:
        np.savez(args.output, **arrays)
        print(f"wrote {', '.join(arrays)} to {args.output}")
    for name, value in outputs.items():
        if isinstance(value, dict):
            print(f"{name}: {value}")
        else:
            a = np.asarray(value)
            print(f"{name}: {a.dtype} {a.shape}" + ("" if a.size > 16 else f" {a.tolist()}"))
    return 0


# Subcommands that live outside the core runtime, imported only when used.
_EXTERNAL = {
    "update": "updatable.cli",
    "demo": "updatable.cli",
    "bench": "mljax.bench_cli",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mljax", description="Run and update Core ML models anywhere JAX runs.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a model: type, inputs/outputs, ops, weights")
    info.add_argument("model", help=".mlpackage folder or .mlmodel file")
    info.add_argument("--mil", action="store_true", help="also print the ML program as MIL text")
    info.set_defaults(func=_cmd_info)
    pred = sub.add_parser("predict", help="predict from .npy inputs")
    pred.add_argument("model")
    pred.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy")
    pred.add_argument("--output", "-o", metavar="OUT.npz")
    pred.add_argument("--compute-precision", choices=["auto", "declared", "float16", "float32"], default="auto",
                      help="auto (default): fp16 programs compute in fp32 on the CPU, declared types elsewhere; "
                           "declared/float16: exact declared types; float32: always fp32")
    pred.add_argument("--no-cache", action="store_true",
                      help="do not keep compiled executables in $MLJAX_CACHE_DIR or ~/.cache/mljax "
                           "(the cache makes a second predict of the same model start in ~0.1 s)")
    pred.set_defaults(func=_cmd_predict)
    for name, module in _EXTERNAL.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        mod.add_subcommand(sub, name)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except MLJaxError as e:
        print(f"mljax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
