"""MIL recurrent ops: lstm, gru, rnn (one layer, sequence-major ``x: [s, b, I]``), via ``lax.scan``.

gru and rnn compute every time step's input projection in one matrix product before the loop;
each step does one product with the stacked recurrent weights (two for gru: r and z, then the
reset-scaled o), by the weights laid out [in, out] once per call where the recurrence has several
rows (:func:`_recurrent_product`).  An lstm step multiplies ``[x_t, h]`` by ``[w_ih | w_hh]^T``
(several rows; from :data:`_FEATURE_MAJOR_ROWS` rows feature-major, the state ``[H, b]`` and the
weights the left operand) or projects the sequence first (one row), see :func:`_lstm_plain`.  A
list predict's samples join the batch of one recurrence (:func:`_sample_folding`).
fp16 recurrences run in fp32 (state, products, gates) and the outputs are rounded to fp16 once.
The NeuralNetwork LSTM/GRU/RNN layers call the same ``_*_direction`` functions.

Weight layouts (rows of ``weight_ih`` / ``weight_hh`` / ``bias``):
  * lstm: gates ``[input, forget, output, cell]`` (torch's ``[i, f, g, o]`` reordered),
    ``bias`` is the sum of the input and recurrent biases, ``peephole`` is ``[i, f, o]``;
  * gru: gates ``[reset, output (new), update]`` (torch's ``[r, z, n]`` reordered to r, n, z);
  * rnn: one gate.
``direction="reverse"`` runs over the reversed sequence and returns the steps in the order
they were processed (last time step first); the backward half of a ``bidirectional`` lstm is
returned aligned with the input's time steps, and its "last" output is the one at time 0.
Opset deltas: iOS17 only widens dtypes (fp16); iOS18 ``gru`` adds ``reset_after`` and
``input_bias``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax, nn
from jax.custom_batching import custom_vmap

from mljax.errors import OpError
from mljax.ops._registry import register, register_internal

__all__ = ["lstm", "gru", "rnn"]

_ACTIVATIONS = {
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "scaled_tanh": jnp.tanh,  # MIL's defaults alpha = beta = 1
    "relu": nn.relu,
    "linear": lambda v: v,
    "hard_sigmoid": lambda v: jnp.clip(0.2 * v + 0.5, 0, 1),
    "sigmoid_hard": lambda v: jnp.clip(0.2 * v + 0.5, 0, 1),
}


def _activation(name: str, op: str):
    fn = _ACTIVATIONS.get(str(name).lower())
    if fn is None:
        raise OpError(f"{op}: activation must be one of {sorted(_ACTIVATIONS)}; found {name!r}")
    return fn


def _check_direction(direction: str, allowed: tuple, op: str) -> None:
    if direction not in allowed:
        raise OpError(f"{op}: direction must be one of {allowed}; found {direction!r}")


def _check_x(x, op: str) -> None:
    if jnp.ndim(x) != 3:
        raise OpError(f"{op}: x must be rank 3 [seq, batch, input]; found shape {jnp.shape(x)}")


def _vec(v, size, dtype):
    return jnp.zeros((size,), dtype) if v is None else jnp.asarray(v).astype(dtype)


def _compute_dtype(dtype):
    """fp16/bf16 recurrences run in fp32 (state, gates, products); outputs are rounded back."""
    return jnp.promote_types(dtype, jnp.float32)


def _mv(h, w):
    """``h @ w.T`` contracting ``w``'s second axis in place (no transposed copy of ``w`` per step)."""
    return lax.dot_general(h, w, (((h.ndim - 1,), (1,)), ((), ())))


def _steps(step, carry, xs, reverse: bool = False, time_aligned: bool = False, *, prefetch=True):
    """``lax.scan(step, carry, xs)`` for recurrences; returns (final carry, per-step outputs).

    With ``prefetch``, ``xs[t]`` reaches ``step`` through the loop carry, sliced one step ahead:
    XLA:CPU fuses a slice at the loop index into every fusion that reads it and emits those
    fusions as scalar loops, which made lstm/gru's sigmoid/tanh gates several times slower than
    on a carried buffer (rnn's single activation is cheaper than carrying the slice).
    ``reverse`` walks the sequence from the end; the outputs are then in processing order
    (last time step first), or at their time index with ``time_aligned``.
    """
    n = xs.shape[0]
    if not prefetch or n == 0:
        if reverse and not time_aligned:
            return lax.scan(step, carry, xs[::-1])
        return lax.scan(step, carry, xs, reverse=reverse)
    pos = (lambda k: n - 1 - k) if reverse else (lambda k: k)

    def body(state, _):
        inner, x_t, k = state
        inner, y = step(inner, x_t)
        nxt = lax.dynamic_index_in_dim(xs, pos(jnp.minimum(k + 1, n - 1)), keepdims=False)
        return (inner, nxt, k + 1), y

    (carry, _, _), ys = lax.scan(body, (carry, xs[pos(0)], 0), None, length=n,
                                 reverse=reverse and time_aligned)
    return carry, ys


def _sequence_output(ys, output_sequence: bool, last_index: int = -1):
    return ys if output_sequence else ys[last_index][None]


# --- lstm -------------------------------------------------------------------------------
def _lstm_direction(x, h0, c0, w_ih, w_hh, bias, peephole, acts, clip, reverse, time_aligned,
                    coupled=False, w_t=None):
    """One LSTM direction over ``x: [s, b, I]``; returns (outputs [s, b, H], h_T, c_T).

    ``acts`` are callables (recurrent, cell, output); ``coupled`` ties the forget gate to
    ``1 - input`` (NeuralNetwork's ``coupledInputAndForgetGate``).  Shared by both formats.
    ``w_t``: ``[w_ih | w_hh]^T`` ``[I + H, 4H]`` laid out once per weight values, where the
    caller has it (the ``mljax.lstm`` op); else a recurrence of a few rows transposes per call.
    Vmapped (a list predict's samples), the samples join the batch (:func:`_sample_folding`).
    """
    hidden = jnp.shape(w_hh)[1]
    bias = _vec(bias, 4 * hidden, _compute_dtype(x.dtype))
    statics = (acts, clip, bool(reverse), bool(time_aligned), bool(coupled), peephole is not None, w_t is not None)
    weights = (w_ih, w_hh, bias) + tuple(w for w in (peephole, w_t) if w is not None)
    return _sample_folding(_lstm_plain, statics, 2)(x, h0, c0, *weights)


def _sample_folding(plain, statics: tuple, n_state: int):
    """``plain(statics, x [s, b, I], *states [b, H], *weights)`` whose ``vmap`` over the samples of
    a list predict folds them into the batch axis ``b``: one recurrence of ``V * b`` rows instead
    of ``V`` recurrences batched by XLA (each step one product).  States that are not mapped
    (a model's constant initial state) are repeated per sample; mapped weights fall back to
    ``vmap``.  Reverse-mode derivatives come from ``plain`` (``custom_vmap`` has none of its own).
    Outputs: per-step values ``[s, b, ...]`` first, then the final states ``[b, ...]``.  Built per
    trace, not cached: the NeuralNetwork layers pass activations made per call."""
    run = functools.partial(plain, statics)

    @custom_vmap
    def folded(*args):
        return run(*args)

    @folded.def_vmap
    def _rule(axis_size, in_batched, *args):
        x, states, weights = args[0], args[1:1 + n_state], args[1 + n_state:]
        if not in_batched[0] or any(in_batched[1 + n_state:]):
            return jax.vmap(run, in_axes=tuple(0 if b else None for b in in_batched))(*args), \
                (True,) * (1 + n_state)
        v, (s_len, b) = axis_size, x.shape[1:3]
        xf = jnp.moveaxis(x, 0, 1).reshape((s_len, v * b) + x.shape[3:])
        sf = [st.reshape((v * b,) + st.shape[2:]) if bat else jnp.tile(st, (v,) + (1,) * (st.ndim - 1))
              for st, bat in zip(states, in_batched[1:1 + n_state])]
        ys, *finals = run(xf, *sf, *weights)
        ys = jnp.moveaxis(ys.reshape((ys.shape[0], v, b) + ys.shape[2:]), 1, 0)
        return (ys, *[f.reshape((v, b) + f.shape[1:]) for f in finals]), (True,) * (1 + n_state)

    @jax.custom_vjp
    def fn(*args):
        return folded(*args)

    fn.defvjp(lambda *args: (folded(*args), args), lambda args, ct: jax.vjp(run, *args)[1](ct))
    return fn


# How an LSTM step computes its gates, by rows (one thread, 32 steps of 64 -> 128, Intel Xeon,
# in-process medians):
# * one row: the sequence's input projection before the loop, then h @ w_hh^T per step;
# * 2 to _FEATURE_MAJOR_ROWS - 1 rows: batch-major, one product per step, [x_t, h] @ [w_ih | w_hh]^T
#   (the weights transposed once per call: [in, out] is the orientation XLA:CPU's library packs
#   cheaply as the right operand) against the feature-major product below, the transposition
#   included: 0.79x the time at 2 rows, 0.89x at 4, 0.95x at 8, 0.42x at 12 (where the
#   feature-major product ran 2x slower), 1.13x at 16.  With the weights laid out once per weight
#   values (the graph pass lstm_weights_in_out: the internal op mljax.lstm) 0.57x / 0.75x / 0.86x
#   at 2 / 4 / 8 rows;
# * from _FEATURE_MAJOR_ROWS rows: feature-major, [w_ih | w_hh] @ [x_t; h] (the weights the left
#   operand; batch-major with the weights laid out once 1.05x at 32 and 64 rows).  Against the
#   sequence projected first this was 0.71x the time at 32 rows, 0.79x at 16.
_FEATURE_MAJOR_ROWS = 16


def _lstm_plain(statics, x, h0, c0, w_ih, w_hh, bias, *optional):
    """:func:`_lstm_direction` of one batch (``bias`` a vector; ``statics`` its other arguments,
    ``optional`` its peephole and ``w_t``, those given); how a step computes its gates depends on
    the rows (see :data:`_FEATURE_MAJOR_ROWS`)."""
    acts, clip, reverse, time_aligned, coupled, has_peephole, has_w_t = statics
    optional = list(optional)
    peephole = optional.pop(0) if has_peephole else None
    w_t = optional.pop(0) if has_w_t else None
    dtype = _compute_dtype(x.dtype)
    hidden, rows = w_hh.shape[1], x.shape[1]
    w_ih, w_hh = jnp.asarray(w_ih).astype(dtype), jnp.asarray(w_hh).astype(dtype)
    fm = rows >= _FEATURE_MAJOR_ROWS           # feature-major: [H, b] states, gates on axis 0
    axis, col = (0, lambda v: v[:, None]) if fm else (-1, lambda v: v)
    if fm:
        # each step one product of [w_ih | w_hh] with [x_t; h]: no separate input projection
        w_cat, b_col = jnp.concatenate([w_ih, w_hh], axis=1), col(bias.astype(dtype))
        xs = jnp.swapaxes(x.astype(dtype), 1, 2)                                  # [s, I, b]
        gates = lambda x_t, h: w_cat @ jnp.concatenate([x_t, h], axis=0) + b_col   # noqa: E731
    elif rows > 1:
        w_t = jnp.concatenate([w_ih, w_hh], axis=1).T if w_t is None else jnp.asarray(w_t).astype(dtype)
        b_row = bias.astype(dtype)                                                 # w_t: [I + H, 4H]
        xs = x.astype(dtype)
        gates = lambda x_t, h: jnp.concatenate([x_t, h], axis=-1) @ w_t + b_row   # noqa: E731
    else:
        xs = jnp.einsum("sbi,gi->sbg", x.astype(dtype), w_ih) + bias.astype(dtype)
        gates = lambda xw_t, h: xw_t + _mv(h, w_hh)                               # noqa: E731
    p_i, p_f, p_o = ([col(p) for p in jnp.split(_vec(peephole, 3 * hidden, dtype), 3)]
                     if peephole is not None else (0, 0, 0))
    rec_act, cell_act, out_act = acts

    def step(carry, xs_t):
        h, c = carry
        g_i, g_f, g_o, g_z = jnp.split(gates(xs_t, h), 4, axis=axis)
        if peephole is not None:
            g_i, g_f = g_i + c * p_i, g_f + c * p_f
        i = rec_act(g_i)
        f = 1 - i if coupled else rec_act(g_f)
        c = f * c + i * cell_act(g_z)
        if clip is not None:  # Core ML clips the cell state, before the output peephole
            c = jnp.clip(c, -clip, clip)
        h = rec_act(g_o + c * p_o if peephole is not None else g_o) * out_act(c)
        return (h, c), h

    h0, c0 = h0.astype(dtype), c0.astype(dtype)
    (h, c), ys = _steps(step, (h0.T, c0.T) if fm else (h0, c0), xs, reverse, time_aligned)
    if fm:
        ys, h, c = jnp.swapaxes(ys, 1, 2), h.T, c.T
    return ys.astype(x.dtype), h.astype(x.dtype), c.astype(x.dtype)


@register("lstm")
def lstm(x, initial_h, initial_c, weight_ih, weight_hh, bias=None, peephole=None,
         weight_ih_back=None, weight_hh_back=None, bias_back=None, peephole_back=None, *,
         direction="forward", output_sequence=False, recurrent_activation="sigmoid",
         cell_activation="tanh", activation="tanh", clip=None):
    """One LSTM layer; returns ``(output [s|1, b, D*H], h [b, D*H], c [b, D*H])``.

    Bidirectional: ``initial_h/c[:, :H]`` and outputs ``[..., :H]`` are the forward direction;
    the ``*_back`` weights drive the backward one.  ``clip`` bounds the cell state.
    """
    return _lstm(x, initial_h, initial_c, weight_ih, weight_hh, bias, peephole, weight_ih_back, weight_hh_back,
                 bias_back, peephole_back, None, None, direction, output_sequence, recurrent_activation,
                 cell_activation, activation, clip)


@register_internal("mljax.lstm")
def lstm_in_out(x, initial_h, initial_c, weight_ih, weight_hh, weight_in_out, bias=None, peephole=None,
                weight_ih_back=None, weight_hh_back=None, bias_back=None, peephole_back=None,
                weight_in_out_back=None, *, direction="forward", output_sequence=False,
                recurrent_activation="sigmoid", cell_activation="tanh", activation="tanh", clip=None):
    """``lstm`` with ``[weight_ih | weight_hh]^T`` (``[I + H, 4H]``) laid out once per weight
    values: ``weight_in_out`` (and ``weight_in_out_back``), written by the graph pass
    :func:`mljax.optimize.passes.lstm_weights_in_out`; the same values."""
    return _lstm(x, initial_h, initial_c, weight_ih, weight_hh, bias, peephole, weight_ih_back, weight_hh_back,
                 bias_back, peephole_back, weight_in_out, weight_in_out_back, direction, output_sequence,
                 recurrent_activation, cell_activation, activation, clip)


def _lstm(x, initial_h, initial_c, weight_ih, weight_hh, bias, peephole, weight_ih_back, weight_hh_back,
          bias_back, peephole_back, w_t, w_t_back, direction, output_sequence, recurrent_activation,
          cell_activation, activation, clip):
    _check_x(x, "lstm")
    _check_direction(direction, ("forward", "reverse", "bidirectional"), "lstm")
    acts = tuple(_activation(a, "lstm") for a in (recurrent_activation, cell_activation, activation))
    x, h0, c0 = jnp.asarray(x), jnp.asarray(initial_h), jnp.asarray(initial_c)
    hidden = jnp.shape(weight_hh)[1]
    if jnp.shape(weight_ih)[0] != 4 * hidden or jnp.shape(weight_hh)[0] != 4 * hidden:
        raise OpError(f"lstm: weight_ih/weight_hh must have 4*H rows with H={hidden}; found "
                      f"{jnp.shape(weight_ih)} and {jnp.shape(weight_hh)}")
    if direction != "bidirectional":
        ys, h, c = _lstm_direction(x, h0, c0, weight_ih, weight_hh, bias, peephole, acts, clip,
                                   direction == "reverse", False, w_t=w_t)
        return _sequence_output(ys, output_sequence), h, c
    if weight_ih_back is None or weight_hh_back is None:
        raise OpError("lstm: direction='bidirectional' needs weight_ih_back and weight_hh_back; "
                      "found them missing")
    fwd = _lstm_direction(x, h0[:, :hidden], c0[:, :hidden], weight_ih, weight_hh, bias,
                          peephole, acts, clip, False, True, w_t=w_t)
    bwd = _lstm_direction(x, h0[:, hidden:], c0[:, hidden:], weight_ih_back, weight_hh_back,
                          bias_back, peephole_back, acts, clip, True, True, w_t=w_t_back)
    out = jnp.concatenate([_sequence_output(fwd[0], output_sequence, -1),
                           _sequence_output(bwd[0], output_sequence, 0)], axis=-1)
    return out, jnp.concatenate([fwd[1], bwd[1]], -1), jnp.concatenate([fwd[2], bwd[2]], -1)


# --- gru --------------------------------------------------------------------------------
def _gru_direction(x, h0, w_ih, w_hh, bias, input_bias, acts, reverse, reset_after):
    """One GRU direction over ``x: [s, b, I]`` (gates ``[r, o, z]``); returns (outputs in
    processing order, h_T).  ``acts`` are callables (recurrent, output).  Shared by both formats.
    Layouts and a list predict's samples as :func:`_lstm_direction`'s."""
    hidden = jnp.shape(w_hh)[1]
    dtype = _compute_dtype(x.dtype)
    weights = (w_ih, w_hh, _vec(bias, 3 * hidden, dtype), _vec(input_bias, 3 * hidden, dtype))
    return _sample_folding(_gru_plain, (acts, bool(reverse), bool(reset_after)), 1)(x, jnp.asarray(h0), *weights)


def _recurrent_product(rows: int):
    """``(prepare, product)`` of a GRU's or RNN's recurrent product ``h @ w^T`` over ``rows`` rows:
    ``product(prepare(w), h)``.  Several rows multiply by ``w^T`` laid out once per call ([in, out]:
    XLA:CPU's library packs a product's right operand on every call, and as ``w`` [out, in] it
    transposed it in that packing on every step); one row contracts ``w`` in place (the transpose
    per call cost more than it saved).  GRU, one thread, 32 steps of 64 -> 128, Intel Xeon, against
    the feature-major product ``w @ h`` of the state [H, b] that several rows took before: 0.64x the
    time at 2 rows, 0.71x at 4, 0.77x at 8, 0.39x at 12, 0.91x at 16, 0.86x at 32, 0.85x at 128."""
    if rows > 1:
        return (lambda w: w.T), (lambda w_t, h: h @ w_t)
    return (lambda w: w), (lambda w, h: _mv(h, w))


def _gru_plain(statics, x, h0, w_ih, w_hh, bias, input_bias):
    (rec_act, out_act), reverse, reset_after = statics
    dtype = _compute_dtype(x.dtype)
    prepare, prod = _recurrent_product(x.shape[1])
    w_ih, w_hh = jnp.asarray(w_ih).astype(dtype), jnp.asarray(w_hh).astype(dtype)
    w_hr, w_ho, w_hz = jnp.split(w_hh, 3)
    w_hrz, w_ho = prepare(jnp.concatenate([w_hr, w_hz])), prepare(w_ho)   # r and z from one product per step
    b_r, b_o, b_z = jnp.split(bias.astype(dtype), 3)
    # every bias outside the reset gate's product is folded into the input projection
    b_in = jnp.concatenate([b_r, jnp.zeros_like(b_o) if reset_after else b_o, b_z]) + input_bias.astype(dtype)
    xw = jnp.einsum("sbi,gi->sbg", x.astype(dtype), w_ih) + b_in

    def step(h, xw_t):
        x_r, x_o, x_z = jnp.split(xw_t, 3, axis=-1)
        h_r, h_z = jnp.split(prod(w_hrz, h), 2, axis=-1)
        r, z = rec_act(x_r + h_r), rec_act(x_z + h_z)
        if reset_after:  # torch style: the reset gate scales the recurrent term
            o = out_act(x_o + r * (prod(w_ho, h) + b_o))
        else:  # the reset gate scales h before the recurrent matmul
            o = out_act(x_o + prod(w_ho, r * h))
        h = (1 - z) * o + z * h
        return h, h

    h, ys = _steps(step, h0.astype(dtype), xw, reverse)
    return ys.astype(x.dtype), h.astype(x.dtype)


def _gru(x, initial_h, weight_ih, weight_hh, bias, input_bias, direction, output_sequence,
         recurrent_activation, activation, reset_after):
    _check_x(x, "gru")
    _check_direction(direction, ("forward", "reverse"), "gru")
    acts = (_activation(recurrent_activation, "gru"), _activation(activation, "gru"))
    hidden = jnp.shape(weight_hh)[1]
    if jnp.shape(weight_ih)[0] != 3 * hidden or jnp.shape(weight_hh)[0] != 3 * hidden:
        raise OpError(f"gru: weight_ih/weight_hh must have 3*H rows with H={hidden}; found "
                      f"{jnp.shape(weight_ih)} and {jnp.shape(weight_hh)}")
    ys, h = _gru_direction(jnp.asarray(x), initial_h, weight_ih, weight_hh, bias, input_bias,
                           acts, direction == "reverse", reset_after)
    return _sequence_output(ys, output_sequence), h


@register("gru")
def gru(x, initial_h, weight_ih, weight_hh, bias=None, *, direction="forward",
        output_sequence=False, recurrent_activation="sigmoid", activation="tanh"):
    """One GRU layer; returns ``(output [s|1, b, H], h [b, H])``; reset applied before the matmul."""
    return _gru(x, initial_h, weight_ih, weight_hh, bias, None, direction, output_sequence,
                recurrent_activation, activation, False)


@register("gru", "iOS18")
def gru_iOS18(x, initial_h, weight_ih, weight_hh, bias=None, input_bias=None, *,
              direction="forward", output_sequence=False, recurrent_activation="sigmoid",
              activation="tanh", reset_after=False):
    """iOS18 adds ``input_bias`` (added to ``x @ weight_ih.T``; ``bias`` is then the recurrent
    bias) and ``reset_after`` (torch's formulation: ``r * (W_ho h + b_ho)``)."""
    return _gru(x, initial_h, weight_ih, weight_hh, bias, input_bias, direction, output_sequence,
                recurrent_activation, activation, bool(reset_after))


# --- rnn --------------------------------------------------------------------------------
def _rnn_direction(x, h0, w_ih, w_hh, bias, act, reverse):
    """``h = act(W_ih x + W_hh h + b)`` over ``x: [s, b, I]``; returns (outputs in processing
    order, h_T).  Shared by both formats.  Layouts and a list predict's samples as
    :func:`_lstm_direction`'s."""
    bias = _vec(bias, jnp.shape(w_ih)[0], _compute_dtype(x.dtype))
    return _sample_folding(_rnn_plain, (act, bool(reverse)), 1)(x, jnp.asarray(h0), w_ih, w_hh, bias)


def _rnn_plain(statics, x, h0, w_ih, w_hh, bias):
    act, reverse = statics
    dtype = _compute_dtype(x.dtype)
    prepare, prod = _recurrent_product(x.shape[1])
    w_ih, w_hh = jnp.asarray(w_ih).astype(dtype), prepare(jnp.asarray(w_hh).astype(dtype))
    xw = jnp.einsum("sbi,hi->sbh", x.astype(dtype), w_ih) + bias.astype(dtype)

    def step(h, xw_t):
        h = act(xw_t + prod(w_hh, h))
        return h, h

    h, ys = _steps(step, h0.astype(dtype), xw, reverse, prefetch=False)
    return ys.astype(x.dtype), h.astype(x.dtype)


@register("rnn")
def rnn(x, initial_h, weight_ih, weight_hh, bias=None, *, direction="forward",
        output_sequence=False, activation="tanh"):
    """One simple RNN layer ``h = act(W_ih x + W_hh h + b)``; returns ``(output, h)``."""
    _check_x(x, "rnn")
    _check_direction(direction, ("forward", "reverse"), "rnn")
    ys, h = _rnn_direction(jnp.asarray(x), initial_h, weight_ih, weight_hh, bias,
                           _activation(activation, "rnn"), direction == "reverse")
    return _sequence_output(ys, output_sequence), h
