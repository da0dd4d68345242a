"""lstm / gru / rnn against torch.nn (gates re-ordered to MIL's layout) and NumPy step loops."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mljax.errors import OpError
from mljax.ops import recurrent as rc
from tests.helpers import assert_close

RNG = np.random.default_rng(1)
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float16: dict(rtol=3e-2, atol=3e-2)}


def _np(t):
    return t.detach().numpy()


def _ifgo_to_ifoz(w):
    """torch LSTM gate order (i, f, g, o) -> MIL (i, f, o, z=g)."""
    i, f, g, o = np.split(w, 4)
    return np.concatenate([i, f, o, g])


def _rzn_to_roz(w):
    """torch GRU gate order (r, z, n) -> MIL (r, o=n, z)."""
    r, z, n = np.split(w, 3)
    return np.concatenate([r, n, z])


# --- lstm -------------------------------------------------------------------------------
def _torch_lstm(seq, batch, inp, hidden, bidirectional, bias):
    torch.manual_seed(0)
    m = torch.nn.LSTM(inp, hidden, 1, bias=bias, bidirectional=bidirectional)
    x = torch.randn(seq, batch, inp)
    d = 2 if bidirectional else 1
    h0, c0 = torch.randn(d, batch, hidden), torch.randn(d, batch, hidden)
    return m, x, h0, c0


def _mil_lstm_weights(m, suffix="", bias=True):
    sd = {k: _np(v) for k, v in m.state_dict().items()}
    w_ih = _ifgo_to_ifoz(sd["weight_ih_l0" + suffix])
    w_hh = _ifgo_to_ifoz(sd["weight_hh_l0" + suffix])
    b = _ifgo_to_ifoz(sd["bias_ih_l0" + suffix] + sd["bias_hh_l0" + suffix]) if bias else None
    return w_ih, w_hh, b


# a step's gates by rows: one row (the projected sequence), batch-major below
# rc._FEATURE_MAJOR_ROWS and feature-major from it (one product per step of [w_ih | w_hh] and [x_t; h])
@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("output_sequence,bias", [(True, True), (False, False)])
def test_lstm_vs_torch(dtype, direction, output_sequence, bias, batch):
    assert 3 < rc._FEATURE_MAJOR_ROWS <= 17
    seq, inp, hidden = 5, 4, 6
    m, x, h0, c0 = _torch_lstm(seq, batch, inp, hidden, False, bias)
    xt = torch.flip(x, [0]) if direction == "reverse" else x
    out, (hn, cn) = m(xt, (h0, c0))
    expected = _np(out) if output_sequence else _np(out)[-1:]
    w_ih, w_hh, b = _mil_lstm_weights(m, bias=bias)
    cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
    y, h, c = rc.lstm(cast(_np(x)), cast(_np(h0)[0]), cast(_np(c0)[0]), cast(w_ih), cast(w_hh),
                      cast(b), direction=direction, output_sequence=output_sequence)
    assert np.asarray(y).dtype == dtype
    assert_close(y, expected, **TOL[dtype])
    assert_close(h, _np(hn)[0], **TOL[dtype])
    assert_close(c, _np(cn)[0], **TOL[dtype])


@pytest.mark.parametrize("batch", [2, 5, 16])
@pytest.mark.parametrize("output_sequence,bias", [(True, True), (False, False)])
def test_bidirectional_lstm_vs_torch(output_sequence, bias, batch):
    seq, inp, hidden = 4, 3, 5
    m, x, h0, c0 = _torch_lstm(seq, batch, inp, hidden, True, bias)
    out, (hn, cn) = m(x, (h0, c0))
    out = _np(out)
    if not output_sequence:  # last step of each direction: time s-1 forward, time 0 backward
        out = np.concatenate([out[-1:, :, :hidden], out[:1, :, hidden:]], axis=-1)
    fw, bw = _mil_lstm_weights(m, "", bias), _mil_lstm_weights(m, "_reverse", bias)
    both = lambda t: np.concatenate([_np(t)[0], _np(t)[1]], axis=-1)  # noqa: E731
    y, h, c = rc.lstm(_np(x), both(h0), both(c0), fw[0], fw[1], fw[2],
                      weight_ih_back=bw[0], weight_hh_back=bw[1], bias_back=bw[2],
                      direction="bidirectional", output_sequence=output_sequence)
    assert_close(y, out)
    assert_close(h, both(hn))
    assert_close(c, both(cn))


def _act(name, v):
    return {"sigmoid": lambda: 1 / (1 + np.exp(-v)), "tanh": lambda: np.tanh(v),
            "relu": lambda: np.maximum(v, 0), "linear": lambda: v,
            "scaled_tanh": lambda: np.tanh(v),
            "hard_sigmoid": lambda: np.clip(0.2 * v + 0.5, 0, 1)}[name]()


def _np_lstm(x, h, c, w_ih, w_hh, b, p, acts, clip):
    """The MIL docs' equations (peephole i/f on c_{t-1}, o on c_t), one step at a time."""
    ra, ca, oa = acts
    hs = []
    for t in range(x.shape[0]):
        g = x[t] @ w_ih.T + h @ w_hh.T + b
        gi, gf, go, gz = np.split(g, 4, axis=-1)
        pi, pf, po = np.split(p, 3)
        i, f = _act(ra, gi + c * pi), _act(ra, gf + c * pf)
        c = f * c + i * _act(ca, gz)
        c = np.clip(c, -clip, clip)
        h = _act(ra, go + c * po) * _act(oa, c)
        hs.append(h)
    return np.stack(hs), h, c


@pytest.mark.parametrize("acts,clip", [(("sigmoid", "tanh", "tanh"), 50.0),
                                       (("hard_sigmoid", "relu", "linear"), 0.2),
                                       (("sigmoid", "scaled_tanh", "relu"), 0.2),
                                       (("tanh", "linear", "sigmoid"), 50.0)])
@pytest.mark.parametrize("b", [1, 5, 16])
def test_lstm_peephole_clip_activations(acts, clip, b):
    s, i, hdim = 6, 3, 4
    x = RNG.standard_normal((s, b, i)).astype(np.float32)
    h0, c0 = (RNG.standard_normal((b, hdim)).astype(np.float32) for _ in range(2))
    w_ih = RNG.uniform(-1, 1, (4 * hdim, i)).astype(np.float32)
    w_hh = RNG.uniform(-1, 1, (4 * hdim, hdim)).astype(np.float32)
    bias = RNG.uniform(-0.5, 0.5, 4 * hdim).astype(np.float32)
    peep = RNG.uniform(-0.5, 0.5, 3 * hdim).astype(np.float32)
    ys, h, c = _np_lstm(x.astype(np.float64), h0, c0, w_ih, w_hh, bias, peep, acts, clip)
    y, hj, cj = rc.lstm(x, h0, c0, w_ih, w_hh, bias, peep, direction="forward",
                        output_sequence=True, recurrent_activation=acts[0],
                        cell_activation=acts[1], activation=acts[2], clip=clip)
    assert_close(y, ys, rtol=1e-4, atol=1e-5)
    assert_close(hj, h, rtol=1e-4, atol=1e-5)
    assert_close(cj, c, rtol=1e-4, atol=1e-5)


def test_lstm_errors():
    x = np.zeros((2, 1, 3), np.float32)
    h = np.zeros((1, 4), np.float32)
    w_ih, w_hh = np.zeros((16, 3), np.float32), np.zeros((16, 4), np.float32)
    with pytest.raises(OpError, match="bidirectional"):
        rc.lstm(x, h, h, w_ih, w_hh, direction="bidirectional")
    with pytest.raises(OpError, match="activation"):
        rc.lstm(x, h, h, w_ih, w_hh, activation="gelu")
    with pytest.raises(OpError, match="4\\*H"):
        rc.lstm(x, h, h, w_ih[:12], w_hh)


# --- gru --------------------------------------------------------------------------------
def _torch_gru(seq, batch, inp, hidden):
    torch.manual_seed(3)
    m = torch.nn.GRU(inp, hidden, 1)
    return m, torch.randn(seq, batch, inp), torch.randn(1, batch, hidden)


# one row contracts w_hh in place, several multiply by w_hh^T (rc._recurrent_product)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("direction,output_sequence", [("forward", True), ("reverse", False)])
def test_gru_reset_after_vs_torch(dtype, direction, output_sequence, batch):
    m, x, h0 = _torch_gru(5, batch, 4, 6)
    out, hn = m(torch.flip(x, [0]) if direction == "reverse" else x, h0)
    expected = _np(out) if output_sequence else _np(out)[-1:]
    sd = {k: _np(v) for k, v in m.state_dict().items()}
    args = [_rzn_to_roz(sd[k]).astype(dtype) for k in ("weight_ih_l0", "weight_hh_l0", "bias_hh_l0")]
    in_bias = _rzn_to_roz(sd["bias_ih_l0"]).astype(dtype)
    y, h = rc.gru_iOS18(_np(x).astype(dtype), _np(h0)[0].astype(dtype), *args, in_bias,
                        direction=direction, output_sequence=output_sequence, reset_after=True)
    assert_close(y, expected, **TOL[dtype])
    assert_close(h, _np(hn)[0], **TOL[dtype])


def _np_gru(x, h, w_ih, w_hh, b, acts, in_bias=0.0):
    """The MIL docs' GRU (reset applied to h before the recurrent matmul)."""
    ra, oa = acts
    (w_ir, w_io, w_iz), (w_hr, w_ho, w_hz) = np.split(w_ih, 3), np.split(w_hh, 3)
    (b_r, b_o, b_z), (c_r, c_o, c_z) = np.split(b, 3), np.split(in_bias + np.zeros_like(b), 3)
    hs = []
    for t in range(x.shape[0]):
        r = _act(ra, x[t] @ w_ir.T + c_r + h @ w_hr.T + b_r)
        z = _act(ra, x[t] @ w_iz.T + c_z + h @ w_hz.T + b_z)
        o = _act(oa, x[t] @ w_io.T + c_o + (r * h) @ w_ho.T + b_o)
        h = (1 - z) * o + z * h
        hs.append(h)
    return np.stack(hs), h


@pytest.mark.parametrize("acts,direction", [(("sigmoid", "tanh"), "forward"),
                                            (("tanh", "sigmoid"), "reverse"),
                                            (("hard_sigmoid", "relu"), "reverse")])
def test_gru_reset_before(acts, direction):
    s, b, i, hdim = 4, 2, 3, 5
    x = RNG.standard_normal((s, b, i)).astype(np.float32)
    h0 = RNG.standard_normal((b, hdim)).astype(np.float32)
    w_ih = RNG.uniform(-1, 1, (3 * hdim, i)).astype(np.float32)
    w_hh = RNG.uniform(-1, 1, (3 * hdim, hdim)).astype(np.float32)
    bias = RNG.uniform(-1, 1, 3 * hdim).astype(np.float32)
    in_bias = RNG.uniform(-1, 1, 3 * hdim).astype(np.float32)
    xs = x[::-1] if direction == "reverse" else x
    ys, h = _np_gru(xs.astype(np.float64), h0, w_ih, w_hh, bias, acts)
    y, hj = rc.gru(x, h0, w_ih, w_hh, bias, direction=direction, output_sequence=True,
                   recurrent_activation=acts[0], activation=acts[1])
    assert_close(y, ys, rtol=1e-4, atol=1e-5)
    assert_close(hj, h, rtol=1e-4, atol=1e-5)
    ys, h = _np_gru(xs.astype(np.float64), h0, w_ih, w_hh, bias, acts, in_bias)
    y, hj = rc.gru_iOS18(x, h0, w_ih, w_hh, bias, in_bias, direction=direction,
                         output_sequence=False, recurrent_activation=acts[0], activation=acts[1])
    assert_close(y, ys[-1:], rtol=1e-4, atol=1e-5)
    assert_close(hj, h, rtol=1e-4, atol=1e-5)


# --- rnn --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("direction,activation,output_sequence",
                         [("forward", "tanh", True), ("reverse", "relu", False)])
def test_rnn_vs_torch(dtype, direction, activation, output_sequence, batch):
    torch.manual_seed(7)
    m = torch.nn.RNN(4, 5, 1, nonlinearity=activation)
    x, h0 = torch.randn(6, batch, 4), torch.randn(1, batch, 5)
    out, hn = m(torch.flip(x, [0]) if direction == "reverse" else x, h0)
    expected = _np(out) if output_sequence else _np(out)[-1:]
    sd = {k: _np(v) for k, v in m.state_dict().items()}
    y, h = rc.rnn(_np(x).astype(dtype), _np(h0)[0].astype(dtype),
                  sd["weight_ih_l0"].astype(dtype), sd["weight_hh_l0"].astype(dtype),
                  (sd["bias_ih_l0"] + sd["bias_hh_l0"]).astype(dtype), direction=direction,
                  output_sequence=output_sequence, activation=activation)
    assert_close(y, expected, **TOL[dtype])
    assert_close(h, _np(hn)[0], **TOL[dtype])


# --- end to end -------------------------------------------------------------------------
@pytest.mark.parametrize("opset", ["iOS15", "iOS17"])
def test_e2e_lstm(opset):
    from coremltools.converters.mil.mil import Builder as mb, types
    from tests.helpers import run_mil, target

    m, x, h0, c0 = _torch_lstm(4, 2, 3, 5, False, True)
    out, (hn, cn) = m(x, (h0, c0))
    w_ih, w_hh, b = _mil_lstm_weights(m)

    @mb.program(input_specs=[mb.TensorSpec((4, 2, 3), types.fp32), mb.TensorSpec((2, 5), types.fp32),
                             mb.TensorSpec((2, 5), types.fp32)], opset_version=target(opset))
    def prog(x, h, c):
        return mb.lstm(x=x, initial_h=h, initial_c=c, weight_ih=w_ih, weight_hh=w_hh, bias=b,
                       output_sequence=True, name="lstm")

    res = run_mil(prog, {"x": _np(x), "h": _np(h0)[0], "c": _np(c0)[0]}, opset=opset)
    ys = [v for k, v in res.items() if np.shape(v) == (4, 2, 5)]
    assert len(ys) == 1
    assert_close(ys[0], _np(out), rtol=1e-4, atol=1e-5)
    finals = sorted((k for k, v in res.items() if np.shape(v) == (2, 5)))
    assert_close(res[finals[0]], _np(hn)[0], rtol=1e-4, atol=1e-5)
    assert_close(res[finals[1]], _np(cn)[0], rtol=1e-4, atol=1e-5)


# --- the loop itself ----------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("reverse,time_aligned", [(False, False), (True, False), (True, True)])
def test_steps_matches_lax_scan(reverse, time_aligned, prefetch):
    import jax.numpy as jnp
    from jax import lax

    xs = RNG.standard_normal((7, 2, 3)).astype(np.float32)

    def step(carry, x_t):
        carry = jnp.tanh(carry * 0.9 + x_t)
        return carry, carry * 2

    carry0 = np.ones((2, 3), np.float32)
    if reverse and not time_aligned:   # processing order: last time step first
        ref_carry, ref_ys = lax.scan(step, carry0, xs[::-1])
    else:
        ref_carry, ref_ys = lax.scan(step, carry0, xs, reverse=reverse)
    carry, ys = rc._steps(step, carry0, xs, reverse, time_aligned, prefetch=prefetch)
    np.testing.assert_array_equal(np.asarray(carry), np.asarray(ref_carry))
    np.testing.assert_array_equal(np.asarray(ys), np.asarray(ref_ys))


def test_vmapped_batch_one_program_equals_batched_call():
    """MLModel's batched predict vmaps a batch-1 program: same values as one batch-4 call."""
    import jax

    m, x, h0, c0 = _torch_lstm(6, 4, 3, 5, False, True)
    w_ih, w_hh, b = _mil_lstm_weights(m)
    x, h0, c0 = _np(x), _np(h0)[0], _np(c0)[0]

    def one(x1, h1, c1):  # x1 [s, I] -> the op on a batch of 1
        y, h, c = rc.lstm(x1[:, None], h1[None], c1[None], w_ih, w_hh, b, output_sequence=True)
        return y[:, 0], h[0], c[0]

    yv, hv, cv = jax.vmap(one, in_axes=(1, 0, 0), out_axes=(1, 0, 0))(x, h0, c0)
    y, h, c = rc.lstm(x, h0, c0, w_ih, w_hh, b, output_sequence=True)
    for got, want in ((yv, y), (hv, h), (cv, c)):
        assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["lstm", "gru", "rnn"])
def test_fp16_recurrence_runs_in_fp32(op):
    """fp16 inputs: the recurrence is computed in fp32 and only the outputs are rounded."""
    s, b, i, hdim = 5, 2, 3, 4
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[op]
    args = [RNG.standard_normal((s, b, i)), RNG.standard_normal((b, hdim))]
    if op == "lstm":
        args.append(RNG.standard_normal((b, hdim)))
    args += [RNG.uniform(-1, 1, (gates * hdim, i)), RNG.uniform(-1, 1, (gates * hdim, hdim)),
             RNG.uniform(-1, 1, gates * hdim)]
    args16 = [a.astype(np.float16) for a in args]
    fn = getattr(rc, op)
    got = fn(*args16, output_sequence=True)
    want = fn(*[a.astype(np.float32) for a in args16], output_sequence=True)
    for g, w in zip(got, want):
        assert np.asarray(g).dtype == np.float16
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w).astype(np.float16))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_gradients_match_torch(kind):
    """Reverse-mode gradients through the loop (weights and inputs) against torch autograd."""
    import jax
    import jax.numpy as jnp

    torch.manual_seed(11)
    seq, batch, inp, hidden = 5, 2, 3, 4
    m = getattr(torch.nn, kind.upper())(inp, hidden, 1)
    x = torch.randn(seq, batch, inp, requires_grad=True)
    h0 = torch.randn(1, batch, hidden)
    probe = torch.randn(seq, batch, hidden)
    if kind == "lstm":
        c0 = torch.randn(1, batch, hidden)
        out = m(x, (h0, c0))[0]
    else:
        out = m(x, h0)[0]
    (out * probe).sum().backward()
    sd = {k: _np(v) for k, v in m.state_dict().items()}
    order = _ifgo_to_ifoz if kind == "lstm" else _rzn_to_roz

    def loss(x, w_hh):
        if kind == "lstm":
            b = order(sd["bias_ih_l0"] + sd["bias_hh_l0"])
            y = rc.lstm(x, _np(h0)[0], _np(c0)[0], order(sd["weight_ih_l0"]), w_hh, b,
                        output_sequence=True)[0]
        else:
            y = rc.gru_iOS18(x, _np(h0)[0], order(sd["weight_ih_l0"]), w_hh, order(sd["bias_hh_l0"]),
                             order(sd["bias_ih_l0"]), output_sequence=True, reset_after=True)[0]
        return jnp.sum(y * _np(probe))

    gx, gw = jax.grad(loss, argnums=(0, 1))(_np(x), order(sd["weight_hh_l0"]))
    assert_close(gx, _np(x.grad), rtol=1e-4, atol=1e-5)
    assert_close(gw, order(_np(m.weight_hh_l0.grad)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("peephole,clip,mapped_state", [(False, None, True), (True, 0.7, False)])
def test_vmapped_lstm_folds_samples_into_the_batch(direction, peephole, clip, mapped_state):
    """A list predict vmaps the lstm over its samples; the samples join the recurrence's batch
    (single rows run batch-major, several feature-major): each sample's outputs and final states
    equal the op on that sample alone, with the initial state per sample or one shared constant;
    reverse-mode gradients of a vmapped loss equal those of a loop over the samples."""
    import jax
    import jax.numpy as jnp
    s, i, h, samples = 5, 3, 4, 4
    dirs = 2 if direction == "bidirectional" else 1
    ws = [RNG.uniform(-1, 1, shape).astype(np.float32) for shape in ((4 * h, i), (4 * h, h), (4 * h,))]
    extra = {}
    if peephole:
        extra["peephole"] = RNG.uniform(-1, 1, 3 * h).astype(np.float32)
    if direction == "bidirectional":
        back = [RNG.uniform(-1, 1, w.shape).astype(np.float32) for w in ws]
        extra.update(weight_ih_back=back[0], weight_hh_back=back[1], bias_back=back[2])
        if peephole:
            extra["peephole_back"] = RNG.uniform(-1, 1, 3 * h).astype(np.float32)
    xs = RNG.standard_normal((samples, s, 1, i)).astype(np.float32)
    h0s = RNG.standard_normal((samples, 1, dirs * h)).astype(np.float32)
    shared = RNG.standard_normal((1, dirs * h)).astype(np.float32)

    def one(x, h0, *w):
        return rc.lstm(x, h0, h0 * 0.5, *w, direction=direction, output_sequence=True, clip=clip,
                       **{k: v for k, v in extra.items()})

    if mapped_state:
        got = jax.jit(jax.vmap(lambda x, h0, *w: one(x, h0, *w), in_axes=(0, 0, None, None, None)))(xs, h0s, *ws)
        want = [one(x, h0, *ws) for x, h0 in zip(xs, h0s)]
    else:
        got = jax.jit(jax.vmap(lambda x, *w: one(x, shared, *w), in_axes=(0, None, None, None)))(xs, *ws)
        want = [one(x, shared, *ws) for x in xs]
    for k in range(3):
        assert_close(got[k], np.stack([np.asarray(w[k]) for w in want]), rtol=1e-5, atol=1e-5)

    def loss_vmapped(x, w_hh):
        y, hT, _ = jax.vmap(lambda a, b: one(a, b, ws[0], w_hh, ws[2]))(x, h0s)
        return (y ** 2).sum() + hT.sum()

    def loss_loop(x, w_hh):
        total = 0.0
        for a, b in zip(x, h0s):
            y, hT, _ = one(a, b, ws[0], w_hh, ws[2])
            total = total + (y ** 2).sum() + hT.sum()
        return total
    g1 = jax.jit(jax.grad(loss_vmapped, argnums=(0, 1)))(jnp.asarray(xs), jnp.asarray(ws[1]))
    g2 = jax.grad(loss_loop, argnums=(0, 1))(jnp.asarray(xs), jnp.asarray(ws[1]))
    for a, b in zip(g1, g2):
        assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op,reset_after", [("gru", False), ("gru", True), ("rnn", False)])
@pytest.mark.parametrize("rows", [1, 2])
def test_vmapped_gru_and_rnn_fold_samples_into_the_batch(op, reset_after, rows):
    """gru and rnn as lstm above: vmapped over samples of ``rows`` rows each (folded into one
    feature-major recurrence), equal to the op per sample, gradients equal to a loop's."""
    import jax
    import jax.numpy as jnp
    s, i, h, samples = 6, 3, 5, 3
    gates = 3 if op == "gru" else 1
    ws = [RNG.uniform(-1, 1, shape).astype(np.float32) for shape in ((gates * h, i), (gates * h, h), (gates * h,))]
    xs = RNG.standard_normal((samples, s, rows, i)).astype(np.float32)
    h0s = RNG.standard_normal((samples, rows, h)).astype(np.float32)
    if op == "gru":
        def one(x, h0, w_hh):
            return rc.gru_iOS18(x, h0, ws[0], w_hh, ws[2], ws[2] * 0.5, direction="reverse",
                                output_sequence=True, reset_after=reset_after)
    else:
        def one(x, h0, w_hh):
            return rc.rnn(x, h0, ws[0], w_hh, ws[2], output_sequence=True, activation="relu")
    got = jax.jit(jax.vmap(one, in_axes=(0, 0, None)))(xs, h0s, ws[1])
    want = [one(x, h0, ws[1]) for x, h0 in zip(xs, h0s)]
    for k in range(2):
        assert_close(got[k], np.stack([np.asarray(w[k]) for w in want]), rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda x, w: sum(((y ** 2).sum() + hT.sum()) for y, hT in f(x, w))
    vm = loss(lambda x, w: [jax.vmap(one, in_axes=(0, 0, None))(x, h0s, w)])
    lp = loss(lambda x, w: [one(a, b, w) for a, b in zip(x, h0s)])
    g1 = jax.jit(jax.grad(vm, argnums=(0, 1)))(jnp.asarray(xs), jnp.asarray(ws[1]))
    g2 = jax.grad(lp, argnums=(0, 1))(jnp.asarray(xs), jnp.asarray(ws[1]))
    for a, b in zip(g1, g2):
        assert_close(a, b, rtol=1e-4, atol=1e-4)
