"""The update description of an updatable Core ML model, read from its spec.

Updatable model types: NeuralNetwork(Classifier|Regressor) and pipelines whose last stage
is one (the pipeline itself marked updatable).  Trainable layers are innerProduct and
convolution layers marked ``isUpdatable``; the loss is categorical cross-entropy (input: a
softmax output; target: a class index) or mean squared error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mljax.errors import UpdateError
from mljax.pipeline import pipeline_of, stage_names

__all__ = ["Param", "LossSpec", "UpdateSpec", "read_update_spec", "PARAMETER_KEYS"]

_NN_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")
_PIPE_KINDS = ("pipeline", "pipelineClassifier", "pipelineRegressor")

#: mljax parameter keys -> Core ML's MLParameterKey names.
PARAMETER_KEYS = {"learning_rate": "learningRate", "mini_batch_size": "miniBatchSize",
                  "momentum": "momentum", "beta1": "beta1", "beta2": "beta2", "eps": "eps",
                  "epochs": "epochs", "shuffle": "shuffle", "seed": "seed"}


@dataclass(frozen=True)
class Param:
    """One update parameter: its default and what values the spec allows."""

    name: str
    default: Any
    kind: str                      # "double", "int", "bool"
    min: float | None = None
    max: float | None = None
    allowed: tuple | None = None   # a set of allowed values

    def check(self, value):
        """``value`` as the parameter's kind, or UpdateError if it is not of that kind or the spec
        (or :data:`LIMITS`) forbids it.  Types are Core ML's: an int is an integer (not 10.5, not
        "10", not True), a double a finite real number, a bool a bool (not "no", not 0)."""
        value = _typed(self.name, self.kind, value)
        lo, hi = LIMITS.get(self.name, (None, None))
        if lo is not None and value < lo or hi is not None and value > hi:
            raise UpdateError(f"parameter {self.name!r}: expected a value in [{lo}, {hi}]; found {value}")
        if self.allowed is not None and value not in self.allowed:
            raise UpdateError(f"parameter {self.name!r}: the model allows {sorted(self.allowed)}; found {value}")
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            raise UpdateError(f"parameter {self.name!r}: the model allows [{self.min}, {self.max}]; found {value}")
        return value


#: Bounds every model shares, beyond the ranges a spec states: epochs and mini-batch sizes are
#: positive; ``seed`` seeds NumPy's generator, which takes a non-negative integer (Core ML
#: documents no meaning for a negative seed); more than a million epochs is refused as a mistake.
LIMITS = {"epochs": (1, 1_000_000), "mini_batch_size": (1, None), "seed": (0, 2**63 - 1),
          "learning_rate": (0.0, None), "momentum": (0.0, None), "eps": (0.0, None)}


def _typed(name: str, kind: str, value):
    import numbers

    import numpy as np
    found = f"found {value!r} ({type(value).__name__})"
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise UpdateError(f"parameter {name!r}: expected a bool (True or False); {found}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise UpdateError(f"parameter {name!r}: expected {'an int' if kind == 'int' else 'a number'}; {found}")
    if kind == "int":
        if not isinstance(value, numbers.Integral):
            raise UpdateError(f"parameter {name!r}: expected an int; {found}")
        return int(value)
    value = float(value)
    if not np.isfinite(value):
        raise UpdateError(f"parameter {name!r}: expected a finite number; {found}")
    return value


def _param(name: str, pb, kind: str) -> Param | None:
    if pb is None:
        return None
    if kind == "bool":
        return Param(name, bool(pb.defaultValue), "bool")
    which = pb.WhichOneof("AllowedValues")
    conv = float if kind == "double" else int
    if which == "range":
        lo, hi = pb.range.minValue, pb.range.maxValue
        return Param(name, conv(pb.defaultValue), kind, conv(lo), conv(hi) if hi or lo else None)
    if which == "set":
        return Param(name, conv(pb.defaultValue), kind, allowed=tuple(conv(v) for v in pb.set.values))
    return Param(name, conv(pb.defaultValue), kind)


@dataclass(frozen=True)
class LossSpec:
    name: str
    kind: str          # "categorical_cross_entropy" or "mean_squared_error"
    input: str         # the network blob the loss reads (a softmax output for cross-entropy)
    target: str        # the target feature name in the loss layer


@dataclass
class UpdateSpec:
    """Everything an update needs to know, as the spec states it."""

    nn_path: tuple[str, ...]           # stage names from the top model down to the network ("" = top)
    nn_kind: str
    updatable_layers: list[str]
    loss: LossSpec
    optimizer: str                     # "sgd" or "adam"
    params: dict[str, Param]
    training_inputs: dict[str, Any]    # name -> FeatureDescription
    class_labels: list | None          # for classifiers: the label <-> index map
    predicted_feature: str | None
    layer_types: dict[str, str] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items()}

    def resolve(self, overrides: dict | None) -> dict[str, Any]:
        """The spec's defaults with the user's overrides, each checked against the allowed values."""
        values = self.defaults()
        if overrides is not None and not isinstance(overrides, dict):
            raise UpdateError(f"parameters: expected a dict of parameter name -> value; found "
                              f"{type(overrides).__name__}")
        for key, value in (overrides or {}).items():
            if key not in PARAMETER_KEYS:
                raise UpdateError(f"unknown update parameter {key!r}; expected one of {sorted(PARAMETER_KEYS)}")
            if key not in self.params:
                raise UpdateError(f"parameter {key!r} does not apply to this model's {self.optimizer} optimizer")
            values[key] = self.params[key].check(value)
        return values


def _find_nn(spec, path=()):
    """(path of stage names, nn spec message, nn kind) of the updatable network."""
    kind = spec.WhichOneof("Type")
    if kind in _NN_KINDS:
        return path, spec, kind
    if kind in _PIPE_KINDS:
        pipe = pipeline_of(spec)
        if not len(pipe.models):
            raise UpdateError("the pipeline has no stages")
        last = pipe.models[len(pipe.models) - 1]
        for i, m in enumerate(pipe.models[:-1]):
            if m.isUpdatable:
                raise UpdateError(f"pipeline stage {i} is marked updatable, but Core ML updates only "
                                  f"the last stage of a pipeline")
        return _find_nn(last, path + (stage_names(pipe)[-1],))
    raise UpdateError(f"model type {kind!r} is not an updatable neural network or pipeline "
                      f"(k-nearest-neighbors classifiers update with updatable.knn)")


def read_update_spec(spec) -> UpdateSpec:
    """Read the update description; UpdateError when the model is not updatable."""
    if not spec.isUpdatable:
        raise UpdateError("the model is not marked updatable (Model.isUpdatable is false)")
    path, model, kind = _find_nn(spec)
    if not model.isUpdatable:
        raise UpdateError(f"the network stage {'/'.join(path) or 'model'} is not marked updatable")
    nn = getattr(model, kind)
    layers = [l.name for l in nn.layers if l.isUpdatable]
    bad = [l.name for l in nn.layers if l.isUpdatable and l.WhichOneof("layer") not in ("innerProduct", "convolution")]
    if bad:
        raise UpdateError(f"layers {bad} are marked updatable; Core ML updates only innerProduct and convolution layers")
    if not layers:
        raise UpdateError("no layer of the network is marked updatable")
    up = nn.updateParams
    if len(up.lossLayers) != 1:
        raise UpdateError(f"expected exactly one loss layer; found {len(up.lossLayers)}")
    ll = up.lossLayers[0]
    which = ll.WhichOneof("LossLayerType")
    if which == "categoricalCrossEntropyLossLayer":
        l = ll.categoricalCrossEntropyLossLayer
        loss = LossSpec(ll.name, "categorical_cross_entropy", l.input, l.target)
    elif which == "meanSquaredErrorLossLayer":
        l = ll.meanSquaredErrorLossLayer
        loss = LossSpec(ll.name, "mean_squared_error", l.input, l.target)
    else:
        raise UpdateError(f"loss layer {ll.name!r} has no loss type")
    opt = up.optimizer.WhichOneof("OptimizerType")
    params: dict[str, Param] = {}
    if opt == "sgdOptimizer":
        o = up.optimizer.sgdOptimizer
        params.update(learning_rate=_param("learning_rate", o.learningRate, "double"),
                      mini_batch_size=_param("mini_batch_size", o.miniBatchSize, "int"),
                      momentum=_param("momentum", o.momentum, "double"))
    elif opt == "adamOptimizer":
        o = up.optimizer.adamOptimizer
        params.update(learning_rate=_param("learning_rate", o.learningRate, "double"),
                      mini_batch_size=_param("mini_batch_size", o.miniBatchSize, "int"),
                      beta1=_param("beta1", o.beta1, "double"), beta2=_param("beta2", o.beta2, "double"),
                      eps=_param("eps", o.eps, "double"))
    else:
        raise UpdateError("the network's updateParams name no optimizer (expected SGD or Adam)")
    params["epochs"] = _param("epochs", up.epochs, "int")
    params["shuffle"] = _param("shuffle", up.shuffle, "bool") if up.HasField("shuffle") else \
        Param("shuffle", True, "bool")
    params["seed"] = _param("seed", up.seed, "int") if up.HasField("seed") else Param("seed", 0, "int")
    if params["mini_batch_size"].default <= 0:
        params["mini_batch_size"] = Param("mini_batch_size", 1, "int")
    labels = None
    if kind == "neuralNetworkClassifier":
        which_labels = nn.WhichOneof("ClassLabels")
        labels = list(getattr(nn, which_labels).vector) if which_labels else None
    desc = spec.description
    return UpdateSpec(
        nn_path=path, nn_kind=kind, updatable_layers=layers, loss=loss, optimizer=opt[:-len("Optimizer")],
        params=params, training_inputs={f.name: f for f in desc.trainingInput},
        class_labels=labels,
        predicted_feature=desc.predictedFeatureName or model.description.predictedFeatureName or None,
        layer_types={l.name: l.WhichOneof("layer") for l in nn.layers},
    )
