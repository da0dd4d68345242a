"""Helpers shared by the activation, elementwise, reduction, normalization and linear families."""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from mljax.errors import OpError

__all__ = ["like", "channel_param", "normalize_axes", "normalize_axis", "jax_dtype_of"]


def like(value: Any, x) -> Any:
    """``value`` (a MIL parameter) in ``x``'s dtype, so fp16 inputs compute in fp16.

    From iOS17 many ops let parameters (alpha, epsilon, gamma, ...) have a dtype other than
    ``x``'s; the output keeps ``x``'s dtype, so casting the parameter is the uniform rule.
    Python scalars are returned as they are (JAX treats them as weakly typed).
    """
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return jnp.asarray(value).astype(jnp.result_type(x))


def channel_param(param, x, axis: int = 1, name: str = "param"):
    """A per-channel vector ``[C]`` cast to ``x``'s dtype and shaped to broadcast along ``axis``.

    A scalar (or one-element vector) broadcasts to every channel.
    """
    if param is None:
        return None
    p = like(param, x)
    p = jnp.asarray(p)
    rank = jnp.ndim(x)
    axis = axis % rank
    if p.size == 1:
        return p.reshape(())
    if p.ndim != 1 or p.shape[0] != jnp.shape(x)[axis]:
        raise OpError(f"{name} must be a vector of length {jnp.shape(x)[axis]} (the size of x's "
                      f"axis {axis}); found shape {tuple(p.shape)}")
    shape = [1] * rank
    shape[axis] = p.shape[0]
    return p.reshape(shape)


def normalize_axis(axis: int, rank: int, name: str = "axis") -> int:
    """A possibly negative axis as a non-negative int, checked against ``rank``."""
    axis = int(axis)
    if not -rank <= axis < max(rank, 1):
        raise OpError(f"{name} must be in [{-rank}, {rank - 1}] for a rank-{rank} input; found {axis}")
    return axis % rank if rank else 0


def normalize_axes(axes: Iterable[int] | int | None, rank: int, name: str = "axes"):
    """MIL ``axes`` (None = all) as a sorted tuple of distinct non-negative ints."""
    if axes is None:
        return tuple(range(rank))
    flat = np.asarray(axes).reshape(-1).tolist()
    out = sorted({normalize_axis(a, rank, name) for a in flat})
    return tuple(out)


def jax_dtype_of(dtype) -> np.dtype:
    """The dtype JAX holds values of NumPy dtype ``dtype`` in (int64 -> int32 without x64)."""
    return jax.dtypes.canonicalize_dtype(np.dtype(dtype))
