"""A trained head -> an updatable Core ML NeuralNetwork (and an updatable pipeline package).

Written against mljax's own schema, with no coremltools at run time.  The head is a list
of layers: :class:`Dense`, :class:`Conv2D`, :class:`Activation`, :class:`Flatten` and a
final :class:`Softmax` for classifiers.  Dense and convolution layers are updatable (the
only kinds Core ML can update); the loss and optimizer go into ``updateParams``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mljax.errors import ConversionError
from mljax.proto import FeatureTypes_pb2, Model_pb2

__all__ = ["Dense", "Conv2D", "Activation", "Flatten", "Softmax", "head_to_neuralnetwork",
           "updatable_pipeline", "layers_from_flax"]

_ACTIVATIONS = ("RELU", "TANH", "SIGMOID", "LINEAR", "LEAKYRELU", "ELU", "SOFTPLUS")


@dataclass
class Dense:
    weight: np.ndarray            # [out, in] (Core ML's layout)
    bias: np.ndarray | None = None
    updatable: bool = True


@dataclass
class Conv2D:
    weight: np.ndarray            # [out, in, kh, kw]
    bias: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: str = "valid"         # "valid" or "same"
    updatable: bool = True


@dataclass
class Activation:
    kind: str = "RELU"
    alpha: float = 0.01


@dataclass
class Flatten:
    pass


@dataclass
class Softmax:
    pass


def _weights(wp, values: np.ndarray, updatable: bool) -> None:
    wp.floatValue.extend(np.asarray(values, np.float32).reshape(-1).tolist())
    wp.isUpdatable = updatable


def _add_layer(nn, layer, index: int, blob_in: str, blob_out: str) -> str:
    lyr = nn.layers.add()
    lyr.input.append(blob_in)
    lyr.output.append(blob_out)
    if isinstance(layer, Dense):
        out_c, in_c = layer.weight.shape
        lyr.name = f"dense_{index}"
        ip = lyr.innerProduct
        ip.inputChannels, ip.outputChannels = in_c, out_c
        _weights(ip.weights, layer.weight, layer.updatable)
        if layer.bias is not None:
            ip.hasBias = True
            _weights(ip.bias, layer.bias, layer.updatable)
        lyr.isUpdatable = layer.updatable
    elif isinstance(layer, Conv2D):
        out_c, in_c, kh, kw = layer.weight.shape
        lyr.name = f"conv_{index}"
        c = lyr.convolution
        c.outputChannels, c.kernelChannels, c.nGroups = out_c, in_c, 1
        c.kernelSize.extend([kh, kw])
        c.stride.extend(layer.stride)
        c.dilationFactor.extend([1, 1])
        if layer.padding == "same":
            c.same.asymmetryMode = 0
        else:
            c.valid.SetInParent()
        _weights(c.weights, layer.weight, layer.updatable)
        if layer.bias is not None:
            c.hasBias = True
            _weights(c.bias, layer.bias, layer.updatable)
        lyr.isUpdatable = layer.updatable
    elif isinstance(layer, Activation):
        kind = layer.kind.upper()
        if kind not in _ACTIVATIONS:
            raise ConversionError(f"activation {layer.kind!r} is not exportable; expected one of {_ACTIVATIONS}")
        lyr.name = f"{kind.lower()}_{index}"
        act = lyr.activation
        {"RELU": act.ReLU, "TANH": act.tanh, "SIGMOID": act.sigmoid, "LINEAR": act.linear,
         "ELU": act.ELU, "SOFTPLUS": act.softplus, "LEAKYRELU": act.leakyReLU}[kind].SetInParent()
        if kind == "LEAKYRELU":
            act.leakyReLU.alpha = layer.alpha
        elif kind == "ELU":
            act.ELU.alpha = 1.0
        elif kind == "LINEAR":
            act.linear.alpha = 1.0
    elif isinstance(layer, Flatten):
        lyr.name = f"flatten_{index}"
        lyr.flatten.mode = 0
    elif isinstance(layer, Softmax):
        lyr.name = f"softmax_{index}"
        lyr.softmax.SetInParent()
    else:
        raise ConversionError(f"cannot export head layer {type(layer).__name__}; expected Dense, "
                              f"Conv2D, Activation, Flatten or Softmax")
    return lyr.name


def _array_feature(fd, name: str, shape: Sequence[int]) -> None:
    fd.name = name
    fd.type.multiArrayType.shape.extend(int(s) for s in shape)
    fd.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def _double_param(p, default: float, lo: float = 0.0, hi: float = 1.0) -> None:
    p.defaultValue = default
    p.range.minValue, p.range.maxValue = lo, hi


def _int_param(p, default: int, allowed: Sequence[int]) -> None:
    p.defaultValue = default
    p.set.values.extend(sorted(set(allowed) | {default}))


def head_to_neuralnetwork(layers: Sequence, *, input_name: str, input_shape: Sequence[int],
                          class_labels: Sequence[str] | None = None, output_name: str = "probs",
                          label_name: str = "label", optimizer: str = "sgd", learning_rate: float = 0.01,
                          mini_batch_size: int = 10, momentum: float = 0.0, beta1: float = 0.9,
                          beta2: float = 0.999, eps: float = 1e-8, epochs: int = 10, shuffle: bool = True,
                          seed: int = 0) -> Model_pb2.Model:
    """An updatable NeuralNetwork(Classifier) spec of ``layers`` with its loss and optimizer.

    A classifier (``class_labels`` given) must end in :class:`Softmax`; it trains with
    categorical cross-entropy on the class label.  Otherwise the loss is mean squared error
    against ``<output_name>_true``.
    """
    if not layers:
        raise ConversionError("the head has no layers")
    if not any(isinstance(l, (Dense, Conv2D)) and l.updatable for l in layers):
        raise ConversionError("the head has no updatable Dense or Conv2D layer")
    spec = Model_pb2.Model()
    spec.specificationVersion = 4
    spec.isUpdatable = True
    nn = spec.neuralNetworkClassifier if class_labels is not None else spec.neuralNetwork
    nn.arrayInputShapeMapping = 1  # EXACT_ARRAY_MAPPING: rank-N arrays
    blob = input_name
    for i, layer in enumerate(layers):
        out = output_name if i == len(layers) - 1 else f"{type(layer).__name__.lower()}_{i}_out"
        _add_layer(nn, layer, i, blob, out)
        blob = out
    desc = spec.description
    _array_feature(desc.input.add(), input_name, input_shape)
    up = nn.updateParams
    loss = up.lossLayers.add()
    loss.name = "loss"
    if class_labels is not None:
        if not isinstance(layers[-1], Softmax):
            raise ConversionError("a classifier head must end in Softmax (Core ML's cross-entropy reads a softmax output)")
        nn.stringClassLabels.vector.extend(str(c) for c in class_labels)
        probs = desc.output.add()
        probs.name = output_name
        probs.type.dictionaryType.stringKeyType.SetInParent()
        label = desc.output.add()
        label.name = label_name
        label.type.stringType.SetInParent()
        desc.predictedFeatureName, desc.predictedProbabilitiesName = label_name, output_name
        nn.labelProbabilityLayerName = output_name
        loss.categoricalCrossEntropyLossLayer.input = output_name
        loss.categoricalCrossEntropyLossLayer.target = f"{output_name}_true"  # as coremltools names it
        target = desc.trainingInput.add()
        target.CopyFrom(label)
    else:
        out = desc.output.add()
        out.name = output_name
        out.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32
        loss.meanSquaredErrorLossLayer.input = output_name
        loss.meanSquaredErrorLossLayer.target = f"{output_name}_true"
        target = desc.trainingInput.add()
        target.name = f"{output_name}_true"
        target.type.multiArrayType.dataType = FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    training_inputs = [desc.input[0], *desc.trainingInput]
    del desc.trainingInput[:]
    for fd in training_inputs:
        desc.trainingInput.add().CopyFrom(fd)
    if optimizer == "sgd":
        o = up.optimizer.sgdOptimizer
        _double_param(o.learningRate, learning_rate)
        _int_param(o.miniBatchSize, mini_batch_size, range(1, 257))
        _double_param(o.momentum, momentum)
    elif optimizer == "adam":
        o = up.optimizer.adamOptimizer
        _double_param(o.learningRate, learning_rate)
        _int_param(o.miniBatchSize, mini_batch_size, range(1, 257))
        _double_param(o.beta1, beta1)
        _double_param(o.beta2, beta2)
        _double_param(o.eps, eps, 0.0, 1.0)
    else:
        raise ConversionError(f"optimizer must be 'sgd' or 'adam'; found {optimizer!r}")
    _int_param(up.epochs, epochs, range(1, 1001))
    up.shuffle.defaultValue = shuffle
    up.seed.defaultValue = seed
    return spec


def layers_from_flax(module) -> list:
    """Head layers from a Flax NNX ``Sequential`` of ``Linear`` layers and activation functions."""
    import jax
    from flax import nnx

    names = {jax.nn.relu: "RELU", jax.numpy.tanh: "TANH", jax.nn.sigmoid: "SIGMOID",
             jax.nn.softplus: "SOFTPLUS"}
    out = []
    for part in getattr(module, "layers", [module]):
        if isinstance(part, nnx.Linear):
            bias = None if part.bias is None else np.asarray(part.bias[...])
            out.append(Dense(np.asarray(part.kernel[...]).T, bias))
        elif part is jax.nn.softmax:
            out.append(Softmax())
        elif part in names:
            out.append(Activation(names[part]))
        else:
            raise ConversionError(f"cannot export head part {part!r}: expected nnx.Linear, "
                                  f"jax.nn.relu/tanh/sigmoid/softplus or jax.nn.softmax")
    return out


def updatable_pipeline(feature_model, head_spec: Model_pb2.Model, path, *,
                       names: tuple[str, str] = ("features", "head")) -> Path:
    """Save ``feature_model`` (a frozen ML-program mljax.MLModel) followed by an updatable
    head as an updatable pipeline ``.mlpackage``; returns its path."""
    from mljax.format.package import save_spec

    fspec = feature_model.get_spec()
    head_in = head_spec.description.input[0].name
    produced = [o.name for o in fspec.description.output]
    if head_in not in produced:
        raise ConversionError(f"the head reads {head_in!r} but the feature model produces {produced}")
    spec = Model_pb2.Model()
    spec.specificationVersion = max(fspec.specificationVersion, head_spec.specificationVersion)
    spec.isUpdatable = True
    classifier = head_spec.WhichOneof("Type") == "neuralNetworkClassifier"
    pipe = spec.pipelineClassifier.pipeline if classifier else spec.pipeline
    pipe.models.add().CopyFrom(fspec)
    pipe.models.add().CopyFrom(head_spec)
    pipe.names.extend(names)
    desc, hd = spec.description, head_spec.description
    desc.input.extend(fspec.description.input)
    desc.output.extend(hd.output)
    desc.predictedFeatureName, desc.predictedProbabilitiesName = hd.predictedFeatureName, hd.predictedProbabilitiesName
    desc.trainingInput.extend(fspec.description.input)
    desc.trainingInput.extend(t for t in hd.trainingInput if t.name != head_in)
    desc.metadata.userDefined["com.github.mljax.source"] = "converters.neuralnetwork.updatable_pipeline"
    return save_spec(spec, path, weights_from=feature_model.model_dir)
