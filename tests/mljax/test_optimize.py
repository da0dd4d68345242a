"""Graph optimizations: each pass fires on its pattern and the results equal the unoptimized
program's and a NumPy reference."""
import numpy as np
import pytest

import mljax
from mljax.optimize.passes import _static_shape
from helpers import convert_mil, tmp_path_for

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 12)).astype(np.float32)


def _both(build, inputs, *, fp16=False, precision="auto"):
    path = _convert_unoptimized(build, fp16) if not fp16 else convert_mil(build, fp16=True)
    on = mljax.MLModel(path, compute_precision=precision)
    off = mljax.MLModel(path, compute_precision=precision, optimize=False)
    return on, on.predict(inputs), off.predict(inputs)


def _convert_unoptimized(build, fp16):
    """The program as written: coremltools' own graph passes off (they would merge these too)."""
    model = ct.convert(build(), convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       pass_pipeline=ct.PassPipeline.EMPTY, compute_precision=ct.precision.FLOAT32)
    path = tmp_path_for("unoptimized.mlpackage")
    model.save(str(path))
    return path


def _stats(model):
    return model.stage.lowered.optimizations


def _program_transposes():
    @mb.program(input_specs=[mb.TensorSpec((2, 3, 4, 5), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        a = mb.transpose(x=x, perm=[0, 2, 3, 1])
        b = mb.transpose(x=a, perm=[0, 3, 1, 2])          # undoes a: identity overall
        c = mb.transpose(x=mb.relu(x=b), perm=[3, 2, 1, 0])
        d = mb.transpose(x=c, perm=[1, 0, 3, 2])          # merges with c
        e = mb.reshape(x=mb.reshape(x=d, shape=[4, 30]), shape=[2, 60])
        f = mb.reshape(x=mb.identity(x=e), shape=[2, 60])  # to its own shape
        return mb.add(x=f, y=np.float32(1.0), name="y")
    return prog


def test_transposes_reshapes_and_identities(tmp_path):
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    model, on, off = _both(_program_transposes, {"x": x})
    want = (np.maximum(x, 0).transpose(3, 2, 1, 0).transpose(1, 0, 3, 2).reshape(2, 60) + 1)
    np.testing.assert_array_equal(on["y"], want)
    np.testing.assert_array_equal(off["y"], want)
    s = _stats(model)
    assert s["merge_transposes"] >= 2 and s["merge_reshapes"] >= 1 and s["remove_identity_ops"] >= 1
    assert s["dead_code"] >= 3
    kept = [op.type for op in model.stage.lowered.fn.block.operations if op.type != "const"]
    assert kept.count("transpose") == 1 and kept.count("reshape") == 1 and "identity" not in kept


def _program_fp16():
    @mb.program(input_specs=[mb.TensorSpec((3, 12), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.softmax(x=mb.linear(x=x, weight=W), axis=-1, name="p")
    return prog


@pytest.mark.parametrize("precision", ["auto", "declared"])
def test_casts_of_an_fp16_program(precision):
    x = RNG.standard_normal((3, 12)).astype(np.float32)
    model, on, off = _both(_program_fp16, {"x": x}, fp16=True, precision=precision)
    np.testing.assert_array_equal(on["p"], off["p"])
    logits = x.astype(np.float16).astype(np.float32) @ W.astype(np.float16).astype(np.float32).T
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(on["p"].astype(np.float32), want, atol=2e-3 if precision == "auto" else 1e-2)
    # fp16 -> fp32 compute: the input cast is a no-op and goes (the output cast, a program
    # output, keeps its name); computed in declared types both casts are real and stay
    removed = _stats(model)["remove_noop_casts"]
    assert removed == (1 if precision == "auto" else 0)


def test_the_saved_program_is_the_loaded_one(tmp_path):
    """Optimizing works on a copy: save writes the program as it was read."""
    x = RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
    model, on, _ = _both(_program_transposes, {"x": x})
    out = model.save(tmp_path / "again.mlpackage")
    spec = mljax.MLModel(out, optimize=False).get_spec()
    ops = [op.type for op in spec.mlProgram.functions["main"].block_specializations["CoreML7"].operations]
    assert ops.count("transpose") == 4 and "identity" in ops
    np.testing.assert_array_equal(mljax.MLModel(out).predict({"x": x})["y"], on["y"])


WQ, WK, WV, WO = (RNG.standard_normal((n, 12)).astype(np.float32) for n in (8, 8, 4, 5))
BQ, BK, BV = (RNG.standard_normal(n).astype(np.float32) for n in (8, 8, 4))


def _program_parallel_linears():
    @mb.program(input_specs=[mb.TensorSpec((3, 12), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        q = mb.linear(x=x, weight=WQ, bias=BQ)
        k = mb.linear(x=x, weight=WK, bias=BK)
        v = mb.linear(x=x, weight=WV, bias=BV)
        o = mb.linear(x=x, weight=WO)                       # MIL's default bias (zeros) is a const too
        s = mb.matmul(x=q, y=k, transpose_y=True)
        return mb.concat(values=[mb.matmul(x=s, y=v), o], axis=-1, name="y")
    return prog


def test_parallel_linears_merge_into_one_product():
    x = RNG.standard_normal((3, 12)).astype(np.float32)
    model, on, off = _both(_program_parallel_linears, {"x": x})
    q, k, v = x @ WQ.T + BQ, x @ WK.T + BK, x @ WV.T + BV
    want = np.concatenate([(q @ k.T) @ v, x @ WO.T], -1)
    np.testing.assert_allclose(on["y"], want, rtol=1e-5, atol=1e-4)
    # one product against four: float32 sums in another order (values up to ~150: 1e-5 relative)
    np.testing.assert_allclose(on["y"], off["y"], rtol=1e-5, atol=1e-5)
    assert _stats(model)["merge_parallel_linears"] == 4
    fn = model.stage.lowered.fn
    assert sum(op.type == "linear" for op in fn.block.walk()) == 1
    # the weights stay separate, trainable arguments
    assert {w.shape for w in model.weights.values()} >= {WQ.shape, WV.shape, WO.shape}


def test_an_op_missing_a_required_const_input_is_an_mljax_error(tmp_path):
    """A transpose whose ``perm`` was removed from the file: OpError naming the op (not a raw
    TypeError from the op's signature), with the graph passes on and off."""
    from mljax.errors import MLJaxError
    path = _convert_unoptimized(_program_transposes, False)
    spec = mljax.MLModel(path).get_spec()
    block = spec.mlProgram.functions["main"].block_specializations["CoreML7"]
    op = next(o for o in block.operations if o.type == "transpose")
    del op.inputs["perm"]
    weights = path / "Data" / "com.apple.CoreML" / "weights"
    for optimize in (True, False):
        with pytest.raises(MLJaxError, match="transpose"):
            mljax.MLModel(spec, weights_dir=weights, optimize=optimize).predict(
                {"x": np.zeros((2, 3, 4, 5), np.float32)})


def _program_convs_after_activations():
    wd = RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 4, 7, 6), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        dw = dict(weight=wd, pad_type="same", groups=4)
        a = mb.conv(x=mb.silu(x=x), **dw)                          # costly
        b = mb.conv(x=mb.mul(x=x, y=mb.sigmoid(x=x)), **dw)         # x * sigmoid(x): costly
        c = mb.conv(x=mb.relu(x=x), **dw)                          # cheap
        return mb.add(x=mb.add(x=a, y=b), y=c, name="y")
    return prog, wd


def test_convs_after_costly_activations_get_the_padding_hint(monkeypatch):
    """The hint marks the two convolutions fed by SiLU and x * sigmoid(x), not the one after ReLU, and
    reaches the convolution through the lowering (not with optimize=False); the values equal the
    unoptimized program's and torch's, for one sample and for a list."""
    import torch
    import torch.nn.functional as F
    from mljax.ops import conv as conv_ops
    from mljax.ops._registry import HINTS
    prog, wd = _program_convs_after_activations()
    xs = RNG.standard_normal((3, 1, 4, 7, 6)).astype(np.float32)
    hints, plain = [], conv_ops.convolution
    monkeypatch.setattr(conv_ops, "convolution", lambda *a, **k: hints.append(k["after_costly_op"]) or plain(*a, **k))
    model, on, off = _both(lambda: prog, {"x": xs[0]})
    assert sorted(hints) == [False] * 4 + [True] * 2       # optimized: 2 of 3 hinted; unoptimized: none
    assert _stats(model)["mark_convs_after_costly_ops"] == 2
    marked = {op.input("x").name: op.attributes.get(HINTS, {}).get("after_costly_op", False)
              for op in model.stage.lowered.fn.block.operations if op.type == "conv"}
    assert sorted(marked.values()) == [False, True, True]

    def ref(x):
        t, w = torch.from_numpy(x).double(), torch.from_numpy(wd).double()
        dw = lambda u: F.conv2d(u, w, padding=1, groups=4)  # noqa: E731
        return (dw(F.silu(t)) + dw(t * torch.sigmoid(t)) + dw(torch.relu(t))).numpy()
    for got in (on["y"], off["y"]):
        np.testing.assert_allclose(got, ref(xs[0]), rtol=1e-5, atol=1e-5)
    listed = model.predict([{"x": x} for x in xs])
    for x, out in zip(xs, listed):
        np.testing.assert_allclose(out["y"], ref(x), rtol=1e-5, atol=1e-5)


def _program_depthwise_block():
    """A MobileNet-style block: first layer (im2col), depthwise, squeeze-and-excitation, 1x1, pool."""
    w0 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    wd = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32) * 0.3
    w1 = RNG.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3
    w2 = RNG.standard_normal((8, 4, 1, 1)).astype(np.float32) * 0.3
    wp = RNG.standard_normal((6, 8, 1, 1)).astype(np.float32) * 0.3

    @mb.program(input_specs=[mb.TensorSpec((1, 3, 12, 10), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        a = mb.relu(x=mb.conv(x=x, weight=w0, strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1]))
        d = mb.silu(x=mb.conv(x=a, weight=wd, pad_type="same", groups=8))
        se = mb.reduce_mean(x=d, axes=[2, 3], keep_dims=True)
        se = mb.sigmoid(x=mb.conv(x=mb.relu(x=mb.conv(x=se, weight=w1)), weight=w2))
        p = mb.conv(x=mb.mul(x=d, y=se), weight=wp)
        pooled = mb.reduce_mean(x=mb.add(x=p, y=np.float32(0.5)), axes=[2, 3], keep_dims=True)
        return mb.reshape(x=pooled, shape=[1, 6], name="y"), mb.identity(x=p, name="map")
    return prog, (w0, wd, w1, w2, wp)


def _torch_block(x, ws):
    import torch
    import torch.nn.functional as F
    w0, wd, w1, w2, wp = (torch.from_numpy(w).double() for w in ws)
    a = torch.relu(F.conv2d(torch.from_numpy(x).double(), w0, stride=2, padding=1))
    d = F.silu(F.conv2d(a, wd, padding=1, groups=8))
    se = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(d.mean((2, 3), keepdim=True), w1)), w2))
    p = F.conv2d(d * se, wp)
    return (p + 0.5).mean((2, 3)).numpy(), p.numpy()


def test_depthwise_networks_run_channel_last():
    """The block's ops become one channel-last region (its convs hinted, the depthwise and 1x1
    weights re-laid out by the weight prologue); single and list predicts equal torch's and the
    unoptimized program's, the output read inside the region (``map``) keeps its layout."""
    from mljax.ops._registry import HINTS
    prog, ws = _program_depthwise_block()
    xs = RNG.standard_normal((3, 1, 3, 12, 10)).astype(np.float32)
    model, on, off = _both(lambda: prog, {"x": xs[0]})
    assert _stats(model)["channels_last_regions"] >= 10
    convs = [op.attributes.get(HINTS, {}) for op in model.stage.lowered.fn.block.operations if op.type == "conv"]
    assert all(h.get("channels_last") for h in convs)
    # every weight laid out HWIO (the stem's too: each tap's output channels contiguous); the stem
    # reads the channel-first input; the projection reading the squeeze-and-excitation product
    # became a batched product by per-image weights (30 positions per image >= 2 * 8 channels)
    assert _stats(model)["fold_channel_scales"] == 1
    assert [bool(h.get("weight_hwio")) for h in convs] == [True, True, True, True]
    assert [bool(h.get("first_in")) for h in convs] == [True, False, False, False]
    assert sorted(op.type for op in model.stage.lowered.prologue) == ["reshape"] + ["transpose"] * 5
    pools = [op.attributes.get(HINTS, {}).get("pool_by_product", False)
             for op in model.stage.lowered.fn.block.operations if op.type == "reduce_mean"]
    assert sorted(pools) == [False, True]     # squeeze-and-excitation stays a reduction; the global pool not
    _check_y_and_map(model, on, off, xs, lambda x: _torch_block(x, ws), 1e-5)


def _check_y_and_map(model, on, off, xs, reference, tol):
    """Outputs ``y`` and ``map`` of the optimized (``on``) and unoptimized (``off``) single predicts
    of ``xs[0]``, and of the optimized list predict of every sample, equal ``reference(x)``."""
    y, fmap = reference(xs[0])
    for got in (on, off):
        np.testing.assert_allclose(got["y"], y, rtol=tol, atol=tol)
        np.testing.assert_allclose(got["map"], fmap, rtol=tol, atol=tol)
    for x, out in zip(xs, model.predict([{"x": x} for x in xs])):
        y, fmap = reference(x)
        np.testing.assert_allclose(out["y"], y, rtol=tol, atol=tol)
        np.testing.assert_allclose(out["map"], fmap, rtol=tol, atol=tol)


def test_prepared_weights_follow_the_weights():
    """Predict computes the prologue once per weight values: a model with other weights
    (``with_weights``) predicts with them, and gradients through ``stage.fn`` (which computes the
    prologue itself) reach the program's own weight, equal to the unoptimized program's."""
    import jax
    prog, ws = _program_depthwise_block()
    x = RNG.standard_normal((1, 3, 12, 10)).astype(np.float32)
    model, _, _ = _both(lambda: prog, {"x": x})
    plain = mljax.MLModel(model.package_path, optimize=False)
    name = next(k for k, v in model.weights.items() if np.shape(v) == (8, 1, 3, 3))
    new = {**model.weights, name: model.weights[name] * -2.0}
    ws2 = (ws[0], np.asarray(new[name]), *ws[2:])
    before = model.predict({"x": x})["y"]
    np.testing.assert_allclose(model.with_weights(new).predict({"x": x})["y"], _torch_block(x, ws2)[0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict({"x": x})["y"], before)        # the model itself is unchanged

    def grad(m, key):
        loss = lambda w: m.stage.fn(w, {"x": x}, {})[0]["y"].sum()   # noqa: E731
        return np.asarray(jax.grad(loss)(m.weights)[key])
    proj = next(k for k, v in model.weights.items() if np.shape(v) == (6, 8, 1, 1))   # the folded projection
    for key in (name, proj):
        np.testing.assert_allclose(grad(model, key), grad(plain, key), rtol=1e-4, atol=1e-6)
        assert np.abs(grad(model, key)).max() > 0


@pytest.mark.parametrize("c,h,w,folds", [(4, 4, 3, 1), (8, 3, 2, 0)])
def test_channel_scales_fold_into_the_projection_where_maps_are_large(c, h, w, folds):
    """A 1x1 conv with bias reading a depthwise output times a per-image channel gate: folded into
    one product by per-image weights where an image has at least 2 * C positions, left alone
    where it has fewer; torch's values either way, single and list predicts."""
    import torch
    import torch.nn.functional as F
    wd = RNG.standard_normal((c, 1, 3, 3)).astype(np.float32)
    wg = RNG.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.5
    wp, bp = RNG.standard_normal((5, c, 1, 1)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, c, h, w), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        d = mb.relu(x=mb.conv(x=x, weight=wd, pad_type="same", groups=c))
        gate = mb.sigmoid(x=mb.conv(x=mb.reduce_mean(x=d, axes=[2, 3], keep_dims=True), weight=wg))
        return mb.conv(x=mb.mul(x=gate, y=d), weight=wp, bias=bp, name="y")
    xs = RNG.standard_normal((3, 1, c, h, w)).astype(np.float32)
    model, on, off = _both(lambda: prog, {"x": xs[0]})
    assert _stats(model)["fold_channel_scales"] == folds

    def ref(x):
        t = torch.from_numpy
        d = F.relu(F.conv2d(t(x).double(), t(wd).double(), padding=1, groups=c))
        gate = torch.sigmoid(F.conv2d(d.mean((2, 3), keepdim=True), t(wg).double()))
        return F.conv2d(d * gate, t(wp).double(), t(bp).double()).numpy()
    for got in (on, off):
        np.testing.assert_allclose(got["y"], ref(xs[0]), rtol=1e-5, atol=1e-5)
    for x, out in zip(xs, model.predict([{"x": x} for x in xs])):
        np.testing.assert_allclose(out["y"], ref(x), rtol=1e-5, atol=1e-5)


def test_flexible_inputs_keep_the_channel_first_layout():
    """With a flexible input the shapes are one case among many (symbolic in the program): no region
    forms (its global pool's product would bake one size in), and every size equals torch's."""
    import torch
    import torch.nn.functional as F
    from coremltools.converters.mil.mil import get_new_symbol
    wd = RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)
    h, w = get_new_symbol(), get_new_symbol()

    @mb.program(input_specs=[mb.TensorSpec((1, 4, h, w), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        d = mb.relu(x=mb.conv(x=x, weight=wd, pad_type="same", groups=4))
        return mb.reduce_mean(x=d, axes=[2, 3], keep_dims=True, name="y")
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       inputs=[ct.TensorType("x", shape=(1, 4, ct.RangeDim(3, 12), ct.RangeDim(3, 12)))],
                       compute_precision=ct.precision.FLOAT32)
    path = tmp_path_for("flexible.mlpackage")
    model.save(str(path))
    m = mljax.MLModel(path)
    assert _stats(m)["channels_last_regions"] == 0
    for shape in ((1, 4, 5, 7), (1, 4, 12, 9)):
        x = RNG.standard_normal(shape).astype(np.float32)
        ref = F.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(wd), padding=1, groups=4)).mean((2, 3), keepdim=True)
        np.testing.assert_allclose(m.predict({"x": x})["y"], ref.numpy(), rtol=1e-5, atol=1e-6)


def test_channel_last_regions_cover_concat_reductions_multipliers_and_outside_operands():
    """A region holding a depthwise conv with a channel multiplier, a strided dilated one, a concat
    along channels, a max over channels, and the input entering twice through one transpose:
    the optimized program equals torch's and the unoptimized program's."""
    import torch
    import torch.nn.functional as F
    w1 = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32)      # multiplier 2 over 4 channels
    w2 = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32)
    wp = RNG.standard_normal((4, 16, 1, 1)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 4, 11, 9), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        a = mb.relu(x=mb.conv(x=x, weight=w1, pad_type="same", groups=4))                     # 8 channels
        b = mb.conv(x=a, weight=w2, groups=8, strides=[2, 2], dilations=[2, 2], pad_type="custom", pad=[2, 2, 2, 2])
        up = mb.conv(x=a, weight=np.ones((8, 1, 1, 1), np.float32), groups=8, strides=[2, 2])  # 8 channels, 6x5
        c = mb.concat(values=[b, up], axis=1)                                                  # 16 channels
        m = mb.reduce_max(x=c, axes=[1], keep_dims=True)
        p = mb.conv(x=mb.sub(x=c, y=m), weight=wp)
        xs = mb.conv(x=x, weight=np.ones((4, 1, 1, 1), np.float32), groups=4, strides=[2, 2])  # 4 channels, 6x5
        return mb.add(x=p, y=mb.mul(x=xs, y=np.float32(0.5)), name="y")
    x = RNG.standard_normal((1, 4, 11, 9)).astype(np.float32)
    model, on, off = _both(lambda: prog, {"x": x})
    assert _stats(model)["channels_last_regions"] >= 9
    t = torch.from_numpy(x).double()
    tw = lambda w: torch.from_numpy(w).double()   # noqa: E731
    a = torch.relu(F.conv2d(t, tw(w1), padding=1, groups=4))
    b = F.conv2d(a, tw(w2), stride=2, dilation=2, padding=2, groups=8)
    c = torch.cat([b, a[:, :, ::2, ::2]], 1)
    ref = F.conv2d(c - c.amax(1, keepdim=True), tw(wp)) + 0.5 * t[:, :, ::2, ::2]
    for got in (on["y"], off["y"]):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)


def _program_residual_block():
    """A ResNet-style stem and block: a 5x5 stride-2 conv (XLA's convolution), max pool, two 3x3
    convs (Winograd or im2col by shape) with a residual add, an average pool, the global pool."""
    w0 = RNG.standard_normal((16, 3, 5, 5)).astype(np.float32) * 0.2
    w1 = RNG.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1
    w2 = RNG.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1
    b0 = RNG.standard_normal(16).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 3, 64, 64), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        a = mb.relu(x=mb.conv(x=x, weight=w0, bias=b0, strides=[2, 2], pad_type="custom", pad=[2, 2, 2, 2]))
        p = mb.max_pool(x=a, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1])
        c = mb.conv(x=mb.relu(x=mb.conv(x=p, weight=w1, pad_type="same")), weight=w2, pad_type="same")
        r = mb.relu(x=mb.add(x=c, y=p))
        q = mb.avg_pool(x=r, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid")
        return mb.reshape(x=mb.reduce_mean(x=q, axes=[2, 3], keep_dims=True), shape=[1, 16], name="y"), \
            mb.identity(x=q, name="map")
    return prog, (w0, b0, w1, w2)


def _torch_residual(x, ws):
    import torch
    import torch.nn.functional as F
    w0, b0, w1, w2 = (torch.from_numpy(w).double() for w in ws)
    a = torch.relu(F.conv2d(torch.from_numpy(x).double(), w0, b0, stride=2, padding=2))
    p = F.max_pool2d(a, 3, 2, padding=1)
    r = torch.relu(F.conv2d(torch.relu(F.conv2d(p, w1, padding=1)), w2, padding=1) + p)
    q = F.avg_pool2d(r, 2, 2)
    return q.mean((2, 3)).numpy(), q.numpy()


def test_dense_networks_run_channel_last():
    """Dense spatial convs seed channel-last regions too: the stem, both pools, the 3x3 convs and
    the residual add are one region (no transposes between them); single and list predicts equal
    torch's and the unoptimized program's."""
    from mljax.ops._registry import HINTS
    prog, ws = _program_residual_block()
    xs = RNG.standard_normal((3, 1, 3, 64, 64)).astype(np.float32)
    model, on, off = _both(lambda: prog, {"x": xs[0]})
    ops = model.stage.lowered.fn.block.operations
    hinted = {op.type: [] for op in ops}
    for op in ops:
        hinted[op.type].append(bool(op.attributes.get(HINTS, {}).get("channels_last")))
    assert hinted["conv"] == [True] * 3 and hinted["max_pool"] == [True] and hinted["avg_pool"] == [True]
    # three transposes: the input enters the region; the pooled map (read by identity) and the
    # global pool (read by reshape) leave it; none between the region's ops
    assert len([op for op in ops if op.type == "transpose"]) == 3
    _check_y_and_map(model, on, off, xs, lambda x: _torch_residual(x, ws), 1e-4)


@pytest.mark.parametrize("pool,read_once", [((2, 2), True), ((3, 2), False)])
def test_a_first_layer_read_once_by_its_pool(pool, read_once):
    """A first layer whose only reader (through its ReLU) is a pool of non-overlapping windows gets
    the hint ``read_once`` (no row loop); overlapping windows do not; both equal torch."""
    import torch
    import torch.nn.functional as F

    from mljax.ops._registry import HINTS
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    (k, s) = pool

    @mb.program(input_specs=[mb.TensorSpec((1, 3, 16, 16), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        a = mb.relu(x=mb.conv(x=x, weight=w, pad_type="same"))
        return mb.max_pool(x=a, kernel_sizes=[k, k], strides=[s, s], pad_type="valid", name="y")
    xs = RNG.standard_normal((2, 1, 3, 16, 16)).astype(np.float32)
    model, on, off = _both(lambda: prog, {"x": xs[0]})
    (conv,) = [op for op in model.stage.lowered.fn.block.operations if op.type == "conv"]
    assert conv.attributes[HINTS].get("first_in") and bool(conv.attributes[HINTS].get("read_once")) == read_once
    for x, got in zip(xs, model.predict([{"x": x} for x in xs])):
        ref = F.max_pool2d(torch.relu(F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(),
                                               padding=1)), k, s).numpy()
        np.testing.assert_allclose(got["y"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(on["y"], off["y"], rtol=1e-5, atol=1e-5)


# --- attention -------------------------------------------------------------------------------
AT, AH, AD = 6, 2, 8                        # tokens, heads, head size
CAUSAL = np.triu(np.full((1, 1, AT, AT), -1e4, np.float32), 1)


def _np_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _program_attention(scale_op, mask, k_layout, weights_out=False, scores_twice=False):
    """q, k, v [1, T, H*D] -> heads -> ``matmul(softmax(q k^T * c + mask), v)`` -> [1, T, H*D]."""
    spec = [mb.TensorSpec((1, AT, AH * AD), dtype=types.fp32) for _ in range(3)]

    @mb.program(input_specs=spec, opset_version=ct.target.iOS17)
    def prog(q, k, v):
        heads = lambda a, perm: mb.transpose(x=mb.reshape(x=a, shape=[1, AT, AH, AD]), perm=perm)  # noqa: E731
        qh, vh = heads(q, [0, 2, 1, 3]), heads(v, [0, 2, 1, 3])
        if k_layout == "transpose_y":
            s = mb.matmul(x=qh, y=heads(k, [0, 2, 1, 3]), transpose_y=True)
        else:                                    # K^T laid out by a transpose, as BERT's export does
            s = mb.matmul(x=qh, y=heads(k, [0, 2, 3, 1]))
        if scale_op == "mul":
            s = mb.mul(x=s, y=np.float32(AD ** -0.5))
        elif scale_op == "mul_const_first":
            s = mb.mul(x=np.float32(AD ** -0.5), y=s)
        elif scale_op == "real_div":
            s = mb.real_div(x=s, y=np.float32(AD ** 0.5))
        if mask is not None:
            s = mb.add(x=mask, y=s)
        outs = []
        if scores_twice:
            outs.append(mb.reduce_max(x=s, axes=[-1], keep_dims=False, name="smax"))
        w = mb.softmax(x=s, axis=-1, name="weights") if weights_out else mb.softmax(x=s, axis=-1)
        o = mb.matmul(x=w, y=vh)
        y = mb.reshape(x=mb.transpose(x=o, perm=[0, 2, 1, 3]), shape=[1, AT, AH * AD], name="y")
        return (y, w, *outs) if weights_out else (y, *outs)
    return prog


def _np_attention(q, k, v, scale, mask):
    heads = lambda a: a.reshape(1, AT, AH, AD).transpose(0, 2, 1, 3)   # noqa: E731
    s = heads(q) @ heads(k).transpose(0, 1, 3, 2) * scale + (0 if mask is None else mask)
    w = _np_softmax(s)
    return (w @ heads(v)).transpose(0, 2, 1, 3).reshape(1, AT, AH * AD), w


@pytest.mark.parametrize("scale_op,mask,k_layout", [
    ("mul", CAUSAL, "transpose_y"), ("real_div", None, "transposed"), ("mul_const_first", CAUSAL, "transposed"),
    (None, None, "transpose_y")])
def test_attention_fuses_into_one_op(scale_op, mask, k_layout):
    """The chain coremltools writes for a torch attention runs as one ``mljax.attention``; single
    and list predicts equal NumPy and the unoptimized program."""
    feeds = [{n: RNG.standard_normal((1, AT, AH * AD)).astype(np.float32) for n in "qkv"} for _ in range(3)]
    model, on, off = _both(lambda: _program_attention(scale_op, mask, k_layout), feeds[0])
    assert _stats(model)["fuse_attention"] == 1
    types_ = [op.type for op in model.stage.lowered.fn.block.walk()]
    assert "mljax.attention" in types_ and "softmax" not in types_
    scale = 1.0 if scale_op is None else AD ** -0.5
    want = _np_attention(feeds[0]["q"], feeds[0]["k"], feeds[0]["v"], scale, mask)[0]
    np.testing.assert_allclose(on["y"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(on["y"], off["y"], rtol=1e-5, atol=1e-6)
    for f, out in zip(feeds, model.predict(feeds)):
        want = _np_attention(f["q"], f["k"], f["v"], scale, mask)[0]
        np.testing.assert_allclose(out["y"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights_out,scores_twice", [(True, False), (False, True)])
def test_attention_whose_parts_are_read_elsewhere_stays_a_chain(weights_out, scores_twice):
    """Attention weights that are a model output, or scores another op also reads, keep the chain."""
    feed = {n: RNG.standard_normal((1, AT, AH * AD)).astype(np.float32) for n in "qkv"}
    model, on, off = _both(lambda: _program_attention("mul", CAUSAL, "transpose_y", weights_out, scores_twice), feed)
    assert _stats(model)["fuse_attention"] == 0
    y, w = _np_attention(feed["q"], feed["k"], feed["v"], AD ** -0.5, CAUSAL)
    np.testing.assert_allclose(on["y"], y, rtol=1e-5, atol=1e-5)
    if weights_out:
        np.testing.assert_allclose(on["weights"], w, rtol=1e-5, atol=1e-6)


# --- bias into the product -------------------------------------------------------------------
WH = RNG.standard_normal((16, 6)).astype(np.float32)       # 16 >= 2 x 6 features: a wide head
BH = RNG.standard_normal(16).astype(np.float32)
WN = RNG.standard_normal((8, 6)).astype(np.float32)        # 8 < 2 x 6: stays as it is


def _program_heads():
    @mb.program(input_specs=[mb.TensorSpec((3, 6), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        # three inputs: linears of one input would merge into one product first
        wide = mb.linear(x=mb.relu(x=x), weight=WH, bias=BH, name="y")              # a function output
        inner = mb.linear(x=mb.sigmoid(x=x), weight=WH, bias=BH)                    # read by another op
        narrow = mb.linear(x=mb.tanh(x=x), weight=WN, bias=BH[:8], name="narrow")
        return wide, mb.reduce_sum(x=inner, axes=[-1], name="s"), narrow
    return prog


def test_a_wide_output_head_takes_its_bias_into_the_product():
    xs = [RNG.standard_normal((3, 6)).astype(np.float32) for _ in range(3)]
    model, on, off = _both(_program_heads, {"x": xs[0]})
    assert _stats(model)["bias_into_product"] == 1
    ops = {op.outputs[0].name: op for op in model.stage.lowered.fn.block.walk() if op.outputs}
    assert ops["y"].attributes["_mljax_hints"].get("bias_in_product")
    assert _static_shape(ops["y"].input("weight")) == (16, 7)
    for x, out in zip(xs, [on] + model.predict([{"x": x} for x in xs[1:]])):
        sig = 1 / (1 + np.exp(-x))
        np.testing.assert_allclose(out["y"], np.maximum(x, 0) @ WH.T + BH, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["s"], (sig @ WH.T + BH).sum(-1), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(out["narrow"], np.tanh(x) @ WN.T + BH[:8], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(on["y"], off["y"], rtol=1e-6, atol=1e-6)
    # the weight and bias stay the program's own (trainable) arguments: d sum(y) / d bias = rows
    import jax

    def total(weights):
        out, _ = model.stage.fn(weights, {"x": xs[0]}, {})
        return out["y"].sum()
    grads = jax.grad(total)({k: np.asarray(w) for k, w in model.weights.items()})
    biases = [k for k, w in model.weights.items() if np.shape(w) == BH.shape and np.allclose(w, BH)]
    assert any(np.allclose(grads[k], 3.0) for k in biases)       # y's bias: one per row of x


def _np_lstm_steps(x, w_ih, w_hh, bias):
    """A forward LSTM's hidden states at every step (MIL's gate order i, f, o, z; zero initial state)."""
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h = c = np.zeros((x.shape[1], w_hh.shape[1]))
    out = []
    for t in range(x.shape[0]):
        g_i, g_f, g_o, g_z = np.split(x[t] @ w_ih.T + h @ w_hh.T + bias, 4, axis=-1)
        c = sig(g_f) * c + sig(g_i) * np.tanh(g_z)
        h = sig(g_o) * np.tanh(c)
        out.append(h)
    return np.stack(out)


_LSTM_RNG = np.random.default_rng(7)       # its own stream: the module's RNG feeds the other tests
_LSTM_W = (_LSTM_RNG.uniform(-0.5, 0.5, (16, 3)).astype(np.float32),
           _LSTM_RNG.uniform(-0.5, 0.5, (16, 4)).astype(np.float32), _LSTM_RNG.uniform(-0.5, 0.5, 16).astype(np.float32))


def _program_lstm_step(direction, transposed, step):
    w_ih, w_hh, bias = _LSTM_W

    def build():
        @mb.program(input_specs=[mb.TensorSpec((6, 2, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
        def prog(x):
            zeros = np.zeros((2, 4), np.float32)
            seq, _, _ = mb.lstm(x=x, initial_h=zeros, initial_c=zeros, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                                direction=direction, output_sequence=True)
            if transposed:      # batch-first, then out[:, step] as torch code writes it
                seq = mb.transpose(x=seq, perm=[1, 0, 2])
                begin, squeeze = [0, step, 0], [False, True, False]
            else:
                begin, squeeze = [step, 0, 0], [True, False, False]
            last = mb.slice_by_index(x=seq, begin=begin, end=[0, 0, 0], end_mask=[True, True, True],
                                     squeeze_mask=squeeze)
            return mb.add(x=last, y=np.float32(0.0), name="y")
        return prog
    return build


@pytest.mark.parametrize("direction,transposed,step,fires", [
    ("forward", True, -1, 1), ("forward", False, -1, 1), ("forward", True, 5, 1),
    ("reverse", True, -1, 0), ("forward", True, -2, 0), ("forward", True, 0, 0)])
def test_the_last_step_of_an_lstm_reads_its_final_state(direction, transposed, step, fires):
    """``out[:, -1]`` of a forward lstm's sequence (batch-first or not) reads the final hidden state
    (the sequence then unread); other steps and directions keep the slice.  Values: the
    unoptimized program's, and for the forward lstm NumPy's step loop, single and list predicts."""
    xs = [_LSTM_RNG.standard_normal((6, 2, 3)).astype(np.float32) for _ in range(3)]
    model, on, off = _both(_program_lstm_step(direction, transposed, step), {"x": xs[0]})
    assert _stats(model)["lstm_last_step"] == fires
    ops = [op.type for op in model.stage.lowered.fn.block.operations if op.type != "const"]
    assert ("slice_by_index" in ops) == (not fires)
    np.testing.assert_allclose(on["y"], off["y"], rtol=1e-6, atol=1e-6)
    if direction == "forward":
        outs = [on] + model.predict([{"x": x} for x in xs[1:]])      # a list predict: the folded recurrence
        for x, out in zip(xs, outs):
            np.testing.assert_allclose(out["y"], _np_lstm_steps(x.astype(np.float64), *_LSTM_W)[step],
                                       rtol=1e-5, atol=1e-5)


def test_linears_in_a_loop_read_their_weights_laid_out_in_out(tmp_path):
    """coremltools writes torch's GRU as a ``while_loop`` of six ``linear``s a step (two after the
    merge of parallel linears): each reads its weight laid out [D_in, D_out] by a transpose in the
    top block.  Values: torch's, single and list predicts, and the unoptimized program's; a
    gradient reaches the original weight through the transpose."""
    import jax
    torch = pytest.importorskip("torch")
    torch.manual_seed(3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.GRU(5, 7, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]
    net = Net().eval()
    x0 = torch.randn(1, 6, 5)
    ml = ct.convert(torch.jit.trace(net, x0), inputs=[ct.TensorType(name="x", shape=(1, 6, 5))],
                    outputs=[ct.TensorType(name="y")], convert_to="mlprogram",
                    minimum_deployment_target=ct.target.iOS16, compute_precision=ct.precision.FLOAT32)
    path = tmp_path / "gru.mlpackage"
    ml.save(str(path))
    model, off = mljax.MLModel(path), mljax.MLModel(path, optimize=False)
    assert _stats(model)["loop_weights_in_out"] == 2
    loop = next(op for op in model.stage.lowered.fn.block.operations if op.type == "while_loop")
    linears = [op for b in loop.blocks for op in b.operations if op.type == "linear"]
    assert len(linears) == 2 and all(op.attributes["_mljax_hints"]["weight_in_out"] for op in linears)
    xs = [np.random.default_rng(i).standard_normal((1, 6, 5)).astype(np.float32) for i in range(3)]
    with torch.no_grad():
        ref = [net(torch.from_numpy(x)).numpy() for x in xs]
    outs = [model.predict({"x": xs[0]})] + model.predict([{"x": x} for x in xs[1:]])
    for x, out, want in zip(xs, outs, ref):
        np.testing.assert_allclose(out["y"], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["y"], off.predict({"x": x})["y"], rtol=1e-6, atol=1e-6)

    def total(weights, m):
        return m.stage.lowered(weights, {"x": xs[0]})[0]["y"].sum()
    # a while_loop has no reverse mode: forward-mode derivatives along each weight, optimized vs not
    rng = np.random.default_rng(4)
    weights = {k: np.asarray(w) for k, w in off.weights.items()}
    for k, w in weights.items():
        if w.dtype.kind != "f":
            continue
        tangents = {j: np.zeros_like(v) if j != k else rng.standard_normal(v.shape).astype(v.dtype)
                    for j, v in weights.items()}
        d = [jax.jvp(lambda ws: total(ws, m), (weights,), (tangents,))[1] for m in (model, off)]
        np.testing.assert_allclose(d[0], d[1], rtol=1e-4, atol=1e-6)


def _program_lstm(direction):
    w_ih, w_hh, bias = _LSTM_W

    def build():
        @mb.program(input_specs=[mb.TensorSpec((6, 2, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
        def prog(x):
            zeros = np.zeros((2, 8 if direction == "bidirectional" else 4), np.float32)
            back = dict(weight_ih_back=w_ih[::-1].copy(), weight_hh_back=w_hh[::-1].copy(), bias_back=bias[::-1].copy()) \
                if direction == "bidirectional" else {}
            seq, h, _ = mb.lstm(x=x, initial_h=zeros, initial_c=zeros, weight_ih=w_ih, weight_hh=w_hh, bias=bias,
                                direction=direction, output_sequence=True, **back)
            return mb.add(x=seq, y=np.float32(0.0), name="y"), mb.add(x=h, y=np.float32(0.0), name="h")
        return prog
    return build


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_an_lstm_reads_its_weights_laid_out_once(direction):
    """An lstm of constant weights runs as ``mljax.lstm`` with ``[w_ih | w_hh]^T`` laid out by the
    weight prologue (both directions' of a bidirectional one).  Values: the unoptimized program's
    for a single predict (2 rows) and list predicts of 2 and 5 samples (4 and 10 rows: recurrences
    of a few rows multiply by the laid-out weights), and NumPy's step loop for the forward lstm;
    gradients reach the weights themselves, equal to the unoptimized program's."""
    xs = [_LSTM_RNG.standard_normal((6, 2, 3)).astype(np.float32) for _ in range(5)]
    model, on, off = _both(_program_lstm(direction), {"x": xs[0]})
    assert _stats(model)["lstm_weights_in_out"] == 1
    op = next(op for op in model.stage.lowered.fn.block.operations if op.type.endswith("lstm"))
    assert op.type == "mljax.lstm"
    assert ("weight_in_out_back" in op.inputs) == (direction == "bidirectional")
    assert _static_shape(op.input("weight_in_out")) == (3 + 4, 16)
    unopt = mljax.MLModel(model.package_path, optimize=False)
    for k in ("y", "h"):
        np.testing.assert_allclose(on[k], off[k], rtol=1e-6, atol=1e-6)
    for n in (2, 5):
        outs, ref = model.predict([{"x": x} for x in xs[:n]]), unopt.predict([{"x": x} for x in xs[:n]])
        for x, a, b in zip(xs, outs, ref):
            for k in ("y", "h"):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
            if direction == "forward":
                np.testing.assert_allclose(a["y"], _np_lstm_steps(x.astype(np.float64), *_LSTM_W), rtol=1e-5, atol=1e-5)
    import jax

    def total(weights, m):
        return m.stage.lowered(weights, {"x": xs[0]})[0]["y"].sum()
    weights = {k: np.asarray(w) for k, w in unopt.weights.items()}
    grads = [jax.grad(total)(weights, m) for m in (model, unopt)]
    for k in weights:
        np.testing.assert_allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)
