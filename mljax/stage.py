"""Stages: every model type becomes a weights pytree plus a pure function.

``fn(weights, features, states) -> (features, states)`` maps input arrays by name to
output arrays by name.  Host-side ``preprocess``/``postprocess`` turn user values
(images, strings, dicts, class labels) into arrays and back, outside of JAX.
Builders are registered per ``Model.Type`` oneof name.
"""
from __future__ import annotations

import importlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from mljax.errors import UnsupportedError
from mljax.features import FeatureSpec

__all__ = ["ClassLabels", "Stage", "register_stage_builder", "build_stage", "shared_fn", "batch_preparer",
           "PREPARED"]

#: the key of a weights pytree under which a stage's ``prepare(weights)`` values are passed back
#: to its ``fn`` (re-laid-out weights, computed once per weight values by ``MLModel``'s predict)
PREPARED = "mljax:prepared"


@dataclass(frozen=True)
class ClassLabels:
    """A classifier's labels, in probability order, and the names of its two outputs."""

    labels: list                          # int or str class labels
    label_name: str | None                # the predicted-label output
    probability_name: str | None = None   # the {label: probability} output


@dataclass
class Stage:
    fn: Callable                          # (weights, inputs, states) -> (outputs, states)
    weights: dict                         # pytree of arrays
    inputs: dict[str, FeatureSpec]        # what fn takes, after preprocess
    outputs: dict[str, FeatureSpec]       # what postprocess returns
    states: dict[str, FeatureSpec] = field(default_factory=dict)
    preprocess: Callable[[dict], dict] | None = None    # user features -> arrays (host)
    postprocess: Callable[[dict], dict] | None = None   # arrays -> user features (host)
    batchable: bool = True                # fn may be vmapped over a leading batch axis
    static_inputs: tuple = ()             # inputs fn needs concrete (jit once per their value)
    classes: ClassLabels | None = None    # classifiers of every model type
    # ML programs
    program: Any = None                   # mljax.mil.ir.Program as loaded (what save writes)
    function: str | None = None           # the function that runs
    lowered: Any = None                   # mljax.lower.LoweredFunction (the optimized copy it runs)
    # weights -> values fn also accepts precomputed, as weights[PREPARED] (re-laid-out
    # weights: computed once per weight values by MLModel's predict; fn computes them otherwise)
    prepare: Callable[[dict], dict] | None = None
    # (weights, n) -> further prepared values a list predict of n samples uses (Winograd
    # transforms of the variants its folded batch picks); added to prepare's by MLModel
    prepare_batch: Callable[[dict, int], dict] | None = None
    fp16_in_graph: bool = False           # fn rounds float32 values of float16 inputs itself
    # vmap(fn) over inputs' leading axis, by a schedule of its own (LoweredFunction.map_batch)
    map_batch: Callable | None = None
    # NeuralNetwork models
    network: Any = None                   # mljax.neuralnetwork.network.Network (layers, weights)
    rank5: bool = False                   # the network runs in the legacy [Seq, Batch, C, H, W] layout
    # pipelines
    children: dict[str, "Stage"] = field(default_factory=dict)   # the stages, by name, in order
    # per-call inputs (mljax.model): a fresh random key, run-time checks
    call_key: bool = False                # fn takes CALL_KEY_INPUT, a fresh key per call
    per_call: bool = False                # call key and checks already wrapped around fn
    x64: bool = False                     # fn computes in float64: run it under jax.enable_x64
    fn_key: Hashable | None = None        # fn is shared_fn(fn_key, ...): equal keys, same function
    digest: bytes | None = None           # fully determines fn given argument shapes (mljax.cache)


def batch_preparer(prepare_batch: Callable[[dict, int], dict], needed: Callable[[int], Any]):
    """``Stage.prepare_batch`` from ``prepare_batch(weights, n)``: jitted once per batch size, and
    not called where ``needed(n)`` is empty (a batch that picks one sample's variants)."""
    import jax
    jitted = jax.jit(prepare_batch, static_argnums=1)

    def run(weights, n):
        return jitted(weights, n) if needed(n) else {}
    return run


_SHARED: OrderedDict = OrderedDict()
_SHARED_MAX = 256
_SHARED_LOCK = threading.Lock()


def shared_fn(key: Hashable, make: Callable[[], Callable]) -> Callable:
    """The one function object for ``key`` (``make()`` on first use; the 256 latest are kept).

    JAX's jit caches traces and compiled code by function identity, so stages whose
    functions are fully determined by a hashable key (weights being arguments) share
    compiled code across models of the same structure and shapes.
    """
    with _SHARED_LOCK:
        fn = _SHARED.get(key)
        if fn is None:
            fn = _SHARED[key] = make()
            if len(_SHARED) > _SHARED_MAX:
                _SHARED.popitem(last=False)
        else:
            _SHARED.move_to_end(key)
        return fn


_BUILDERS: dict[str, Callable[..., Stage]] = {}
# The module that registers each model type's builder, imported on first use.
_BUILDER_MODULES = {
    "mlProgram": "mljax.mlprogram",
    "neuralNetwork": "mljax.neuralnetwork", "neuralNetworkClassifier": "mljax.neuralnetwork",
    "neuralNetworkRegressor": "mljax.neuralnetwork",
    "pipeline": "mljax.pipeline", "pipelineClassifier": "mljax.pipeline", "pipelineRegressor": "mljax.pipeline",
}
_CLASSIC_MODULE = "mljax.classic"


def register_stage_builder(*kinds: str):
    """Decorator: ``builder(spec, model_dir, **options) -> Stage`` for ``Model.Type`` kinds."""
    def deco(fn):
        for kind in kinds:
            if kind in _BUILDERS:
                raise RuntimeError(f"stage builder for {kind!r} registered twice")
            _BUILDERS[kind] = fn
        return fn
    return deco


def _load_builder(kind: str) -> None:
    name = _BUILDER_MODULES.get(kind, _CLASSIC_MODULE)
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise


def build_stage(spec, model_dir, **options) -> Stage:
    """The stage for any Core ML model spec."""
    kind = spec.WhichOneof("Type")
    if kind not in _BUILDERS:
        _load_builder(kind)
    if kind not in _BUILDERS:
        raise UnsupportedError(f"Core ML model type {kind!r} is not supported; supported: {sorted(_BUILDERS)}")
    return _BUILDERS[kind](spec, model_dir, **options)
