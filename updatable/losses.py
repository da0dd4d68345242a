"""Core ML's loss layers as pure functions (averaged over the mini-batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["categorical_cross_entropy", "categorical_cross_entropy_from_probs", "mean_squared_error"]


def categorical_cross_entropy(logits, target):
    """Mean of ``-log softmax(logits)[target]`` over the batch.

    Computed from the softmax *input* with log-softmax, so it stays finite and exact when
    the softmax itself underflows to zeros (a confident head meeting a new class).

    Args:
      logits: ``[batch, classes]`` (extra singleton axes are flattened away).
      target: ``[batch]`` integer class indices.
    """
    logits = logits.reshape(logits.shape[0], -1)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, target.reshape(-1, 1).astype(jnp.int32), axis=-1)
    return -jnp.mean(picked)


def categorical_cross_entropy_from_probs(probs, target):
    """Cross-entropy when only probabilities exist (no softmax input to start from).

    Zeros are floored at the smallest normal float, so the loss stays finite.
    """
    probs = probs.reshape(probs.shape[0], -1).astype(jnp.float32)
    picked = jnp.take_along_axis(probs, target.reshape(-1, 1).astype(jnp.int32), axis=-1)
    return -jnp.mean(jnp.log(jnp.maximum(picked, jnp.finfo(jnp.float32).tiny)))


def mean_squared_error(prediction, target):
    """Mean over the batch and elements of ``(prediction - target)**2``."""
    diff = prediction.astype(jnp.float32) - target.reshape(prediction.shape).astype(jnp.float32)
    return jnp.mean(diff * diff)
