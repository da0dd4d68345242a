"""The trainable view of an updatable model: frozen prefix, network forward, write-back.

For an updatable pipeline, the stages before the network are frozen: their outputs are
computed once per training sample (when deterministic) and the train step runs only the
network.  The network's weights split into trainable (the updatable layers) and frozen.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np

from mljax.errors import UpdateError
from mljax.model import MLModel
from mljax.pipeline import _fit, pipeline_of, stage_names
from mljax.stage import PREPARED, shared_fn
from updatable.spec import UpdateSpec

__all__ = ["TrainableNetwork"]

_RANDOM_OPS = ("random_bernoulli", "random_categorical", "random_normal", "random_uniform")
_CHUNK = 256


def _is_deterministic(stage) -> bool:
    program = stage.program
    if program is None:
        return all(_is_deterministic(s) for s in stage.children.values())
    return not any(op.type in _RANDOM_OPS for f in program.functions.values() for op in f.block.walk())


class TrainableNetwork:
    """Forward pass, weight split and write-back for the network stage of ``model``."""

    def __init__(self, model: MLModel, uspec: UpdateSpec):
        self.model, self.uspec = model, uspec
        stage, prefix, weights = model.stage, [], model.weights
        for name in uspec.nn_path:
            names = list(stage.children)
            prefix += [(n, stage.children[n], weights[n]) for n in names[: names.index(name)]]
            stage, weights = stage.children[name], weights[name]
        self.stage, self.prefix = stage, prefix
        self.plan = stage.fn                      # maps inputs, runs the network, selects outputs
        self.network = stage.network
        self.weights = weights
        self._keys = {}
        for layer in uspec.updatable_layers:
            keys = [k for k in weights if k.startswith(layer + "/")]
            if not keys:
                raise UpdateError(f"updatable layer {layer!r} has no weights in the network")
            self._keys[layer] = keys
        self.loss_input = uspec.loss.input
        self.logits_blob = self._softmax_input(uspec.loss.input)

    # --- structure ---------------------------------------------------------------------
    def _softmax_input(self, blob: str) -> str | None:
        for lyr in self.network.nn.layers:
            if blob in lyr.output:
                kind = lyr.WhichOneof("layer")
                if kind == "softmax" or (kind == "softmaxND" and lyr.softmaxND.axis == -1):
                    return lyr.input[0]
                if self.uspec.loss.kind == "categorical_cross_entropy":
                    raise UpdateError(f"the cross-entropy loss reads {blob!r}, produced by a {kind} layer "
                                      f"{lyr.name!r}; Core ML requires a softmax output")
                return None
        if blob in self.stage.inputs:
            return None
        raise UpdateError(f"the loss reads {blob!r}, which no layer of the network produces")

    def num_classes(self) -> int | None:
        labels = self.uspec.class_labels
        return len(labels) if labels else None

    def trainable_weights(self) -> dict:
        return {k: self.weights[k] for keys in self._keys.values() for k in keys}

    def frozen_weights(self) -> dict:
        trainable = {k for keys in self._keys.values() for k in keys}
        return {k: v for k, v in self.weights.items() if k not in trainable}

    # --- data ----------------------------------------------------------------------------
    def network_inputs(self, stacked: dict) -> dict:
        """Training inputs -> the network's input features, running the frozen prefix once."""
        feats = dict(stacked)
        if self.prefix:
            if not all(_is_deterministic(st) for _, st, _ in self.prefix):
                raise UpdateError("the frozen stages before the network use random ops; mljax "
                                  "caches frozen features and needs deterministic stages")
            for name, st, w in self.prefix:
                if st.prepare is not None:    # re-laid-out weights once, not once per chunk
                    w = {**w, PREPARED: st.prepare(w)}
                # one compiled function per frozen stage, reused by every task on this model
                run = shared_fn(("frozen-prefix", id(st.fn)), lambda st=st: jax.jit(
                    jax.vmap(lambda w, x: st.fn(w, x, {})[0], in_axes=(None, 0))))
                ins = {k: feats[k] for k in st.inputs if k in feats}
                n = len(next(iter(ins.values())))
                outs = [run(w, {k: v[i:i + _CHUNK] for k, v in ins.items()}) for i in range(0, n, _CHUNK)]
                feats.update({k: np.concatenate([np.asarray(o[k]) for o in outs]) for k in outs[0]})
        missing = [k for k, s in self.stage.inputs.items() if k not in feats and not s.optional]
        if missing:
            raise UpdateError(f"the network needs inputs {missing} that the training data does not provide")
        out = {}
        for k, spec in self.stage.inputs.items():
            if k in feats:
                out[k] = np.asarray(feats[k], np.float32) if spec.kind == "multiArray" else feats[k]
        return out

    # --- forward -------------------------------------------------------------------------
    def forward(self, trainable, frozen, features, *, want: str):
        """Batched forward: ``{"output": blob want, "logits": its softmax input}``."""
        weights = {**frozen, **trainable}
        logits_blob = self.logits_blob

        def one(sample):
            env = {n: self.plan.map_input(n, v) for n, v in sample.items()}
            env = self.network.run(weights, env)
            out = {"output": env[want]}
            if logits_blob is not None:
                out["logits"] = env[logits_blob]
            return out

        batched = jax.vmap(one)(features)
        return {k: v.reshape(v.shape[0], -1) for k, v in batched.items()}

    # --- write-back ----------------------------------------------------------------------
    def updated_spec(self, trainable: dict):
        """A copy of the model's spec with the trained weights written into their layers, and the
        weights as written (rounded to fp16 where a layer stores fp16)."""
        spec = self.model.get_spec()
        node = spec
        for name in self.uspec.nn_path:
            pipe = pipeline_of(node)
            node = pipe.models[stage_names(pipe).index(name)]
        nn = getattr(node, self.uspec.nn_kind)
        layers = {l.name: l for l in nn.layers}
        written = {}
        for layer_name, keys in self._keys.items():
            lyr = layers[layer_name]
            params = getattr(lyr, lyr.WhichOneof("layer"))
            for key in keys:
                field = {"weight": "weights", "bias": "bias"}.get(key.split("/", 1)[1])
                if field is None:
                    raise UpdateError(f"cannot write trained weight {key!r} back into layer {layer_name!r}")
                stored = _write_weight_params(getattr(params, field), np.asarray(trainable[key]))
                written[key] = stored.reshape(np.shape(self.weights[key])).astype(self.weights[key].dtype)
        return spec, written

    def updated_model(self, trainable: dict) -> MLModel:
        """The model with ``trainable`` written into its spec; it runs the source's compiled
        function (no rebuild, no recompile) and saves the trained layers."""
        spec, written = self.updated_spec(trainable)
        weights = dict(self.model.weights)
        nested = [weights]
        for name in self.uspec.nn_path:
            nested[-1][name] = dict(nested[-1][name])
            nested.append(nested[-1][name])
        nested[-1].update(written)
        return self.model.with_weights(weights, spec=spec)


def _write_weight_params(wp, values: np.ndarray) -> np.ndarray:
    """Store values in the WeightParams field the layer already uses (fp32 or fp16); returns
    them as stored (float32)."""
    flat = np.ascontiguousarray(values, np.float32).reshape(-1)
    if wp.float16Value:
        wp.float16Value = flat.astype("<f2").tobytes()
        return flat.astype(np.float16).astype(np.float32)
    if wp.rawValue and not wp.HasField("quantization"):
        wp.rawValue = flat.astype("<f4").tobytes()
    else:
        if wp.HasField("quantization") or wp.rawValue or wp.int8RawValue:
            wp.ClearField("quantization")
            wp.rawValue = b""
            wp.int8RawValue = b""
        del wp.floatValue[:]
        wp.floatValue.extend(flat.tolist())
    return flat
