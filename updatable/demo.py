"""``mljax demo``: personalize the embedded digits pipeline on "personal" handwriting.

The embedded model (made by ``scripts/make_demo_model.py`` with mljax's own converters) is
a frozen ML-program feature extractor and an updatable neural-network classifier,
pretrained on the digits 0-6 only.  The demo updates it on 100 of the user's digits and
shows the accuracy on the user's held-out digits before and after.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "demo_model_path", "demo_data"]


def demo_model_path() -> Path:
    return Path(str(resources.files("updatable") / "data" / "digits_pipeline.mlpackage"))


def demo_data() -> tuple[np.ndarray, np.ndarray]:
    """The digits (pixels scaled to [0, 1] as ``[N, 1, 64]`` float32, labels as strings)."""
    with resources.as_file(resources.files("updatable") / "data" / "digits.npz") as path:
        data = np.load(path)
        x = (data["pixels"].astype(np.float32) / 16.0)[:, None, :]
        return x, data["labels"].astype(str)


def _accuracy(model, x, y) -> float:
    outs = model.predict([{"pixels": xi} for xi in x])
    return float(np.mean([o["digit"] == yi for o, yi in zip(outs, y)]))


def run_demo(output: str | Path = "personalized-digits.mlpackage", *, samples: int = 100,
             epochs: int = 20, seed: int = 0, progress: bool = True, echo=print) -> dict:
    """Run the demo; returns the accuracies, the loss history and the output path."""
    from mljax import MLModel
    from updatable import UpdateTask

    t0 = time.perf_counter()
    x, y = demo_data()
    personal = np.arange(int(len(x) * 0.6), len(x))   # never seen in pretraining
    order = np.random.default_rng(seed).permutation(personal)
    train, test = order[:samples], order[samples:]
    model = MLModel(demo_model_path())
    echo(f"model: {demo_model_path().name} (frozen ML program -> updatable neural network), "
         f"pretrained on digits 0-6")
    before = _accuracy(model, x[test], y[test])
    echo(f"accuracy on {len(test)} held-out personal digits before the update: {before:.1%}")
    losses = []
    task = UpdateTask(model, {"pixels": x[train], "digit": y[train]}, parameters={"epochs": epochs},
                      progress_handler=lambda c: losses.append(c.metrics["loss"]) if c.event == "epoch_end" else None,
                      progress_bar=progress)
    ctx = task.run()
    after = _accuracy(ctx.model, x[test], y[test])
    echo(f"accuracy after updating on {len(train)} personal digits for {epochs} epochs: {after:.1%}")
    path = ctx.model.save(output)
    echo(f"personalized model written to {Path(path).resolve()}  ({time.perf_counter() - t0:.1f} s)")
    return {"before": before, "after": after, "losses": losses, "path": Path(path)}
