"""``mljax update`` and ``mljax demo`` (registered into the ``mljax`` command)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mljax.errors import MLJaxError, UpdateError

__all__ = ["add_subcommand"]


def _load_npz(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UpdateError(f"--data {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        raise UpdateError(f"--data {p} is not a NumPy .npz file of training inputs ({e})") from None


def _cmd_update(args) -> int:
    from updatable import UpdateTask
    overrides = {k: v for k, v in {
        "epochs": args.epochs, "learning_rate": args.learning_rate, "mini_batch_size": args.mini_batch_size,
        "momentum": args.momentum, "seed": args.seed, "shuffle": args.shuffle}.items() if v is not None}
    task = UpdateTask(args.model, _load_npz(args.data), parameters=overrides, progress_bar=True)
    ctx = task.run()
    out = ctx.model.save(args.output)
    print(f"final loss {ctx.metrics['loss']:.4f} after {ctx.metrics['epoch_index'] + 1} epoch(s); wrote {out}")
    return 0


def _cmd_demo(args) -> int:
    from updatable.demo import run_demo
    result = run_demo(args.output, samples=args.samples, epochs=args.epochs)
    return 0 if result["after"] > result["before"] else 1


def add_subcommand(sub, name: str) -> None:
    if name == "update":
        p = sub.add_parser("update", help="train an updatable model on data from an .npz file")
        p.add_argument("model", help="updatable .mlmodel / .mlpackage")
        p.add_argument("--data", required=True, help=".npz with one array per training input")
        p.add_argument("--output", "-o", required=True, help="where to write the updated model")
        p.add_argument("--epochs", type=int, help="epochs (default: the model's; within its allowed values)")
        p.add_argument("--learning-rate", type=float, help="learning rate (default: the model's; within its range)")
        p.add_argument("--mini-batch-size", type=int, help="samples per update step (default: the model's)")
        p.add_argument("--momentum", type=float, help="SGD momentum (default: the model's)")
        p.add_argument("--seed", type=int, help="seed of the shuffle (default: the model's)")
        p.add_argument("--shuffle", type=lambda s: s.lower() in ("1", "true", "yes"), metavar="true|false",
                       help="shuffle the data each epoch (default: the model's)")
        p.set_defaults(func=_cmd_update)
    elif name == "demo":
        p = sub.add_parser("demo", help="personalize the embedded digits model (no arguments needed)")
        p.add_argument("--output", "-o", default="personalized-digits.mlpackage",
                       help="where to write the personalized model (default personalized-digits.mlpackage)")
        p.add_argument("--samples", type=int, default=100, help="personal digits to train on (default 100)")
        p.add_argument("--epochs", type=int, default=20, help="epochs of the update (default 20)")
        p.set_defaults(func=_cmd_demo)
