"""A NeuralNetwork message as one JAX function over named blobs, plus the input/output shape mappings."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.errors import JAXTypeError

from mljax.errors import InputError, MLJaxError, ModelFormatError, UnsupportedError
from mljax.neuralnetwork._base import LayerContext, lookup_layer
from mljax.ops.conv import (hwio, is_depthwise_weight, lays_out_weight, prepared_kind, prepared_weight,
                            reads_channel_first)
from mljax.optimize._graph import seeded_components
from mljax.stage import PREPARED

__all__ = ["Network", "map_array_input", "map_output", "walk_layers", "STATIC_MAX"]

#: loadConstant data of at most this many values stays a NumPy constant (so it may serve as a shape).
STATIC_MAX = 64
#: a convolution's prepared Winograd weight transform: the key ``"<layer>/weight" + WINOGRAD_SUFFIX``
WINOGRAD_SUFFIX = "#winograd"
_NESTED = {"branch": ("ifBranch", "elseBranch"), "loop": ("conditionNetwork", "bodyNetwork")}


def walk_layers(nn):
    """Every layer of a network, nested branch/loop networks included."""
    for lyr in nn.layers:
        yield lyr
        kind = lyr.WhichOneof("layer")
        for field in _NESTED.get(kind, ()):
            params = getattr(lyr, kind)
            if params.HasField(field):
                yield from walk_layers(getattr(params, field))


class Network:
    """Layers, decoded weights and the interpreter of one NeuralNetwork (and its nested networks).

    ``weights`` maps ``"<layer name>/<param>"`` to arrays; ``layers`` describes each layer
    (name, type, updatable, inputs, outputs) for on-device update.
    """

    def __init__(self, nn, *, rank5: bool):
        self.nn = nn
        self.rank5 = rank5
        self.weights: dict[str, np.ndarray] = {}
        self.static: dict[str, np.ndarray] = {}
        self.layers: list[dict] = []
        self._params: dict[str, list[tuple[str, str]]] = {}
        self._check_supported()
        for lyr in walk_layers(nn):
            kind = lyr.WhichOneof("layer")
            self.layers.append({"name": lyr.name, "type": kind, "updatable": bool(lyr.isUpdatable),
                                "inputs": list(lyr.input), "outputs": list(lyr.output)})
            self._decode(lyr, kind)
        self.blobs = {o for lyr in walk_layers(nn) for o in lyr.output}
        self.costly_blobs = _costly_blobs(nn)
        self.channels_last = _channel_last_layers(nn)
        self.winograd: dict[str, int] = {}      # layer -> m of its prepared Winograd transform
        self.winograd_convs: dict[str, tuple] = {}   # layer -> (one sample's x shape, w shape, options)

    def prepare(self, weights: dict) -> dict:
        """Depthwise and 1x1 weights of channel-last regions laid out HWIO, and the Winograd
        transforms of dense 3x3 weights (:meth:`plan_winograd`) (``Stage.prepare``)."""
        out = {key: hwio(weights[key]) for key in self._hwio_keys() if key in weights}
        out.update({f"{name}/weight{WINOGRAD_SUFFIX}": prepared_weight(weights[f"{name}/weight"], m)
                    for name, m in self.winograd.items() if f"{name}/weight" in weights})
        return out

    def batch_winograd(self, n: int) -> dict[str, int]:
        """``{layer: m}`` of the Winograd variants a list predict of ``n`` samples picks at its
        folded batch where one sample's (:attr:`winograd`) differs, as ML programs'
        (:meth:`mljax.lower.LoweredFunction.batch_derived`)."""
        out = {}
        for name, (shape, w_shape, options) in self.winograd_convs.items():
            m = prepared_kind((shape[0] * n,) + shape[1:], w_shape, np.float32, region=self._region(name), **options)
            if m is not None and m != self.winograd.get(name):
                out[name] = m
        return out

    def _region(self, name) -> bool:
        """A dense conv layer of a channel-last region, whose weight the layer takes as it is (MIL's
        layout): on XLA's path it may take it prepared HWIO (:func:`mljax.ops.conv.prepared_kind`)."""
        role = self.channels_last.get(name)
        return role is not None and not role.first_in and not role.weight_hwio

    def prepare_batch(self, weights: dict, n: int) -> dict:
        """:meth:`prepare`'s further values for a list predict of ``n`` samples (``Stage.prepare_batch``)."""
        return {f"{name}/weight{WINOGRAD_SUFFIX}{m}": prepared_weight(weights[f"{name}/weight"], m)
                for name, m in self.batch_winograd(n).items() if f"{name}/weight" in weights}

    def prepares(self) -> bool:
        """Whether :meth:`prepare` computes anything."""
        return bool(self._hwio_keys() or self.winograd)

    def plan_winograd(self, shapes: dict) -> None:
        """The top network's convolutions whose one-sample input (``shapes``: blob ->
        ShapeDtypeStruct) runs by Winograd get their weight transform prepared, as ML programs'
        (:func:`mljax.ops.conv.winograd_variant`)."""
        from mljax.neuralnetwork.layers_core import conv_padding
        for lyr in self.nn.layers:
            p = lyr.convolution if lyr.WhichOneof("layer") == "convolution" else None
            x = shapes.get(lyr.input[0]) if p is not None and lyr.input else None
            if x is None or p.isDeconvolution or len(x.shape) != 4 or f"{lyr.name}/weight" not in self.weights:
                continue
            w_shape, groups = _conv_weight(lyr)
            pad_type, pad = conv_padding(p)
            options = dict(strides=list(p.stride) or [1, 1], pad_type=pad_type, pad=pad,
                           dilations=list(p.dilationFactor) or [1, 1], groups=groups)
            m = prepared_kind(tuple(x.shape), w_shape, np.float32, region=self._region(lyr.name), **options)
            self.winograd_convs[lyr.name] = (tuple(x.shape), w_shape, options)
            if m is not None:
                self.winograd[lyr.name] = m

    def _hwio_keys(self) -> list[str]:
        return [f"{name}/weight" for name, role in self.channels_last.items() if role.weight_hwio]

    def _check_supported(self) -> None:
        missing = []
        for lyr in walk_layers(self.nn):
            kind = lyr.WhichOneof("layer")
            if kind == "custom":
                raise UnsupportedError(
                    f"NeuralNetwork layer {lyr.name!r} is a custom layer (class "
                    f"{lyr.custom.className!r}); custom layers need their own implementation")
            if kind is None:
                raise ModelFormatError(f"NeuralNetwork layer {lyr.name!r} has no layer type set")
            if lookup_layer(kind) is None:
                missing.append(f"{lyr.name!r} ({kind})")
        if missing:
            raise UnsupportedError(f"NeuralNetwork uses {len(missing)} unsupported layer(s): "
                                   + ", ".join(missing))

    def _decode(self, lyr, kind: str) -> None:
        impl = lookup_layer(kind)
        if impl.weights is None:
            return
        try:
            decoded = impl.weights(getattr(lyr, kind), lyr)
        except ModelFormatError as e:
            raise ModelFormatError(f"NeuralNetwork layer {lyr.name!r} ({kind}): {e}") from None
        except (ValueError, IndexError, TypeError) as e:
            raise ModelFormatError(f"NeuralNetwork layer {lyr.name!r} ({kind}): its parameters do not "
                                   f"fit together ({e})") from None
        for param, value in decoded.items():
            if value is None:
                continue
            key = f"{lyr.name}/{param}"
            if key in self.weights or key in self.static:
                raise ModelFormatError(f"two NeuralNetwork layers are named {lyr.name!r}")
            self._params.setdefault(lyr.name, []).append((param, key))
            if impl.static_weights and value.size <= STATIC_MAX:
                self.static[key] = value
            else:
                self.weights[key] = value

    # --- running --------------------------------------------------------------------------
    def run(self, weights: dict, env: dict, nn=None) -> dict:
        """Run the layers of ``nn`` (default: the whole network) over ``env``; returns the new env.

        Blobs of channel-last regions (the top network's) are kept in both layouts: the
        ``[N, H, W, C]`` value the region's layers read, and its transpose in ``env`` for every
        other reader (XLA drops the transposes nothing reads)."""
        env = dict(env)
        last = {} if nn is None or nn is self.nn else None
        for lyr in (nn or self.nn).layers:
            self._run_layer(lyr, weights, env, last)
        return env

    def run_span(self, weights: dict, env: dict, last: dict, start: int, stop: int | None = None) -> None:
        """Run the top network's layers ``[start:stop]`` over ``env`` and ``last`` (the channel-last
        twins of region blobs), in place: a part of :meth:`run`."""
        for lyr in self.nn.layers[start:stop]:
            self._run_layer(lyr, weights, env, last)

    def steps(self, shapes: dict) -> list:
        """One :class:`mljax.schedule.Step` per top-level layer, blob bytes from ``shapes``
        (``{blob: ShapeDtypeStruct}`` of one sample; a blob not in it is not static)."""
        from mljax.schedule import Step, nbytes

        out = []
        for lyr in self.nn.layers:
            kind = lyr.WhichOneof("layer")
            # a region's 1x1 convolution of x * gate also reads the product's operands (its role's
            # scaled_by), which are not among its inputs
            role = self.channels_last.get(lyr.name)
            reads = frozenset([n for inner in [lyr, *list(walk_layers(_NestedOnly(lyr)))] for n in inner.input]
                              + list(role.scaled_by if role is not None else ()))
            weights = sum(int(np.asarray(self.static[k] if k in self.static else self.weights[k]).nbytes)
                          for _, k in self._params.get(lyr.name, ()))
            writes = tuple((o, nbytes(shapes[o]) if o in shapes else None) for o in lyr.output)
            out.append(Step(reads, writes, weights, kind == "pooling" and not lyr.pooling.globalPooling))
        return out

    def _region_inputs(self, lyr, role, env, last):
        """The layer's inputs channel-last, or None when one is not a rank-4 array (run it as is)."""
        xs = []
        for i, n in enumerate(list(lyr.input) + list(role.scaled_by)):
            if role.first_in and i == 0:
                if getattr(env[n], "ndim", 0) != 4:
                    return None
                xs.append(env[n])
            elif n in last:
                xs.append(last[n])
            elif getattr(env[n], "ndim", 0) == 4 and not isinstance(env[n], np.ndarray):
                xs.append(last.setdefault(n, jnp.transpose(env[n], (0, 2, 3, 1))))
            elif i >= len(lyr.input):
                return xs[:len(lyr.input)]      # the multiply's operands: the conv reads its product
            else:
                return None
        return xs

    def _run_layer(self, lyr, weights: dict, env: dict, last: dict | None = None) -> None:
        kind = lyr.WhichOneof("layer")
        impl = lookup_layer(kind)
        missing = [n for n in lyr.input if n not in env]
        if missing:
            raise ModelFormatError(f"NeuralNetwork layer {lyr.name!r} ({kind}) reads blob(s) {missing} "
                                   "that no input or earlier layer produces")
        w = {param: self.static[key] if key in self.static else weights[key]
             for param, key in self._params.get(lyr.name, ())}
        role = self.channels_last.get(lyr.name) if last is not None else None
        xs = self._region_inputs(lyr, role, env, last) if role is not None else None
        prepared = weights.get(PREPARED) or {}
        if xs is None:
            role, xs = None, [env[n] for n in lyr.input]
        elif role.weight_hwio:
            key = f"{lyr.name}/weight"
            w["weight"] = prepared[key] if key in prepared else hwio(w["weight"])
        key = f"{lyr.name}/weight{WINOGRAD_SUFFIX}"
        winograd_u = tuple(prepared[k] for k in (key, key + "2", key + "4", key + "hwio") if k in prepared) or None
        ctx = LayerContext(lyr.name, kind, lyr, self.rank5, env=env, run=self.run, weights=weights,
                           winograd_u=winograd_u,
                           after_costly_op=bool(lyr.input) and lyr.input[0] in self.costly_blobs,
                           **(role._asdict() if role is not None else {}))
        try:
            out = impl.fn(getattr(lyr, kind), w, xs, ctx)
        except (MLJaxError, JAXTypeError):
            raise   # JAX's concretization errors tell MLModel to run op by op
        except (IndexError, KeyError) as e:
            # a layer reads an input, output or parameter entry its spec does not have
            raise ModelFormatError(
                f"NeuralNetwork layer {lyr.name!r} ({kind}) has {len(lyr.input)} input(s), "
                f"{len(lyr.output)} output(s) and parameters {sorted(w)}: fewer than the layer "
                f"needs (missing {e})") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:
            shapes = [tuple(jnp.shape(env[n])) for n in lyr.input]
            raise ModelFormatError(
                f"NeuralNetwork layer {lyr.name!r} ({kind}): its parameters do not fit its inputs "
                f"of shapes {shapes} ({e})") from None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if role is not None:
            for name, value in zip(lyr.output, outs):
                last[name] = value
            outs = tuple(jnp.transpose(v, (0, 3, 1, 2)) for v in outs)
        skip = env.get("__skip__")
        for name, value in zip(lyr.output, outs):
            if skip is not None and name in env and not isinstance(skip, bool):
                if isinstance(skip, jax.core.Tracer):
                    value = jnp.where(skip, env[name], value)   # after loopBreak/loopContinue
                elif bool(skip):                                # (concrete: shapes may differ)
                    value = env[name]
            env[name] = value


# --- input / output shape mappings ------------------------------------------------------------
def map_array_input(name: str, x, declared: tuple, rank5: bool):
    """A multi-array input as the network sees it.

    RANK5_ARRAY_MAPPING: ``[C] -> [1,1,C,1,1]``, ``[C,H,W] -> [1,1,C,H,W]``; sequence inputs
    ``[S,C] -> [S,1,C,1,1]``, ``[S,B,C] -> [S,B,C,1,1]`` (declared rank 1) and
    ``[S,C,H,W] -> [S,1,C,H,W]`` (declared rank 3).  EXACT_ARRAY_MAPPING: unchanged.
    """
    if not rank5:
        return x
    r, d = x.ndim, len(declared)
    if r == 5:
        return x
    s = tuple(x.shape)
    if d in (0, 1) and r in (1, 2, 3):
        lead = (1, 1) + s if r == 1 else (s[0], 1, s[1]) if r == 2 else s
        return x.reshape(lead + (1, 1))
    if d in (0, 3) and r in (3, 4):
        return x.reshape((1, 1) + s if r == 3 else (s[0], 1) + s[1:])
    if r < 5 and d not in (1, 3):
        return x.reshape((1,) * (5 - r) + s)
    raise InputError(f"input {name!r}: declared shape {declared} maps to [Seq, Batch, C, H, W]; "
                     f"expected rank {d}, {d + 1 if d == 3 else '2, 3'} or 5; found shape {s}")


def map_output(y, declared: tuple, rank5: bool):
    """A blob as the model returns it: its declared shape when sizes agree, else the rank-5
    blob without the leading ``[1, 1]`` (and trailing ``[1, 1]`` for vector blobs)."""
    if not rank5 or not hasattr(y, "shape"):
        return y
    size = int(np.prod(y.shape))
    if declared and all(d > 0 for d in declared) and int(np.prod(declared)) == size:
        return y.reshape(declared)
    if y.ndim != 5:
        return y
    s = tuple(y.shape)
    lead = s[:2] if s[:2] != (1, 1) else ()
    rest = s[2:3] if s[3:] == (1, 1) and len(declared) != 3 else s[2:]
    return y.reshape(lead + rest)


# Layers with a transcendental function per element: the ML program graph layer's COSTLY_OPS
# (mljax.optimize.passes) in NeuralNetwork terms.
_COSTLY_ACTIVATIONS = frozenset({"tanh", "scaledTanh", "sigmoid", "ELU", "softplus", "parametricSoftplus"})
_COSTLY_LAYERS = frozenset({"gelu", "erf", "exp2", "tanh", "sin", "cos", "sinh", "cosh", "tan", "asin", "acos", "atan",
                            "asinh", "acosh", "atanh"})
_COSTLY_UNARY = frozenset({"EXP", "LOG", "POWER"})


def _costly_blobs(nn) -> frozenset:
    """Blobs written by costly layers, or by a multiply reading one (``x * sigmoid(x)``): a convolution
    reading them gets ``after_costly_op`` (see :func:`mljax.ops.conv.convolution`)."""
    costly: set[str] = set()
    for lyr in walk_layers(nn):
        kind = lyr.WhichOneof("layer")
        if kind == "activation":
            hit = lyr.activation.WhichOneof("NonlinearityType") in _COSTLY_ACTIVATIONS
        elif kind == "unary":
            hit = type(lyr.unary).Operation.Name(lyr.unary.type) in _COSTLY_UNARY
        elif kind in ("multiply", "multiplyBroadcastable"):
            hit = any(i in costly for i in lyr.input)
        else:
            hit = kind in _COSTLY_LAYERS
        if hit:
            costly.update(lyr.output)
    return frozenset(costly)


# --- channel-last regions ---------------------------------------------------------------------
class _Role(NamedTuple):
    """How a layer of a channel-last region runs (the LayerContext fields of that name)."""

    channels_last: bool = True
    first_in: bool = False
    weight_hwio: bool = False
    pool_by_product: bool = False
    scaled_by: tuple = ()


def _region_layer(lyr) -> bool:
    """Layers that compute alike on ``[N, H, W, C]`` blobs (given a ``LayerContext.channels_last``)."""
    kind = lyr.WhichOneof("layer")
    if kind == "convolution":
        return not lyr.convolution.isDeconvolution and len(lyr.input) == 1 and len(lyr.output) == 1
    if kind == "activation":
        return lyr.activation.WhichOneof("NonlinearityType") not in (None, "PReLU", "parametricSoftplus")
    if kind in ("add", "multiply"):
        return len(lyr.output) == 1
    if kind == "pooling":      # max and average, global or windowed
        return lyr.pooling.type in (0, 1) and len(lyr.output) == 1
    return False


def _seeds(w_shape, groups: int) -> bool:
    """A convolution that seeds a channel-last region: depthwise, or dense with a spatial kernel
    (as the ML-program graph layer's, :func:`mljax.optimize.passes.channels_last_regions`)."""
    return is_depthwise_weight(w_shape, groups) or any(k != 1 for k in w_shape[2:])


def _scaled_by(i, layers, producer, readers, region) -> tuple:
    """The two input blobs of the region's ``multiply`` layer that only the 1x1 convolution
    ``layers[i]`` (stride 1, no padding) reads, or ``()``; whether one is a per-image channel
    gate is known at trace time (:func:`mljax.ops.conv.folds_channel_scale`)."""
    lyr = layers[i]
    p = lyr.convolution
    w_shape, groups = _conv_weight(lyr)
    j = producer.get(lyr.input[0])
    if (groups != 1 or any(k != 1 for k in w_shape[2:]) or any(v != 1 for v in p.stride)
            or p.WhichOneof("ConvolutionPaddingType") == "valid" and any(
                a.startEdgeSize or a.endEdgeSize for a in p.valid.paddingAmounts.borderAmounts)
            or j is None or j not in region or layers[j].WhichOneof("layer") != "multiply"
            or len(layers[j].input) != 2 or readers.get(lyr.input[0]) != {i}):
        return ()
    return tuple(layers[j].input)


class _NestedOnly:
    """A layer's nested networks as one network's layers (for :func:`walk_layers`)."""

    def __init__(self, lyr):
        kind = lyr.WhichOneof("layer")
        params = getattr(lyr, kind) if kind else None
        self.layers = [inner for field in _NESTED.get(kind, ()) if params.HasField(field)
                       for inner in getattr(params, field).layers]


def _conv_weight(lyr):
    """A convolution layer's ``(weight shape [C_out, C_in/groups, kh, kw], groups)``."""
    p = lyr.convolution
    return (p.outputChannels, p.kernelChannels, *(int(v) for v in (list(p.kernelSize) or [3, 3]))), max(p.nGroups, 1)


def _channel_last_layers(nn) -> dict:
    """``{layer name: _Role}``: the top network's channel-last regions, as the ML-program graph
    layer forms them (:func:`mljax.optimize.passes.channels_last_regions`): connected layers that
    compute alike channel-last, holding a depthwise or dense spatial convolution.  A region's first dense layer
    with few weights per output (im2col) reads its channel-first input; its depthwise and 1x1
    weights are laid out HWIO (``Network.prepare``); a global average pool read outside it runs
    as a product."""
    layers = list(nn.layers)
    names = [lyr.name for lyr in layers]
    if len(set(names)) != len(names):
        return {}
    producer = {o: i for i, lyr in enumerate(layers) for o in lyr.output}
    free = {i for i, lyr in enumerate(layers) if _region_layer(lyr)}
    edges = [(producer[b], i) for i in free for b in layers[i].input if producer.get(b) in free]
    region = seeded_components(free, edges, {i for i in free if layers[i].WhichOneof("layer") == "convolution"
                                             and _seeds(*_conv_weight(layers[i]))})
    readers: dict[str, set] = {}
    for i, lyr in enumerate(layers):
        for b in lyr.input:
            readers.setdefault(b, set()).add(i)
    roles = {}
    for i in sorted(region):
        lyr = layers[i]
        kind = lyr.WhichOneof("layer")
        role = _Role()
        if kind == "convolution":
            if producer.get(lyr.input[0]) not in region and reads_channel_first(*_conv_weight(lyr)):
                role = role._replace(first_in=True, weight_hwio=lyr.convolution.HasField("weights"))
            elif lays_out_weight(*_conv_weight(lyr)) and lyr.convolution.HasField("weights"):
                role = role._replace(weight_hwio=True, scaled_by=_scaled_by(i, layers, producer, readers, region))
        elif kind == "pooling" and lyr.pooling.type == 1 and not (readers.get(lyr.output[0], set()) & region):
            role = role._replace(pool_by_product=True)
        roles[lyr.name] = role
    return roles

