"""Recurrent layers on ``[Seq, Batch, C, 1, 1]`` sequences: LSTM (uni/bi), GRU, simple RNN.

The layers translate their parameters (gate order, activations, biases) into the MIL ops' shared
``_lstm_direction`` / ``_gru_direction`` / ``_rnn_direction`` (``mljax.ops.recurrent``).  Every
pre-activation is clipped to [-50, 50] as Core ML does.  With ``reverseInput`` the sequence is
processed last to first and the output sequence is in processing order (as Core ML and MIL
``lstm`` direction="reverse" do); the backward half of a bidirectional LSTM is re-aligned with
the input positions.
"""
from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp

from mljax.neuralnetwork._base import fail, layer
from mljax.neuralnetwork.layers_core import ACTIVATIONS, apply_activation
from mljax.neuralnetwork.weights import decode_weights
from mljax.ops import activation as act_ops
from mljax.ops import elementwise_unary as un_ops
from mljax.ops.recurrent import _gru_direction, _lstm_direction, _rnn_direction

_LSTM_GATES = ("inputGate", "forgetGate", "blockInput", "outputGate")


def _seq(x, ctx, c_in: int):
    """``[S, B, C, 1, 1]`` (or ``[S, B, C]``) -> ``[S, B, C]``."""
    if x.ndim == 5:
        x = x.reshape(x.shape[:3])
    elif x.ndim == 1:
        x = x.reshape(1, 1, -1)
    elif x.ndim == 2:
        x = x[:, None, :]
    if x.shape[-1] != c_in:
        fail(ctx, f"expected {c_in} input channels; found input shape {tuple(x.shape)}")
    return x


def _state(xs, i: int, batch: int, size: int, dtype):
    if len(xs) > i and xs[i] is not None:
        return jnp.asarray(xs[i], dtype).reshape(batch, size)
    return jnp.zeros((batch, size), dtype)


#: MIL's (alpha, beta) defaults, which coremltools writes as unset (0, 0) parameters
_MIL_DEFAULTS = {"sigmoidHard": (0.2, 0.5), "linear": (1.0, 0.0), "scaledTanh": (1.0, 1.0)}


def recurrent_activation(a, v):
    """An activation of a recurrent layer (the activation layer's table); parameterless hard
    sigmoid / linear / scaled tanh take the MIL defaults."""
    kind = a.WhichOneof("NonlinearityType")
    if kind in _MIL_DEFAULTS and getattr(a, kind).alpha == 0 and getattr(a, kind).beta == 0:
        alpha, beta = _MIL_DEFAULTS[kind]
        return ACTIVATIONS[kind](v, SimpleNamespace(alpha=alpha, beta=beta), {})
    return apply_activation(a, v)


def _out5(y):
    """``[S, B, H]`` -> ``[S, B, H, 1, 1]``."""
    return y.reshape(tuple(y.shape) + (1, 1))


def _clip(v):
    return un_ops.clip(v, alpha=-50.0, beta=50.0)


def _act(a, default):
    """The layer's activation ``a`` (``default`` when unset) on the clipped pre-activation."""
    if a is None:
        return lambda v: default(_clip(v))
    return lambda v: recurrent_activation(a, _clip(v))


# --- LSTM -----------------------------------------------------------------------------------
def _lstm_param_weights(wp, c_in: int, h: int, prefix: str = "") -> dict:
    out = {}
    for g in _LSTM_GATES:
        out[f"{prefix}{g}WeightMatrix"] = decode_weights(getattr(wp, f"{g}WeightMatrix"), (h, c_in))
        out[f"{prefix}{g}RecursionMatrix"] = decode_weights(getattr(wp, f"{g}RecursionMatrix"), (h, h))
        out[f"{prefix}{g}BiasVector"] = decode_weights(getattr(wp, f"{g}BiasVector"), (h,))
    for g in ("inputGate", "forgetGate", "outputGate"):
        out[f"{prefix}{g}PeepholeVector"] = decode_weights(getattr(wp, f"{g}PeepholeVector"), (h,))
    return out


def _lstm_scan(x, h0, c0, w, prefix, params, acts, reverse, time_aligned=False):
    """Run one LSTM direction; returns (outputs [S,B,H] in processing order, or at their time
    steps with ``time_aligned``, h_T, c_T)."""
    f_act, g_act, h_act = (list(acts) + [None] * 3)[:3]
    zeros = jnp.zeros(h0.shape[-1:], x.dtype)
    get = lambda k: w.get(prefix + k, zeros)  # noqa: E731 - missing biases/peepholes are zero
    order = ("inputGate", "forgetGate", "outputGate", "blockInput")   # MIL's [i, f, o, z]
    w_ih = jnp.concatenate([w[f"{prefix}{g}WeightMatrix"] for g in order])
    w_hh = jnp.concatenate([w[f"{prefix}{g}RecursionMatrix"] for g in order])
    b = [get(f"{g}BiasVector") if params.hasBiasVectors else zeros for g in order]
    if params.forgetBias:
        b[1] = b[1] + 1.0
    peep = None
    if params.hasPeepholeVectors:
        peep = jnp.concatenate([get(f"{g}PeepholeVector") for g in ("inputGate", "forgetGate", "outputGate")])
    acts = (_act(f_act, act_ops.sigmoid), _act(g_act, un_ops.tanh), _act(h_act, un_ops.tanh))
    return _lstm_direction(x, h0, c0, w_ih, w_hh, jnp.concatenate(b), peep, acts,
                           params.cellClipThreshold or None, reverse, time_aligned,
                           coupled=params.coupledInputAndForgetGate)


def _uni_lstm_weights(p, _):
    return _lstm_param_weights(p.weightParams, p.inputVectorSize, p.outputVectorSize)


@layer("uniDirectionalLSTM", weights=_uni_lstm_weights)
def uni_lstm(p, w, xs, ctx):
    """Inputs ``x, [h0, c0]``; outputs ``y, h_T, c_T`` (``y`` all steps with sequenceOutput)."""
    x = _seq(xs[0], ctx, p.inputVectorSize)
    hsize, batch = p.outputVectorSize, x.shape[1]
    h0, c0 = _state(xs, 1, batch, hsize, x.dtype), _state(xs, 2, batch, hsize, x.dtype)
    ys, h, c = _lstm_scan(x, h0, c0, w, "", p.params, p.activations, p.reverseInput)
    y = ys if p.params.sequenceOutput else ys[-1:]
    return _out5(y), _out5(h[None]), _out5(c[None])


def _bi_lstm_weights(p, _):
    if len(p.weightParams) != 2:
        return {}
    out = _lstm_param_weights(p.weightParams[0], p.inputVectorSize, p.outputVectorSize)
    out.update(_lstm_param_weights(p.weightParams[1], p.inputVectorSize, p.outputVectorSize, "backward_"))
    return out


@layer("biDirectionalLSTM", weights=_bi_lstm_weights)
def bi_lstm(p, w, xs, ctx):
    """Inputs ``x, [h0_f, c0_f, h0_b, c0_b]``; outputs ``y (forward ++ backward on C), h_f, c_f, h_b, c_b``."""
    if len(p.weightParams) != 2:
        fail(ctx, f"expected 2 weightParams (forward, backward); found {len(p.weightParams)}")
    x = _seq(xs[0], ctx, p.inputVectorSize)
    hsize, batch = p.outputVectorSize, x.shape[1]
    states = [_state(xs, i, batch, hsize, x.dtype) for i in range(1, 5)]
    yf, hf, cf = _lstm_scan(x, states[0], states[1], w, "", p.params, p.activationsForwardLSTM, False)
    yb, hb, cb = _lstm_scan(x, states[2], states[3], w, "backward_", p.params,
                            p.activationsBackwardLSTM, True, time_aligned=True)
    if p.params.sequenceOutput:
        y = jnp.concatenate([yf, yb], axis=-1)
    else:
        y = jnp.concatenate([yf[-1:], yb[:1]], axis=-1)
    return tuple([_out5(y)] + [_out5(v[None]) for v in (hf, cf, hb, cb)])


# --- GRU, simple RNN -----------------------------------------------------------------------
_GRU_GATES = ("updateGate", "resetGate", "outputGate")


def _gru_weights(p, _):
    c_in, h = p.inputVectorSize, p.outputVectorSize
    out = {}
    for g in _GRU_GATES:
        out[f"{g}WeightMatrix"] = decode_weights(getattr(p, f"{g}WeightMatrix"), (h, c_in))
        out[f"{g}RecursionMatrix"] = decode_weights(getattr(p, f"{g}RecursionMatrix"), (h, h))
        if p.hasBiasVectors:
            out[f"{g}BiasVector"] = decode_weights(getattr(p, f"{g}BiasVector"), (h,))
    return out


@layer("gru", weights=_gru_weights)
def gru(p, w, xs, ctx):
    """``z, r = f(Wx + Rh + b)``; ``o = g(W_o x + R_o (r * h) + b_o)``; ``h = (1-z) o + z h``."""
    x = _seq(xs[0], ctx, p.inputVectorSize)
    hsize, batch = p.outputVectorSize, x.shape[1]
    h0 = _state(xs, 1, batch, hsize, x.dtype)
    f_act, g_act = (list(p.activations) + [None, None])[:2]
    order = ("resetGate", "outputGate", "updateGate")                  # MIL's [r, o, z]
    w_ih = jnp.concatenate([w[f"{g}WeightMatrix"] for g in order])
    w_hh = jnp.concatenate([w[f"{g}RecursionMatrix"] for g in order])
    zeros = jnp.zeros((hsize,), x.dtype)
    bias = jnp.concatenate([w.get(f"{g}BiasVector", zeros) for g in order])
    ys, h = _gru_direction(x, h0, w_ih, w_hh, bias, None,
                           (_act(f_act, act_ops.sigmoid), _act(g_act, un_ops.tanh)),
                           bool(p.reverseInput), False)
    y = ys if p.sequenceOutput else ys[-1:]
    return _out5(y), _out5(h[None])


def _rnn_weights(p, _):
    c_in, h = p.inputVectorSize, p.outputVectorSize
    return {"weightMatrix": decode_weights(p.weightMatrix, (h, c_in)),
            "recursionMatrix": decode_weights(p.recursionMatrix, (h, h)),
            "biasVector": decode_weights(p.biasVector, (h,)) if p.hasBiasVector else None}


@layer("simpleRecurrent", weights=_rnn_weights)
def simple_recurrent(p, w, xs, ctx):
    """``h_t = f(W x_t + R h_{t-1} + b)``; outputs ``y, h_T``."""
    x = _seq(xs[0], ctx, p.inputVectorSize)
    hsize, batch = p.outputVectorSize, x.shape[1]
    h0 = _state(xs, 1, batch, hsize, x.dtype)
    has_act = p.HasField("activation") and p.activation.WhichOneof("NonlinearityType")
    act = _act(p.activation if has_act else None, un_ops.tanh)
    ys, h = _rnn_direction(x, h0, w["weightMatrix"], w["recursionMatrix"], w.get("biasVector"), act,
                           bool(p.reverseInput))
    y = ys if p.sequenceOutput else ys[-1:]
    return _out5(y), _out5(h[None])
