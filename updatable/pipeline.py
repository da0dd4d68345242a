"""The research API: train any weights of any Core ML model, with any optax optimizer.

Core ML updates only innerProduct/convolution layers of a neural network.  Here any leaf of
a model's weights pytree can train — including the weights inside an ML program — chosen
by name or glob pattern (``"classifier/*"``, ``"features/linear_0_*"``), or a frozen
``MLModel`` stage is followed by a trainable Flax NNX module.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mljax.errors import UpdateError
from mljax.model import MLModel
from updatable.losses import (categorical_cross_entropy, categorical_cross_entropy_from_probs,
                              mean_squared_error)

__all__ = ["Pipeline", "weight_names"]


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def _unflatten(flat: dict, like: dict, prefix="") -> dict:
    return {k: _unflatten(flat, v, f"{prefix}{k}/") if isinstance(v, dict) else flat[f"{prefix}{k}"]
            for k, v in like.items()}


def weight_names(model: MLModel) -> list[str]:
    """Every weight of ``model`` by its path name (stage/var), for choosing what trains."""
    return sorted(_flatten(model.weights))


def _loss_fn(loss: str | Callable) -> Callable:
    if callable(loss):
        return loss
    table = {"cross_entropy": categorical_cross_entropy, "cross_entropy_from_probs":
             categorical_cross_entropy_from_probs, "mse": mean_squared_error}
    if loss not in table:
        raise UpdateError(f"loss must be a callable or one of {sorted(table)}; found {loss!r}")
    return table[loss]


class Pipeline:
    """Train chosen weights of ``model`` (mode 1) or a Flax head after a frozen model (mode 2).

    Args:
      model: the (frozen) MLModel.
      trainable: weight names or glob patterns of ``model``'s weights to train (mode 1).
      head: a Flax NNX module trained on ``model``'s output ``feature`` (mode 2); the
        frozen features are computed once per sample.
      output: the model output the loss reads (mode 1; default: the first output).
      loss: ``"cross_entropy"`` (on logits), ``"cross_entropy_from_probs"``, ``"mse"`` or a
        callable ``loss(prediction, target)``.
      optimizer: any ``optax.GradientTransformation`` (schedules included).
      devices: with several, each mini-batch is sharded over them (data parallel: weights and
        optimizer state replicated, gradients summed across devices by XLA).  The batch is padded
        to a multiple of the device count and the loss is taken per sample and averaged over the
        real ones, which equals the batch loss for mean-reduced losses (all the built-in ones).
    """

    def __init__(self, model: MLModel, *, trainable: Sequence[str] | str = (), head=None,
                 feature: str | None = None, output: str | None = None,
                 loss: str | Callable = "cross_entropy", optimizer: optax.GradientTransformation | None = None,
                 devices=None):
        self.model = model
        self.devices = None if devices is None else list(devices)
        if self.devices is not None and not self.devices:
            raise UpdateError("devices: expected at least one device; found an empty list")
        self.loss = _loss_fn(loss)
        self.optimizer = optimizer or optax.adam(1e-3)
        self.head = head
        self.history: list[float] = []
        if head is not None:
            self.feature = feature or next(iter(model.output_description))
            return
        patterns = [trainable] if isinstance(trainable, str) else list(trainable)
        flat = _flatten(model.weights)
        chosen = sorted({n for n in flat for p in patterns if fnmatch.fnmatchcase(n, p)})
        if not chosen:
            raise UpdateError(f"no weight matches {patterns}; weights are e.g. {sorted(flat)[:8]}")
        self.trainable_names = chosen
        self.output = output or next(iter(model.stage.outputs))
        self._flat = {k: jnp.asarray(v) for k, v in flat.items()}

    # --- mode 1: weights of the model itself ------------------------------------------------
    def _model_forward(self, trainable, features, frozen):
        flat = {**frozen, **trainable}
        weights = _unflatten(flat, self.model.weights)
        run = jax.vmap(lambda x: self.model.stage.fn(weights, x, {})[0][self.output])
        return run(features)

    # --- mode 2: a Flax head ------------------------------------------------------------
    def _frozen_features(self, inputs: dict) -> np.ndarray:
        outs = self.model.predict([{k: v[i] for k, v in inputs.items()} for i in range(len(next(iter(inputs.values()))))])
        return np.stack([np.asarray(o[self.feature], np.float32) for o in outs])

    def fit(self, inputs: dict, target, *, epochs: int = 10, batch_size: int = 16, seed: int = 0,
            progress: Callable | None = None) -> list[float]:
        """Train; returns the mean loss of each epoch (also in ``self.history``)."""
        target = np.asarray(target)
        n = len(target)
        if self.head is not None:
            from flax import nnx
            feats = self._frozen_features(inputs)
            graphdef, params, rest = nnx.split(self.head, nnx.Param, ...)

            def predict(p, x, frozen):
                return nnx.merge(graphdef, p, rest)(x.reshape(x.shape[0], -1))
            trainable, data, frozen = params, {"x": feats}, {}
        else:
            trainable = {k: self._flat[k] for k in self.trainable_names}
            frozen = {k: v for k, v in self._flat.items() if k not in trainable}
            data = {k: np.asarray(v) for k, v in inputs.items()}
            predict = self._model_forward
        opt_state = self.optimizer.init(trainable)
        loss_fn = self.loss

        @jax.jit
        def step(trainable, opt_state, frozen, x, y, weight):
            def objective(t):
                pred = predict(t, x if self.head is None else x["x"], frozen)
                pred = pred.reshape(pred.shape[0], -1)
                if weight is None:
                    return loss_fn(pred, y)
                per = jax.vmap(lambda p, t: loss_fn(p[None], t[None]))(pred, y)
                return jnp.sum(per * weight)     # the mean over the real (unpadded) samples
            value, grads = jax.value_and_grad(objective)(trainable)
            updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        parallel = _DataParallel(self.devices) if self.devices is not None and len(self.devices) > 1 else None
        if parallel is not None:
            trainable, opt_state, frozen = parallel.replicate((trainable, opt_state, frozen))
        rng = np.random.default_rng(seed)
        for epoch in range(epochs):
            order, losses = rng.permutation(n), []
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                xb, yb, wb = {k: v[idx] for k, v in data.items()}, target[idx], None
                if parallel is not None:
                    xb, yb, wb = parallel.shard(xb, yb)
                trainable, opt_state, value = step(trainable, opt_state, frozen, xb, yb, wb)
                losses.append(float(value))
            if not np.isfinite(losses).all():
                raise UpdateError(f"the loss became non-finite in epoch {epoch}; nothing was changed")
            self.history.append(float(np.mean(losses)))
            if progress is not None:
                progress(epoch, self.history[-1])
        if self.head is not None:
            nnx.update(self.head, trainable)
        else:
            self._flat.update(trainable)
        return self.history

    def trained_model(self) -> MLModel:
        """An MLModel with the trained weights (mode 1); the source model is unchanged."""
        if self.head is not None:
            raise UpdateError("a Flax head is exported with export(); trained_model() is for mode 1")
        return self.model.with_weights(_unflatten(jax.device_get(self._flat), self.model.weights))

    def predict_head(self, inputs: dict) -> np.ndarray:
        """Mode 2: the head's output on the frozen features of ``inputs``."""
        return np.asarray(self.head(jnp.asarray(self._frozen_features(inputs)).reshape(len(next(iter(inputs.values()))), -1)))

    def export(self, path, *, class_labels: Sequence[str], label_name: str = "label",
               optimizer: str = "adam", **update_params):
        """Mode 2: save the frozen model + the trained head as an updatable pipeline package."""
        from converters.neuralnetwork import Softmax, head_to_neuralnetwork, layers_from_flax, updatable_pipeline
        layers = layers_from_flax(self.head)
        if not isinstance(layers[-1], Softmax):
            layers.append(Softmax())
        shape = self.model.output_description[self.feature].shape
        head = head_to_neuralnetwork(layers, input_name=self.feature, input_shape=shape,
                                     class_labels=list(class_labels), label_name=label_name,
                                     optimizer=optimizer, **update_params)
        return updatable_pipeline(self.model, head, path)


class _DataParallel:
    """Mini-batches sharded over a 'batch' mesh axis, padded to a multiple of the devices."""

    def __init__(self, devices):
        from jax.sharding import NamedSharding, PartitionSpec as P

        from mljax import distribute
        self.distribute = distribute
        mesh = distribute.mesh(devices, "batch")
        self.count = mesh.devices.size
        self.rows, self.everywhere = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())

    def replicate(self, tree):
        return jax.tree_util.tree_map(
            lambda x: self.distribute.global_array(np.asarray(jax.device_get(x)), self.everywhere), tree)

    def shard(self, x: dict, y: np.ndarray):
        n = len(y)
        rows = self.distribute.round_up(n, self.count)
        weight = np.zeros(rows, np.float32)
        weight[:n] = 1.0 / n
        place = lambda a: self.distribute.global_array(self.distribute.pad_rows(np.asarray(a), rows), self.rows)  # noqa: E731
        return {k: place(v) for k, v in x.items()}, place(y), place(weight)
