"""Core ML's optimizers as optax transformations, with Core ML's update rules.

SGD:  ``v <- momentum * v + g;  w <- w - lr * v``  (plain SGD when momentum is 0).
Adam: ``m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  w <- w - lr * m_hat / (sqrt(v_hat) + eps)``
with bias-corrected ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``.
"""
from __future__ import annotations

import optax

__all__ = ["sgd", "adam", "from_parameters"]


def sgd(learning_rate: float, momentum: float = 0.0) -> optax.GradientTransformation:
    return optax.sgd(learning_rate, momentum=momentum or None)


def adam(learning_rate: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
    return optax.adam(learning_rate, b1=beta1, b2=beta2, eps=eps)


def from_parameters(kind: str, params: dict) -> optax.GradientTransformation:
    """The optax transformation for a spec's optimizer kind and resolved parameter values."""
    if kind == "sgd":
        return sgd(params["learning_rate"], params.get("momentum", 0.0))
    return adam(params["learning_rate"], params["beta1"], params["beta2"], params["eps"])
