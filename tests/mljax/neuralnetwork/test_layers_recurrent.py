"""NeuralNetwork LSTM / GRU / RNN layers (built with coremltools' builder) against NumPy step loops.

The layers run on the MIL ops' shared recurrences (``mljax.ops.recurrent``); these tests pin the
NeuralNetwork-only parts: the builder's gate order, peepholes, coupled input/forget gates, the
forget bias, cell clipping, reversed input and the re-aligned backward half of a bidirectional LSTM.
"""
from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402

import mljax  # noqa: E402

RNG = np.random.default_rng(5)
N_IN, N_H, SEQ = 3, 4, 5


def _r(*shape, scale=1.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _lstm_params():
    """Builder order i, f, o, z for weights and biases; peepholes i, f, o."""
    return ([_r(N_H, N_H, scale=0.5) for _ in range(4)], [_r(N_H, N_IN) for _ in range(4)],
            [_r(N_H) for _ in range(4)], [_r(N_H, scale=0.5) for _ in range(3)])


def _np_lstm(xs, wh, wx, b, peep, h, c, *, coupled, forget_bias, clip):
    """Core ML's NeuralNetwork LSTM: peepholes i/f on c_{t-1}, o on c_t; cell clipped first."""
    p_i, p_f, p_o = peep if peep is not None else (0.0, 0.0, 0.0)
    hs = []
    for x in xs:
        pre = [wx[k] @ x + wh[k] @ h + b[k] for k in range(4)]
        i = _sigmoid(pre[0] + p_i * c)
        f = 1 - i if coupled else _sigmoid(pre[1] + (1.0 if forget_bias else 0.0) + p_f * c)
        c = np.clip(f * c + i * np.tanh(pre[3]), -clip, clip)
        h = _sigmoid(pre[2] + p_o * c) * np.tanh(c)
        hs.append(h)
    return np.stack(hs), h, c


@pytest.mark.parametrize("peephole,coupled,forget_bias,clip,reverse",
                         [(True, False, False, 50000.0, False), (True, True, True, 0.3, True),
                          (False, False, True, 0.5, False), (False, True, False, 50000.0, True)])
def test_unilstm_options(peephole, coupled, forget_bias, clip, reverse):
    wh, wx, b, peep = _lstm_params()
    peep = peep if peephole else None
    bld = NeuralNetworkBuilder([("x", datatypes.Array(N_IN)), ("h0", datatypes.Array(N_H)),
                                ("c0", datatypes.Array(N_H))], [("y", None), ("hT", None), ("cT", None)])
    bld.add_unilstm("lstm", wh, wx, b, N_H, N_IN, ["x", "h0", "c0"], ["y", "hT", "cT"], peep=peep,
                    output_all=True, forget_bias=forget_bias, coupled_input_forget_gate=coupled,
                    cell_clip_threshold=clip, reverse_input=reverse)
    xs, h0, c0 = _r(SEQ, N_IN), _r(N_H), _r(N_H)
    out = mljax.MLModel(bld.spec).predict({"x": xs.reshape(SEQ, 1, N_IN), "h0": h0, "c0": c0})
    ys, h, c = _np_lstm(xs[::-1] if reverse else xs, wh, wx, b, peep, h0, c0, coupled=coupled,
                        forget_bias=forget_bias, clip=clip)
    np.testing.assert_allclose(np.asarray(out["y"]).reshape(SEQ, N_H), ys, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["hT"]).reshape(-1), h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["cT"]).reshape(-1), c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("output_all", [True, False])
def test_bidirlstm_backward_half_aligned(output_all):
    fw, bw = _lstm_params(), _lstm_params()
    names = ["x", "h0", "c0", "h0b", "c0b"]
    bld = NeuralNetworkBuilder([(n, datatypes.Array(N_IN if n == "x" else N_H)) for n in names],
                               [(n, None) for n in ("y", "hf", "cf", "hb", "cb")])
    bld.add_bidirlstm("bi", fw[0], fw[1], fw[2], bw[0], bw[1], bw[2], N_H, N_IN, names,
                      ["y", "hf", "cf", "hb", "cb"], peep=fw[3], peep_back=bw[3], output_all=output_all)
    xs, states = _r(SEQ, N_IN), [_r(N_H) for _ in range(4)]
    out = mljax.MLModel(bld.spec).predict({"x": xs.reshape(SEQ, 1, N_IN),
                                           **dict(zip(names[1:], states))})
    opts = dict(coupled=False, forget_bias=False, clip=50000.0)
    yf, hf, cf = _np_lstm(xs, *fw, *states[:2], **opts)
    yb, hb, cb = _np_lstm(xs[::-1], *bw, *states[2:], **opts)
    yb = yb[::-1]                                   # back at the input's time steps
    expected = np.concatenate([yf, yb], -1) if output_all else np.concatenate([yf[-1], yb[0]])
    np.testing.assert_allclose(np.asarray(out["y"]).reshape(expected.shape), expected, rtol=1e-4, atol=1e-5)
    for name, ref in zip(("hf", "cf", "hb", "cb"), (hf, cf, hb, cb)):
        np.testing.assert_allclose(np.asarray(out[name]).reshape(-1), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_gru_and_rnn_reverse_input(reverse):
    wx, wh, bias = [_r(N_H, N_IN) for _ in range(3)], [_r(N_H, N_H, scale=0.5) for _ in range(3)], \
        [_r(N_H) for _ in range(3)]          # builder order z, r, o
    wr, ur, br = _r(N_H, N_IN), _r(N_H, N_H, scale=0.5), _r(N_H)
    bld = NeuralNetworkBuilder([("x", datatypes.Array(N_IN))], [("g", None), ("s", None)])
    bld.add_gru("gru", wh, wx, bias, N_H, N_IN, ["x"], ["g", "gh"], activation="TANH",
                inner_activation="SIGMOID", output_all=True, reverse_input=reverse)
    bld.add_simple_rnn("rnn", ur, wr, br, N_H, N_IN, "RELU", ["x"], ["s", "sh"], output_all=True,
                       reverse_input=reverse)
    xs = _r(SEQ, N_IN)
    out = mljax.MLModel(bld.spec).predict({"x": xs.reshape(SEQ, 1, N_IN)})
    steps = xs[::-1] if reverse else xs
    h, s, hs, ss = np.zeros(N_H), np.zeros(N_H), [], []
    for x in steps:                          # outputs in processing order, as Core ML does
        z = _sigmoid(wx[0] @ x + wh[0] @ h + bias[0])
        r = _sigmoid(wx[1] @ x + wh[1] @ h + bias[1])
        h = (1 - z) * np.tanh(wx[2] @ x + wh[2] @ (r * h) + bias[2]) + z * h
        s = np.maximum(wr @ x + ur @ s + br, 0)
        hs.append(h)
        ss.append(s)
    np.testing.assert_allclose(np.asarray(out["g"]).reshape(SEQ, N_H), np.stack(hs), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["s"]).reshape(SEQ, N_H), np.stack(ss), rtol=1e-4, atol=1e-5)
