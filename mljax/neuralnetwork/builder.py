"""The NeuralNetwork / NeuralNetworkClassifier / NeuralNetworkRegressor stage."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mljax import schedule
from mljax.errors import ModelFormatError
from mljax.features import feature_specs
from mljax.neuralnetwork import images
from mljax.neuralnetwork.layers_nd import RANDOM_LAYERS
from mljax.neuralnetwork.network import Network, map_array_input, map_output, walk_layers
from mljax.ops.random import with_call_key
from mljax.stage import ClassLabels, Stage, batch_preparer, register_stage_builder

__all__ = ["build_neuralnetwork_stage", "network_function"]

_KINDS = ("neuralNetwork", "neuralNetworkClassifier", "neuralNetworkRegressor")


def _nn_of(spec):
    kind = spec.WhichOneof("Type")
    if kind not in _KINDS:
        raise ModelFormatError(f"expected a NeuralNetwork model ({', '.join(_KINDS)}); found {kind!r}")
    return kind, getattr(spec, kind)


def _class_labels(nn) -> list | None:
    which = nn.WhichOneof("ClassLabels")
    if which == "stringClassLabels":
        return list(nn.stringClassLabels.vector)
    if which == "int64ClassLabels":
        return [int(v) for v in nn.int64ClassLabels.vector]
    return None


class _Plan:
    """What the jitted function does around the network: input mappings and output selection."""

    def __init__(self, spec, nn, kind: str):
        self.network = Network(nn, rank5=nn.arrayInputShapeMapping == 0)
        self.rank5 = self.network.rank5
        self.image_rank5 = nn.imageInputShapeMapping == 0
        self.inputs = feature_specs(spec.description.input)
        self.outputs = feature_specs(spec.description.output)
        n_images = sum(s.kind == "image" for s in self.inputs.values())
        self.pre = {n: images.image_preprocessing(nn, n, s.color_space, n_images)
                    for n, s in self.inputs.items() if s.kind == "image"}
        self.labels = _class_labels(nn) if kind == "neuralNetworkClassifier" else None
        desc = spec.description
        self.label_name = desc.predictedFeatureName if self.labels is not None else ""
        self.probs_name = desc.predictedProbabilitiesName if self.labels is not None else ""
        self.prob_blob = self._probability_blob(nn) if self.labels is not None else ""
        for name in self.outputs:
            if name not in (self.label_name, self.probs_name) and name not in self.network.blobs \
                    and name not in self.inputs:
                raise ModelFormatError(f"output {name!r} is produced by no NeuralNetwork layer")
        self._plan_winograd()

    def _plan_winograd(self) -> None:
        """Blob shapes of one sample of the declared inputs (a trace without computing), for
        ``Network.plan_winograd``: only for networks of dense 3x3 convolutions and declared
        array and image inputs; a network it cannot trace so just transforms per call."""
        convs = [lyr for lyr in self.network.nn.layers if lyr.WhichOneof("layer") == "convolution"
                 and list(lyr.convolution.kernelSize) in ([3, 3], []) and max(lyr.convolution.nGroups, 1) == 1]
        if not convs or self.rank5 or any(s.kind not in ("multiArray", "image") or not s.shape
                                          for s in self.inputs.values()):
            return
        one = {}
        for name, spec in self.inputs.items():
            if spec.kind == "image":
                channels = 1 if spec.color_space == "GRAYSCALE" else 3
                one[name] = jax.ShapeDtypeStruct((channels,) + tuple(spec.shape), jnp.float32)
            else:
                one[name] = jax.ShapeDtypeStruct(tuple(spec.shape), spec.dtype or np.float32)
        try:
            shapes = self._blob_shapes(dict(self.network.weights), one)
        except Exception:  # noqa: BLE001 - planning is an optimization; predict reports real errors
            return
        self.network.plan_winograd(shapes)

    def _probability_blob(self, nn) -> str:
        if nn.labelProbabilityLayerName:
            return nn.labelProbabilityLayerName
        if self.probs_name in self.network.blobs:
            return self.probs_name
        if not nn.layers or not nn.layers[-1].output:
            raise ModelFormatError("classifier has no layers to produce class probabilities")
        return nn.layers[-1].output[0]

    def map_input(self, name: str, x):
        spec = self.inputs[name]
        if spec.kind == "image":
            x = images.apply_preprocessing(jnp.asarray(x, jnp.float32), self.pre[name])
            return x.reshape((1, 1) + x.shape) if self.image_rank5 else x[None]
        if spec.kind in ("multiArray",):
            if jnp.result_type(x) == jnp.float16:   # NeuralNetwork blobs are float32 (the ops keep x's dtype)
                x = jnp.asarray(x, jnp.float32)
            return map_array_input(name, x, tuple(spec.shape or ()), self.rank5)
        return x

    def __call__(self, weights, inputs, states):
        env = {n: self.map_input(n, v) for n, v in inputs.items()}
        return self._outputs(self.network.run(weights, env)), states

    def _blob_shapes(self, weights, one: dict) -> dict:
        """``{blob: ShapeDtypeStruct}`` of every blob for one sample's inputs ``one`` (a trace, no compute)."""
        return jax.eval_shape(lambda w, x: self.network.run(w, {k: self.map_input(k, v) for k, v in x.items()}),
                              weights, one)

    def _wanted(self) -> list:
        wanted = [n for n in self.outputs if n not in (self.label_name, self.probs_name)]
        return wanted + ([self.prob_blob] if self.labels is not None else [])

    def map_batch(self, weights, inputs, states):
        """``jax.vmap(self)`` over the leading axis of ``inputs``, by the chunk plan of
        :mod:`mljax.schedule` where it has one (as ML programs: ``LoweredFunction.map_batch``)."""
        plan = None
        if not states and schedule.chunked_backend():
            shapes = self._blob_shapes(weights, schedule.one_sample(inputs))
            plan = schedule.chunk_plan(self.network.steps(shapes), _input_bytes(shapes, inputs), self._wanted(),
                                       schedule.batch_size(inputs))
        if plan is None:
            return jax.vmap(self, in_axes=(None, 0, None))(weights, inputs, states)
        twins = set()      # live blobs passed channel-last (a region's layout; the same every trace)

        def passed(env, last, end):
            twins.update(name for name in end.live if name in last)
            return {name: last.get(name, env[name]) for name in end.live}

        def received(live):
            env, last = {}, {}
            for name, v in live.items():
                if name in twins:
                    last[name], env[name] = v, jnp.transpose(v, (0, 3, 1, 2))
                else:
                    env[name] = v
            return env, last

        def prefix(sample):
            env, last = {k: self.map_input(k, v) for k, v in sample.items()}, {}
            self.network.run_span(weights, env, last, 0, plan.cut)
            return passed(env, last, plan)

        def middle(start, span, live):
            env, last = received(live)
            self.network.run_span(weights, env, last, start, span.cut)
            return passed(env, last, span)

        def suffix(live):
            env, last = received(live)
            self.network.run_span(weights, env, last, plan.end)
            return self._outputs(env), {}
        return schedule.run_chunked(plan, inputs, prefix, suffix, middle)

    def _outputs(self, env: dict) -> dict:
        missing = [n for n in self._wanted() if n not in env]
        if missing:
            raise ModelFormatError(f"the network describes outputs {missing} that no input or layer produces")
        out = {}
        for name, spec in self.outputs.items():
            if name == self.label_name or name == self.probs_name:
                continue
            out[name] = self._output(env[name], spec)
        if self.labels is not None:
            probs = env[self.prob_blob].reshape(-1)
            if probs.shape[0] != len(self.labels):
                raise ModelFormatError(f"classifier probabilities {self.prob_blob!r} have {probs.shape[0]} "
                                       f"values; expected one per class label ({len(self.labels)})")
            if self.probs_name:
                out[self.probs_name] = probs
            if self.label_name:
                out[self.label_name] = jnp.argmax(probs).astype(jnp.int32)
        return out

    def _output(self, y, spec):
        if spec.kind == "image":
            return y.reshape(y.shape[-3:])
        return map_output(y, tuple(spec.shape or ()), self.rank5)


def _input_bytes(shapes: dict, inputs: dict) -> dict:
    """Bytes per sample of each input blob as the network sees it (after its input mapping)."""
    return {k: schedule.nbytes(shapes[k]) for k in inputs if k in shapes}


def _input_specs(plan: _Plan) -> dict:
    """Rank-5 mapped arrays accept [Seq, ...] forms too: their shapes are checked by the mapping."""
    out = {}
    for name, spec in plan.inputs.items():
        if spec.kind == "multiArray" and plan.rank5 and not (spec.ranges or spec.enumerated):
            spec = dataclasses.replace(spec, shape=None)
        out[name] = spec
    return out


def _preprocess(plan: _Plan) -> Callable:
    def pre(data: dict) -> dict:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, spec in plan.inputs.items():
            if spec.kind == "image" and name in out:
                out[name] = images.image_to_array(out[name], spec)
        return out
    return pre


def _postprocess(plan: _Plan) -> Callable:
    def post(outputs: dict) -> dict:
        out = dict(outputs)
        for name, spec in plan.outputs.items():
            if spec.kind == "image" and name in out:
                out[name] = images.array_to_image(out[name], spec.color_space)
        if plan.labels is not None:
            if plan.label_name in out:
                out[plan.label_name] = plan.labels[int(np.asarray(out[plan.label_name]))]
            if plan.probs_name in out:
                probs = np.asarray(out[plan.probs_name], np.float64).reshape(-1)
                out[plan.probs_name] = {label: float(p) for label, p in zip(plan.labels, probs)}
        return out
    return post


def _draws_per_call(nn) -> bool:
    """Whether a random layer has a seed < 0: it draws fresh values on every prediction, from the
    call key ``MLModel`` passes (as ML programs' random ops with seed -1 do)."""
    for lyr in walk_layers(nn):
        kind = lyr.WhichOneof("layer")
        if kind in RANDOM_LAYERS and int(getattr(lyr, kind).seed) < 0:
            return True
    return False


@register_stage_builder(*_KINDS)
def build_neuralnetwork_stage(spec, weights_dir=None, **_options) -> Stage:
    kind, nn = _nn_of(spec)
    plan = _Plan(spec, nn, kind)
    keyed = _draws_per_call(nn)
    return Stage(
        fn=with_call_key(plan) if keyed else plan, weights=dict(plan.network.weights),
        map_batch=None if keyed else plan.map_batch,
        inputs=_input_specs(plan), outputs=plan.outputs,
        preprocess=_preprocess(plan), postprocess=_postprocess(plan), batchable=True,
        network=plan.network, rank5=plan.rank5, call_key=keyed, per_call=keyed,
        prepare=jax.jit(plan.network.prepare) if plan.network.prepares() else None,
        prepare_batch=(batch_preparer(plan.network.prepare_batch, plan.network.batch_winograd)
                       if plan.network.winograd_convs else None),
        classes=(ClassLabels(plan.labels, plan.label_name or None, plan.probs_name or None)
                 if plan.labels is not None else None),
        # the spec determines the function (weights and all; they are also its arguments), so
        # NeuralNetwork models reach the persistent executable cache as ML programs do
        digest=hashlib.sha256(spec.SerializeToString(deterministic=True) + kind.encode()).digest(),
    )


def network_function(spec) -> tuple[Callable, dict]:
    """``(fn, weights)`` of a NeuralNetwork spec, for differentiation.

    ``fn(weights, inputs) -> outputs`` is pure: ``inputs`` are arrays (images as float32
    ``[C, H, W]`` in the model's channel order, before scale/bias); classifier outputs are the
    probability vector and the predicted class index.  ``weights`` is keyed ``"<layer>/<param>"``.
    """
    kind, nn = _nn_of(spec)
    plan = _Plan(spec, nn, kind)

    def fn(weights, inputs):
        return plan(weights, inputs, {})[0]
    return fn, dict(plan.network.weights)
