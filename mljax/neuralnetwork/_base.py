"""The layer registry of NeuralNetwork models and helpers shared by the layer modules.

A layer implementation is ``fn(p, w, xs, ctx) -> array | tuple`` where ``p`` is the
layer's params message (e.g. ``InnerProductLayerParams``), ``w`` its weights
(``{param: array}``, from the stage's weights pytree), ``xs`` the input arrays and
``ctx`` a :class:`LayerContext`.  ``weights(p, layer) -> {param: ndarray | None}``
decodes the layer's WeightParams once, when the stage is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from mljax.errors import OpError

__all__ = ["LayerImpl", "LayerContext", "layer", "lookup_layer", "layer_kinds", "fail",
           "static_value", "xp", "as_rank5", "from_rank5", "flat_lead"]


@dataclass(frozen=True)
class LayerImpl:
    kind: str
    fn: Callable
    weights: Callable | None = None
    static_weights: bool = False       # small constants stay NumPy values (usable as shapes)


@dataclass
class LayerContext:
    """What a layer may need besides its params, weights and inputs."""

    name: str
    kind: str
    layer: Any                         # the NeuralNetworkLayer message
    rank5: bool                        # the network runs in the legacy [Seq, Batch, C, H, W] layout
    env: dict = field(default_factory=dict)       # blob name -> value (for control flow)
    run: Callable | None = None        # run(network_message, env, weights) -> env (nested networks)
    weights: dict = field(default_factory=dict)   # the whole weights pytree (nested networks)
    after_costly_op: bool = False      # the first input comes from a costly activation (conv's hint)
    # channel-last regions (mljax.neuralnetwork.network): the layer's rank-4 inputs and outputs
    # are [N, H, W, C]; ``first_in``: a convolution reads its input channel-first nonetheless;
    # ``weight_hwio``: its depthwise or 1x1 weight is laid out HWIO [kh, kw, C_in/groups, C_out]; ``pool_by_product``: a
    # global average pool read outside the region
    channels_last: bool = False
    first_in: bool = False
    weight_hwio: bool = False
    pool_by_product: bool = False
    # a 1x1 convolution reading a region's ``x * gate``: the multiply's two input blobs, passed
    # (channel-last) after its own input; it may run as one product by per-image weights
    scaled_by: tuple = ()
    # a convolution's Winograd weight transform, computed once per weight values (Network.plan_winograd)
    winograd_u: Any = None


_LAYERS: dict[str, LayerImpl] = {}


def layer(*kinds: str, weights: Callable | None = None, static_weights: bool = False):
    """Decorator: register ``fn`` for the ``NeuralNetworkLayer.layer`` oneof names ``kinds``."""
    def deco(fn):
        for kind in kinds:
            if kind in _LAYERS:
                raise RuntimeError(f"NeuralNetwork layer {kind!r} registered twice")
            _LAYERS[kind] = LayerImpl(kind, fn, weights, static_weights)
        return fn
    return deco


def lookup_layer(kind: str) -> LayerImpl | None:
    return _LAYERS.get(kind)


def layer_kinds() -> list[str]:
    return sorted(_LAYERS)


def fail(ctx: LayerContext, message: str):
    """Raise an OpError naming the layer."""
    raise OpError(f"NeuralNetwork layer {ctx.name!r} ({ctx.kind}): {message}")


def static_value(x, ctx: LayerContext, what: str) -> np.ndarray:
    """The value of ``x`` as NumPy, or an OpError when it is only known at run time."""
    if isinstance(x, (np.ndarray, np.generic, int, float, list, tuple)):
        return np.asarray(x)
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 - a tracer: the value is dynamic
        fail(ctx, f"{what} must be known before running (a constant or a shape); found a computed tensor")


def xp(*values):
    """NumPy when every value is a NumPy constant (so shapes stay static), else jax.numpy."""
    return np if all(isinstance(v, (np.ndarray, np.generic, int, float)) for v in values) else jnp


def as_rank5(x):
    """Prefix ones so that ``x`` has rank 5 (legacy layers on rank-N inputs)."""
    return x.reshape((1,) * (5 - x.ndim) + tuple(x.shape)) if x.ndim < 5 else x


def from_rank5(y, ndim: int):
    """Undo :func:`as_rank5` when the prefixed dimensions are still ones."""
    extra = y.ndim - ndim
    if extra > 0 and all(d == 1 for d in y.shape[:extra]):
        return y.reshape(y.shape[extra:])
    return y


def flat_lead(x, keep: int):
    """Reshape to ``(-1,) + last keep dims``; returns the array and the leading shape."""
    lead = tuple(x.shape[: x.ndim - keep])
    return x.reshape((int(np.prod(lead, dtype=np.int64)),) + tuple(x.shape[x.ndim - keep:])), lead
