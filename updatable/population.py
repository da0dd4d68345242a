"""``personalize``: one UpdateTask per user, for a whole population, in one compiled step.

Every user gets exactly what :class:`~updatable.UpdateTask` gives on that user's data: the
parameters checked the same way, Core ML's loss and optimizer, the same epochs, and the same
mini-batches in the same order (a per-user NumPy generator seeded with ``seed``, drawing one
permutation per epoch when ``shuffle`` is on).  All users train together: one jitted step
vmapped over users and sharded over the devices (a ``users`` mesh axis), scanned over the
mini-batches of an epoch.

Ragged data is padded and masked.  Each user's data is padded to the longest user's; each
step gathers a user's mini-batch by index (``B`` slots, the largest mini-batch of any user)
and weighs its samples ``1/count`` (padding slots 0), so a short last mini-batch is averaged
over its own samples as UpdateTask does.  A user with fewer mini-batches per epoch than the
longest sits out the remaining steps: its weights and optimizer state (Adam's step count too)
are carried unchanged.  Users are padded to a multiple of the device count with copies of the
first user, whose results are dropped.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mljax import distribute
from mljax.errors import UpdateError
from mljax.model import MLModel
from mljax.stage import shared_fn
from updatable.knn import is_knn, update_knn
from updatable.optimizers import from_parameters
from updatable.task import UpdateContext, UpdateTask, _call_handler, _progress, mini_batches

__all__ = ["personalize", "Population"]


class _Member:
    """The ``task`` of one user's result context: its parameters and trained weights."""

    def __init__(self, network, parameters: dict, trainable: dict | None, model: MLModel | None = None):
        self.network, self.parameters, self._trainable, self._model = network, parameters, trainable, model

    def current_model(self) -> MLModel:
        """A new MLModel holding this user's trained weights (written into the spec, so it saves)."""
        if self._model is None:
            self._model = self.network.updated_model(self._trainable)
        return self._model


class Population:
    """The ``task`` a population's progress handler sees: ``cancel()`` stops after the epoch."""

    def __init__(self, size: int, parameters: dict):
        self.size, self.parameters, self._cancelled = size, parameters, False

    def cancel(self) -> None:
        self._cancelled = True

    def current_model(self) -> MLModel:
        raise UpdateError("a population has one model per user: use the contexts personalize() returns")


def personalize(model, datasets: Sequence, *, parameters: dict | None = None, devices=None,
                progress_handler: Callable | None = None, progress_bar: bool = False) -> list[UpdateContext]:
    """Personalize ``model`` for every user at once: one :class:`UpdateContext` per dataset.

    Args:
      model: a path, or an :class:`mljax.MLModel` (never modified).
      datasets: one training dataset per user, each as :class:`UpdateTask` takes it.
      parameters: update parameter overrides applied to every user (checked as UpdateTask checks
        them; ``seed`` seeds each user's shuffle, as it would that user's UpdateTask).
      devices: the devices to shard the users over (default: all devices of all processes).
      progress_handler: called with an :class:`UpdateContext` whose ``task`` is the
        :class:`Population` at ``training_begin`` and each ``epoch_end``; ``metrics`` hold
        ``epoch_index``, ``loss`` (the mean over users) and ``losses`` (one per user).  It may
        call ``ctx.task.cancel()`` to stop after that epoch.
      progress_bar: a tqdm bar over epochs.

    Returns:
      One context per dataset, in order, each ``completed`` (or ``cancelled``) with the metrics
      its UpdateTask would report and a ``model`` that predicts and saves like any updated model.
    """
    source = model if isinstance(model, MLModel) else MLModel(model)
    if isinstance(datasets, (dict, str, bytes)) or not isinstance(datasets, Sequence):
        raise UpdateError(f"datasets: expected a list with one training dataset per user; "
                          f"found {type(datasets).__name__}")
    if not datasets:
        raise UpdateError("datasets is empty: expected one training dataset per user")
    if is_knn(source.get_spec()):
        contexts = []
        for data in datasets:
            updated = update_knn(source, data, parameters=parameters)
            contexts.append(UpdateContext(_Member(None, dict(parameters or {}), None, updated), "completed",
                                          {}, dict(parameters or {}), _model=updated))
        return contexts
    template, users = None, []
    for i, data in enumerate(datasets):
        try:   # each user's data checked and encoded as its UpdateTask would (frozen features too)
            if template is None:
                template = UpdateTask(source, data, parameters=parameters)
                users.append(template._data)
            else:
                users.append(template._prepare(data))
        except UpdateError as e:
            raise UpdateError(f"user {i}: {e}") from None
    return _train(template, users, devices, progress_handler, progress_bar)


# --- the schedule: which samples each user's step s reads ---------------------------------
def _schedule(sizes: list[int], p: dict, epochs: int):
    """Per epoch: sample indices ``[steps, users, B]``, weights ``[steps, users, B]`` (1/count or
    0) and ``active [steps, users]``, exactly UpdateTask's mini-batches for each user."""
    batches, n_batches = zip(*(mini_batches(n, p["mini_batch_size"]) for n in sizes))
    steps, width = max(n_batches), max(batches)
    rngs = [np.random.default_rng(int(p["seed"])) for _ in sizes]
    for _ in range(epochs):
        idx = np.zeros((steps, len(sizes), width), np.int32)
        weight = np.zeros((steps, len(sizes), width), np.float32)
        active = np.zeros((steps, len(sizes)), bool)
        for u, (n, b) in enumerate(zip(sizes, batches)):
            order = rngs[u].permutation(n) if p["shuffle"] else np.arange(n)
            for s in range(n_batches[u]):
                rows = order[s * b:(s + 1) * b]
                idx[s, u, :len(rows)] = rows
                weight[s, u, :len(rows)] = 1.0 / len(rows)
                active[s, u] = True
        yield idx, weight, active


def _padded(users: list[tuple[dict, np.ndarray]], n_users: int):
    """Features ``{name: [users, N, ...]}`` and targets ``[users, N]``, zero padded."""
    longest = max(len(t) for _, t in users)
    def pad(x):
        out = np.zeros((longest,) + x.shape[1:], x.dtype)
        out[:len(x)] = x
        return out
    rows = users + [users[0]] * (n_users - len(users))
    feats = {k: np.stack([pad(np.asarray(f[k])) for f, _ in rows]) for k in users[0][0]}
    return feats, np.stack([pad(t) for _, t in rows])


def _epoch_fn(task: UpdateTask, optimizer, key):
    """The jitted epoch: a scan over steps of the user-vmapped training step."""
    loss_of = task._loss_fn()

    def make():
        def sample_losses(trainable, frozen, feats, target, weight):
            per = jax.vmap(lambda f, t: loss_of(trainable, frozen, jax.tree_util.tree_map(lambda v: v[None], f),
                                                t[None]))(feats, target)
            return jnp.sum(per * weight)

        def user_step(trainable, opt_state, frozen, feats, target, idx, weight, active):
            batch = jax.tree_util.tree_map(lambda v: v[idx], feats)
            loss, grads = jax.value_and_grad(sample_losses)(trainable, frozen, batch, target[idx], weight)
            updates, new_state = optimizer.update(grads, opt_state, trainable)
            new = optax.apply_updates(trainable, updates)
            keep = lambda a, b: jnp.where(active, a, b)   # noqa: E731 - inactive users stand still
            return (jax.tree_util.tree_map(keep, new, trainable),
                    jax.tree_util.tree_map(keep, new_state, opt_state), loss)

        users_step = jax.vmap(user_step, in_axes=(0, 0, None, 0, 0, 0, 0, 0))

        @jax.jit
        def epoch(trainable, opt_state, frozen, feats, target, idx, weight, active):
            def body(carry, xs):
                t, o = carry
                t, o, loss = users_step(t, o, frozen, feats, target, *xs)
                return (t, o), loss
            (trainable, opt_state), losses = jax.lax.scan(body, (trainable, opt_state), (idx, weight, active))
            return trainable, opt_state, losses
        return epoch

    return shared_fn(("population-epoch",) + key, make)


def _place(task: UpdateTask, users: list, n_users: int, m, optimizer) -> dict:
    """The population's arrays on the mesh (``n_users``: users padded to a multiple of the devices):
    per-user ones split over ``users``, frozen weights replicated; every user starts from the
    source's trainable weights."""
    by_user, replicated = NamedSharding(m, P("users")), NamedSharding(m, P())
    place = lambda tree, s: jax.tree_util.tree_map(lambda x: distribute.global_array(x, s), tree)  # noqa: E731
    feats, target = _padded(users, n_users)
    start = jax.device_get(task.network.trainable_weights())
    stacked = {k: np.broadcast_to(np.asarray(v), (n_users,) + np.shape(v)) for k, v in start.items()}
    return {"trainable": place(stacked, by_user),
            "opt_state": place(jax.device_get(jax.vmap(optimizer.init)(stacked)), by_user),
            "frozen": place(jax.device_get(task.network.frozen_weights()), replicated),
            "feats": place(feats, by_user), "target": distribute.global_array(target, by_user)}


def _train(task: UpdateTask, users: list, devices, handler, progress_bar) -> list[UpdateContext]:
    p = task.parameters
    epochs, sizes = int(p["epochs"]), [len(t) for _, t in users]
    m = distribute.mesh(devices, "users")
    n_dev = m.devices.size
    n_users = distribute.round_up(len(users), n_dev)
    by_step = NamedSharding(m, P(None, "users"))
    optimizer = from_parameters(task.uspec.optimizer, p)
    arrays = _place(task, users, n_users, m, optimizer)
    trainable, opt_state = arrays["trainable"], arrays["opt_state"]
    frozen, feats, target = arrays["frozen"], arrays["feats"], arrays["target"]
    epoch_fn = _epoch_fn(task, optimizer, task._step_key() + (n_dev,))
    population = Population(len(users), dict(p))
    begin = {"loss": float("nan"), "epoch_index": 0, "losses": np.full(len(users), np.nan)}
    if handler is not None:
        _call_handler(handler, UpdateContext(population, "training_begin", begin, dict(p)))
    bar = _progress(epochs, progress_bar)
    n_batches = [mini_batches(n, p["mini_batch_size"])[1] for n in sizes]
    last = np.full(len(users), np.nan)
    for e, (idx, weight, active) in enumerate(_schedule(sizes + [sizes[0]] * (n_users - len(users)), p, epochs)):
        new_t, new_o, losses = epoch_fn(trainable, opt_state, frozen, feats, target,
                                        distribute.global_array(idx, by_step),
                                        distribute.global_array(weight, by_step),
                                        distribute.global_array(active, by_step))
        losses = distribute.to_host(losses)[:, :len(users)]
        mask = active[:, :len(users)]
        bad = sorted({int(u) for s, u in zip(*np.nonzero(mask & ~np.isfinite(losses)))})
        if bad:
            raise UpdateError(f"the loss became non-finite at epoch {e} for users {bad[:20]}; the model is "
                              f"unchanged (try a smaller learning rate)")
        trainable, opt_state = new_t, new_o
        last = np.array([losses[:n_batches[u], u].astype(np.float64).mean() for u in range(len(users))])
        if bar is not None:
            bar.set_postfix(loss=f"{last.mean():.4f}")
            bar.update(1)
        if handler is not None:
            metrics = {"loss": float(last.mean()), "epoch_index": e, "losses": last.copy()}
            _call_handler(handler, UpdateContext(population, "epoch_end", metrics, dict(p)))
        if population._cancelled:
            break
    if bar is not None:
        bar.close()
    final = {k: distribute.to_host(v) for k, v in trainable.items()}
    event = "cancelled" if population._cancelled else "completed"
    return [UpdateContext(_Member(task.network, dict(p), {k: v[u] for k, v in final.items()}), event,
                          {"loss": float(last[u]), "epoch_index": e, "mini_batch_index": n_batches[u] - 1},
                          dict(p)) for u in range(len(users))]
