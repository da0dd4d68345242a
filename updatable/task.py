"""``UpdateTask``: MLUpdateTask's shape, Core ML's semantics, Optax underneath.

The whole training step (forward through the network, loss, gradients of the updatable
layers only, optimizer update) is one jitted function.  Features of a deterministic frozen
prefix (the ML-program stages of an updatable pipeline) are computed once per sample and
reused across epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mljax.errors import InputError, MLJaxError, UpdateError
from mljax.model import MLModel
from mljax.stage import shared_fn
from updatable.losses import (categorical_cross_entropy, categorical_cross_entropy_from_probs,
                              mean_squared_error)
from updatable.network import TrainableNetwork
from updatable.knn import is_knn, update_knn
from updatable.optimizers import from_parameters
from updatable.spec import UpdateSpec, read_update_spec

__all__ = ["UpdateTask", "UpdateContext"]

EVENTS = ("training_begin", "mini_batch_end", "epoch_end")


def mini_batches(n: int, mini_batch_size) -> tuple[int, int]:
    """``(samples per mini-batch, mini-batches per epoch)`` for ``n`` samples: Core ML's
    mini-batches hold ``mini_batch_size`` samples (all ``n`` if fewer), the last one the rest."""
    batch = max(1, min(int(mini_batch_size), n))
    return batch, math.ceil(n / batch)


@dataclass
class UpdateContext:
    """What a progress/completion handler sees (MLUpdateContext's shape)."""

    task: "UpdateTask"
    event: str
    metrics: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    _model: MLModel | None = None

    @property
    def model(self) -> MLModel:
        """The model with the weights trained so far (built on first access)."""
        if self._model is None:
            self._model = self.task.current_model()
        return self._model


def _stack_training_data(data, names: list[str]) -> dict[str, np.ndarray]:
    """A list of feature dicts or a dict of stacked arrays -> {name: stacked array}."""
    if isinstance(data, dict):
        missing = [n for n in names if n not in data]
        if missing:
            raise UpdateError(f"training data lacks training inputs {missing}; it has {sorted(data, key=str)}")
        stacked = {}
        for n in names:
            try:
                stacked[n] = np.asarray(data[n])
            except ValueError as e:
                raise UpdateError(f"training input {n!r}: expected an array of samples ({e})") from None
            if stacked[n].ndim == 0:
                raise UpdateError(f"training input {n!r}: expected an array with one entry per sample; "
                                  f"found a single {type(data[n]).__name__}")
    elif isinstance(data, (str, bytes)) or not isinstance(data, (list, tuple)):
        raise UpdateError(f"training data: expected a list of feature dicts or a dict of arrays; "
                          f"found {type(data).__name__}")
    else:
        items = list(data)
        if not items:
            raise UpdateError("training data is empty")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise UpdateError(f"training sample {i}: expected a dict of features, found {type(item).__name__}")
            missing = [n for n in names if n not in item]
            if missing:
                raise UpdateError(f"training sample {i} lacks training inputs {missing}; expected {names}")
        stacked = {}
        for n in names:
            samples = []
            for i, item in enumerate(items):
                try:
                    samples.append(np.asarray(item[n]))
                except ValueError as e:
                    raise UpdateError(f"training sample {i}, input {n!r}: expected an array ({e})") from None
            try:
                stacked[n] = np.stack(samples)
            except ValueError:
                shapes = sorted({s.shape for s in samples})
                raise UpdateError(f"training input {n!r} has samples of different shapes {shapes}") from None
    sizes = {n: len(v) for n, v in stacked.items()}
    if len(set(sizes.values())) != 1:
        raise UpdateError(f"training inputs have different numbers of samples: {sizes}")
    return stacked


class UpdateTask:
    """Train an updatable Core ML model (or updatable pipeline) on the user's data.

    Args:
      model: a path, or an :class:`mljax.MLModel` (never modified).
      training_data: a list of feature dicts (like MLArrayBatchProvider) or a dict of
        stacked arrays, holding the model's training inputs.
      parameters: a dict of overrides of the spec's update parameters (``learning_rate``,
        ``epochs``, ``mini_batch_size``, ``momentum``, ``beta1``, ``beta2``, ``eps``,
        ``shuffle``, ``seed``), typed as Core ML types them and checked against the values the
        spec allows: ``epochs`` and ``mini_batch_size`` positive ints (epochs at most
        1,000,000), ``shuffle`` a bool, ``seed`` an int >= 0 (it seeds the shuffle), the
        others finite numbers (:data:`updatable.spec.LIMITS`).
      progress_handler: called with an :class:`UpdateContext` at ``training_begin``,
        ``mini_batch_end`` and ``epoch_end``; it may call :meth:`cancel`.  An exception raised
        by a handler ends the task: ``run`` raises :class:`UpdateError` with the handler's
        exception as ``__cause__``, and the source model is untouched.
      completion_handler: called once with the final context (event ``"completed"`` or
        ``"cancelled"``).
      progress_bar: show a tqdm bar per epoch with the loss (when tqdm is installed).
    """

    def __init__(self, model, training_data, *, parameters: dict | None = None,
                 progress_handler: Callable | None = None, completion_handler: Callable | None = None,
                 progress_bar: bool = False):
        self.source = model if isinstance(model, MLModel) else MLModel(model)
        self.progress_handler = progress_handler
        self.completion_handler = completion_handler
        spec = self.source.get_spec()
        if is_knn(spec):
            # Core ML updates a k-NN classifier by adding the samples: no epochs, no loss.
            self._knn = update_knn(self.source, training_data, parameters=parameters)
            self.parameters = dict(parameters or {})
            return
        self._knn = None
        self.uspec: UpdateSpec = read_update_spec(spec)
        self.parameters = self.uspec.resolve(parameters)
        self.progress_bar = progress_bar
        self.network = TrainableNetwork(self.source, self.uspec)
        self._cancelled = False
        self._data = self._prepare(training_data)
        self._trainable = self.network.trainable_weights()

    # --- data --------------------------------------------------------------------------
    def _prepare(self, training_data) -> tuple[dict, np.ndarray]:
        names = list(self.uspec.training_inputs)
        stacked = _stack_training_data(training_data, names)
        target_name = self._target_name()
        for n, v in stacked.items():
            if n != target_name and v.dtype.kind not in "biuf":
                raise UpdateError(f"training input {n!r}: expected numbers; found {v.dtype} values "
                                  f"such as {v.reshape(-1)[0]!r}")
        target = self._encode_target(stacked.pop(target_name), target_name)
        features = self.network.network_inputs(stacked)
        return features, target

    def _target_name(self) -> str:
        names = list(self.uspec.training_inputs)
        for candidate in (self.uspec.loss.target, self.uspec.predicted_feature):
            if candidate in names:
                return candidate
        raise UpdateError(f"training inputs {names} include no loss target "
                          f"({self.uspec.loss.target!r} or the predicted label)")

    def _encode_target(self, values: np.ndarray, name: str) -> np.ndarray:
        if self.uspec.loss.kind != "categorical_cross_entropy":
            if values.dtype.kind not in "biuf":
                raise UpdateError(f"target {name!r}: expected numbers; found {values.dtype} values")
            return values.astype(np.float32)
        labels = self.uspec.class_labels
        if labels is not None and name == self.uspec.predicted_feature:
            index = {lab: i for i, lab in enumerate(labels)}
            if values.ndim > 1 and values[0].size != 1:
                raise UpdateError(f"training labels {name!r}: expected one class label per sample; "
                                  f"found samples of shape {values.shape[1:]}")
            flat = values.reshape(-1)
            odd = [v for v in flat if not isinstance(v, (str, int, np.generic))]
            if odd:
                raise UpdateError(f"training labels {name!r}: expected class labels (str or int); "
                                  f"found {type(odd[0]).__name__} {odd[0]!r}")
            unknown = sorted({v.item() if hasattr(v, "item") else v for v in flat} - set(index))
            if unknown:
                raise UpdateError(f"training labels {unknown[:10]} are not classes of this model "
                                  f"(classes: {labels[:20]}{'...' if len(labels) > 20 else ''})")
            return np.array([index[v.item() if hasattr(v, "item") else v] for v in flat], np.int32)
        if values.dtype.kind not in "biuf" or (values.ndim > 1 and values[0].size != 1):
            raise UpdateError(f"target {name!r}: expected one class index per sample; found {values.dtype} "
                              f"samples of shape {values.shape[1:]}")
        idx = values.reshape(len(values), -1)[:, 0]
        n_classes = self.network.num_classes()
        if np.any(idx != np.round(idx)) or np.any(idx < 0) or (n_classes and np.any(idx >= n_classes)):
            raise UpdateError(f"target {name!r} must hold class indices in [0, {n_classes}); "
                              f"found values from {idx.min()} to {idx.max()}")
        return idx.astype(np.int32)

    # --- training ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop after the current mini-batch (call from a progress handler)."""
        self._cancelled = True

    def _loss_fn(self):
        loss = self.uspec.loss
        forward = self.network.forward

        def loss_of(trainable, frozen, features, target):
            blobs = forward(trainable, frozen, features, want=loss.input)
            if loss.kind == "mean_squared_error":
                return mean_squared_error(blobs["output"], target)
            if "logits" in blobs:
                return categorical_cross_entropy(blobs["logits"], target)
            return categorical_cross_entropy_from_probs(blobs["output"], target)

        return loss_of

    def _make_step(self, optimizer: optax.GradientTransformation):
        """The jitted training step, shared by every task on the same network with the same
        loss, updatable layers and optimizer settings (a second personalization skips compiling)."""
        loss_of = self._loss_fn()

        def make():
            @jax.jit
            def step(trainable, opt_state, frozen, features, target):
                loss, grads = jax.value_and_grad(loss_of)(trainable, frozen, features, target)
                updates, opt_state = optimizer.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), opt_state, loss
            return step

        return shared_fn(("update-step",) + self._step_key(), make)

    def _step_key(self) -> tuple:
        """What determines the training step's math: the network function, loss, updatable layers
        and optimizer settings (tasks with equal keys share compiled steps)."""
        net = self.network
        not_optimizer = ("epochs", "shuffle", "seed", "mini_batch_size")
        return (id(net.stage.fn), self.uspec.loss, net.logits_blob,
                tuple((k, tuple(v)) for k, v in sorted(net._keys.items())), self.uspec.optimizer,
                tuple(sorted((k, repr(v)) for k, v in self.parameters.items() if k not in not_optimizer)))

    def _emit(self, event: str, metrics: dict) -> None:
        if self.progress_handler is not None:
            _call_handler(self.progress_handler, UpdateContext(self, event, dict(metrics), dict(self.parameters)))

    def run(self) -> UpdateContext:
        """Train for the configured epochs; returns the final context with the updated model."""
        if self._knn is not None:
            final = UpdateContext(self, "completed", {}, dict(self.parameters), _model=self._knn)
            if self.completion_handler is not None:
                _call_handler(self.completion_handler, final)
            return final
        p = self.parameters
        features, target = self._data
        n = len(target)
        batch, n_batches = mini_batches(n, p["mini_batch_size"])
        optimizer = from_parameters(self.uspec.optimizer, p)
        trainable = self._trainable
        opt_state = optimizer.init(trainable)
        frozen = self.network.frozen_weights()
        step = self._make_step(optimizer)
        rng = np.random.default_rng(int(p["seed"]))
        metrics = {"loss": float("nan"), "epoch_index": 0, "mini_batch_index": 0}
        self._emit("training_begin", metrics)
        bar = _progress(int(p["epochs"]), self.progress_bar)
        for epoch in range(int(p["epochs"])):
            order = rng.permutation(n) if p["shuffle"] else np.arange(n)
            losses = []
            for b in range(n_batches):
                idx = order[b * batch:(b + 1) * batch]
                batch_feats = {k: v[idx] for k, v in features.items()}
                trainable, opt_state, loss = step(trainable, opt_state, frozen, batch_feats, target[idx])
                loss = float(loss)
                if not math.isfinite(loss):
                    raise UpdateError(f"the loss became {loss} at epoch {epoch}, mini-batch {b}; "
                                      f"the model is unchanged (try a smaller learning rate)")
                losses.append(loss)
                metrics = {"loss": loss, "epoch_index": epoch, "mini_batch_index": b}
                self._trainable = trainable
                self._emit("mini_batch_end", metrics)
                if self._cancelled:
                    break
            metrics = {"loss": float(np.mean(losses)), "epoch_index": epoch, "mini_batch_index": len(losses) - 1}
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                bar.update(1)
            if self._cancelled:
                break
            self._emit("epoch_end", metrics)
            if self._cancelled:   # cancelled from the epoch_end handler: stop before the next batch
                break
        if bar is not None:
            bar.close()
        final = UpdateContext(self, "cancelled" if self._cancelled else "completed", metrics, dict(p))
        if self.completion_handler is not None:
            _call_handler(self.completion_handler, final)
        return final

    def current_model(self) -> MLModel:
        """A new MLModel holding the weights trained so far (the source is untouched)."""
        return self.network.updated_model(self._trainable)


def _call_handler(handler, ctx: UpdateContext) -> None:
    """Run a user's handler; an exception in it ends the task as an :class:`UpdateError` whose
    ``__cause__`` is the handler's exception (the source model is never modified)."""
    try:
        handler(ctx)
    except MLJaxError:
        raise
    except Exception as e:   # noqa: BLE001 - the user's code may raise anything
        raise UpdateError(f"the {ctx.event} handler raised {type(e).__name__}: {e}; the task stopped "
                          f"and the model is unchanged") from e


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="update", unit="epoch")
