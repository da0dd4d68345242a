"""The research API: train any weights of any Core ML model, with any optax optimizer.

Core ML updates only innerProduct/convolution layers of a neural network.  Here any leaf of
a model's weights pytree can train — including the weights inside an ML program — chosen
by name or glob pattern (``"classifier/*"``, ``"features/linear_0_*"``), or a frozen
``MLModel`` stage is followed by a trainable Flax NNX module.
"""
from __future__ import annotations

import copy
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
    """

    def __init__(self, model: MLModel, *, trainable: Sequence[str] | str = (), head=None,
                 feature: str | None = None, output: str | None = None,
                 loss: str | Callable = "cross_entropy", optimizer: optax.GradientTransformation | None = None):
        self.model = model
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
    def _model_forward(self, trainable, features):
        flat = {**self._flat, **trainable}
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

            def predict(p, x):
                return nnx.merge(graphdef, p, rest)(x.reshape(x.shape[0], -1))
            trainable, data = params, feats
        else:
            trainable = {k: self._flat[k] for k in self.trainable_names}
            data = {k: np.asarray(v) for k, v in inputs.items()}
            predict = self._model_forward
        opt_state = self.optimizer.init(trainable)
        loss_fn = self.loss

        @jax.jit
        def step(trainable, opt_state, x, y):
            def objective(t):
                pred = predict(t, x)
                return loss_fn(pred.reshape(pred.shape[0], -1), y)
            value, grads = jax.value_and_grad(objective)(trainable)
            updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        rng = np.random.default_rng(seed)
        for epoch in range(epochs):
            order, losses = rng.permutation(n), []
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                xb = data[idx] if self.head is not None else {k: v[idx] for k, v in data.items()}
                trainable, opt_state, value = step(trainable, opt_state, xb, target[idx])
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
        new = copy.copy(self.model)
        new._weights = jax.device_put(_unflatten(self._flat, self.model.weights))
        return new

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
