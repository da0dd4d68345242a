"""Make the demo's embedded model and data (run once; outputs are checked in).

1. scikit-learn's handwritten digits (8x8, 1797 samples) -> ``updatable/data/digits.npz``.
2. A Flax NNX network trained with Optax on the digits 0-6 only (the "pretrained" model).
3. Its feature extractor -> a frozen ML program with ``converters.convert``; its head (10
   classes, with 7-9 never seen) -> an updatable NeuralNetwork classifier with
   ``converters.neuralnetwork``; both -> an updatable pipeline
   ``updatable/data/digits_pipeline.mlpackage``.

Usage: ``python scripts/make_demo_model.py`` (needs scikit-learn; about 20 s on 2 cores).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "updatable" / "data"
PRETRAINED_CLASSES = list(range(7))


class Extractor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.l2(jax.nn.relu(self.l1(x))))


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.features = Extractor(rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.features(x))


def save_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    pixels, labels = d.data.astype(np.uint8), d.target.astype(np.uint8)
    np.savez_compressed(DATA / "digits.npz", pixels=pixels, labels=labels)
    return pixels, labels


def train(x: np.ndarray, y: np.ndarray, steps: int = 400) -> Net:
    net = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(net, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(net, opt, x, y):
        def loss_fn(net):
            return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(net)
        opt.update(net, grads)
        return loss

    for i in range(steps):
        loss = step(net, opt, jnp.asarray(x), jnp.asarray(y))
    print(f"pretraining loss {float(loss):.4f}")
    return net


def main() -> int:
    import converters
    from converters.neuralnetwork import Dense, Softmax, head_to_neuralnetwork, updatable_pipeline

    DATA.mkdir(parents=True, exist_ok=True)
    pixels, labels = save_digits()
    x = pixels.astype(np.float32) / 16.0
    # the demo's "personal" digits are the last 40% of the set: the pretrained model never sees them
    cut = int(len(x) * 0.6)
    old = np.isin(labels[:cut], PRETRAINED_CLASSES)
    net = train(x[:cut][old], labels[:cut][old])
    features = converters.convert(net.features, {"pixels": x[:1]}, output_names=["embedding"])
    w = np.asarray(net.head.kernel[...]).T.copy()
    b = np.asarray(net.head.bias[...]).copy()
    w[7:] *= 0.0  # classes the pretrained model never saw start with no evidence
    b[7:] = -2.0
    head = head_to_neuralnetwork(
        [Dense(w, b), Softmax()], input_name="embedding", input_shape=(1, 32),
        class_labels=[str(i) for i in range(10)], label_name="digit", output_name="probabilities",
        optimizer="sgd", learning_rate=0.005, mini_batch_size=10, momentum=0.9, epochs=20)
    target = DATA / "digits_pipeline.mlpackage"
    if target.exists():
        shutil.rmtree(target)
    updatable_pipeline(features, head, target, names=("features", "classifier"))
    print(f"wrote {target} and {DATA / 'digits.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
