"""NeuralNetwork models built with coremltools' NeuralNetworkBuilder, run on mljax, checked with NumPy."""
from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402

import mljax  # noqa: E402
from mljax.errors import UnsupportedError  # noqa: E402

RNG = np.random.default_rng(0)


def _r(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _model(builder):
    return mljax.MLModel(builder.spec)


# --- dense classifier --------------------------------------------------------------------------
@pytest.mark.parametrize("labels", [["cat", "dog", "bird"], [10, 20, 30]])
def test_dense_classifier_labels_and_probabilities(labels):
    w1, b1, w2, b2 = _r(8, 4), _r(8), _r(3, 8), _r(3)
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("probs", None)], mode="classifier")
    b.add_inner_product("dense_1", w1, b1, 4, 8, True, "x", "h")
    b.add_activation("relu", "RELU", "h", "hr")
    b.add_inner_product("dense_2", w2, b2, 8, 3, True, "hr", "logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(labels, predicted_feature_name="label", prediction_blob="probs")
    m = _model(b)
    xs = [_r(4) for _ in range(3)]
    results = m.predict([{"x": x} for x in xs])
    for x, out in zip(xs, results):
        ref = _softmax(w2 @ np.maximum(w1 @ x + b1, 0) + b2)
        assert out["label"] == labels[int(np.argmax(ref))]
        assert set(out["probs"]) == set(labels)
        np.testing.assert_allclose([out["probs"][k] for k in labels], ref, rtol=1e-5, atol=1e-6)
    assert m.predict({"x": xs[0]})["label"] == results[0]["label"]
    layers = m.stage.network.layers
    assert [(l["name"], l["type"]) for l in layers][:2] == [("dense_1", "innerProduct"), ("relu", "activation")]
    np.testing.assert_array_equal(m.weights["dense_1/weight"], w1)
    np.testing.assert_array_equal(m.weights["dense_2/bias"], b2)


def test_network_function_is_differentiable():
    import jax
    import jax.numpy as jnp
    from mljax.neuralnetwork import network_function
    from mljax.proto import Model_pb2
    w1, b1 = _r(3, 4), _r(3)
    b = NeuralNetworkBuilder([("x", datatypes.Array(4))], [("y", None)])
    b.add_inner_product("dense", w1, b1, 4, 3, True, "x", "y")
    fn, weights = network_function(Model_pb2.Model.FromString(b.spec.SerializeToString()))
    x = _r(4)
    grad = jax.grad(lambda w: jnp.sum(fn(w, {"x": x})["y"]))(weights)
    np.testing.assert_allclose(grad["dense/weight"], np.tile(x, (3, 1)), rtol=1e-6)
    np.testing.assert_allclose(grad["dense/bias"], np.ones(3), rtol=1e-6)


# --- activations ---------------------------------------------------------------------------------
_ACTS = {
    "RELU": ({}, lambda x: np.maximum(x, 0)),
    "LEAKYRELU": ({"params": [0.3]}, lambda x: np.where(x >= 0, x, 0.3 * x)),
    "TANH": ({}, np.tanh),
    "SCALED_TANH": ({"params": [1.5, 0.7]}, lambda x: 1.5 * np.tanh(0.7 * x)),
    "SIGMOID": ({}, _sigmoid),
    "SIGMOID_HARD": ({"params": [0.2, 0.5]}, lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    "LINEAR": ({"params": [2.0, -1.0]}, lambda x: 2 * x - 1),
    "ELU": ({"params": 0.8}, lambda x: np.where(x > 0, x, 0.8 * np.expm1(x))),
    "SOFTSIGN": ({}, lambda x: x / (1 + np.abs(x))),
    "SOFTPLUS": ({}, lambda x: np.log1p(np.exp(x))),
    "THRESHOLDEDRELU": ({"params": 0.4}, lambda x: np.where(x > 0.4, x, 0)),
    "PRELU": ({"params": np.array([0.1, 0.2, 0.3], np.float32)},
              lambda x: np.where(x >= 0, x, np.array([0.1, 0.2, 0.3]).reshape(3, 1, 1) * x)),
    "PARAMETRICSOFTPLUS": ({"params": [np.array([1.0, 2.0, 0.5], np.float32), np.array([0.5, 1.0, 2.0], np.float32)]},
                           lambda x: np.array([1.0, 2.0, 0.5]).reshape(3, 1, 1)
                           * np.log1p(np.exp(np.array([0.5, 1.0, 2.0]).reshape(3, 1, 1) * x))),
}


def test_activations():
    """Every activation type, as one model with one output per activation."""
    names = sorted(_ACTS)
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, 2, 2))], [(n, None) for n in names])
    for name in names:
        b.add_activation(f"act_{name}", name, "x", name, **_ACTS[name][0])
    x = _r(3, 2, 2)
    out = _model(b).predict({"x": x})
    for name in names:
        np.testing.assert_allclose(out[name], _ACTS[name][1](x), rtol=1e-5, atol=1e-6, err_msg=name)


# --- small CNN ---------------------------------------------------------------------------------
def _conv_ref(x, w, b, stride, pad):
    """NumPy cross-correlation: x [C,H,W], w [O,I,kh,kw], pad ((t,b),(l,r))."""
    xp = np.pad(x, ((0, 0),) + tuple(pad))
    o, _, kh, kw = w.shape
    hout = (xp.shape[1] - kh) // stride + 1
    wout = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((o, hout, wout), np.float64)
    for i in range(hout):
        for j in range(wout):
            patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, i, j] = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2]))
    return out + b.reshape(-1, 1, 1)


def test_small_cnn_conv_bn_pool_flatten_dense():
    cin, cout = 3, 4
    w_hwio = _r(3, 3, cin, cout)
    cb = _r(cout)
    gamma, beta, mean, var = _r(cout), _r(cout), _r(cout), np.abs(_r(cout)) + 0.5
    wd, bd = _r(5, cout * 3 * 3), _r(5)
    b = NeuralNetworkBuilder([("image", datatypes.Array(cin, 6, 6))], [("out", None)])
    b.add_convolution("conv", cin, cout, 3, 3, 1, 1, "same", 1, w_hwio, cb, True, input_name="image",
                      output_name="c")
    b.add_batchnorm("bn", cout, gamma, beta, mean, var, "c", "n", epsilon=1e-5)
    b.add_activation("relu", "RELU", "n", "r")
    b.add_pooling("pool", 2, 2, 2, 2, "MAX", "VALID", "r", "p")
    b.add_flatten("flat", 0, "p", "f")
    b.add_inner_product("fc", wd, bd, cout * 9, 5, True, "f", "out")
    x = _r(cin, 6, 6)
    y = _model(b).predict({"image": x})["out"]
    w = w_hwio.transpose(3, 2, 0, 1)
    c = _conv_ref(x, w, cb, 1, ((1, 1), (1, 1)))
    n = gamma.reshape(-1, 1, 1) * (c - mean.reshape(-1, 1, 1)) / np.sqrt(var.reshape(-1, 1, 1) + 1e-5) \
        + beta.reshape(-1, 1, 1)
    r = np.maximum(n, 0)
    p = r[:, :6, :6].reshape(cout, 3, 2, 3, 2).max(axis=(2, 4))
    ref = wd @ p.reshape(-1) + bd
    np.testing.assert_allclose(np.asarray(y).reshape(-1), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,stride,border", [(1, 2, "valid"), (2, 1, "same"), (4, 2, "same")])
def test_grouped_convolution_against_torch(groups, stride, border):
    torch = pytest.importorskip("torch")
    cin, cout = 4, 8
    w_hwio = _r(3, 3, cin // groups, cout)
    b = NeuralNetworkBuilder([("x", datatypes.Array(cin, 7, 7))], [("y", None)])
    b.add_convolution("conv", cin // groups, cout, 3, 3, stride, stride, border, groups, w_hwio, None, False,
                      input_name="x", output_name="y")
    x = _r(cin, 7, 7)
    y = _model(b).predict({"x": x})["y"]
    pad = 1 if border == "same" else 0
    ref = torch.nn.functional.conv2d(torch.tensor(x[None]), torch.tensor(w_hwio.transpose(3, 2, 0, 1)),
                                     stride=stride, padding=pad, groups=groups)[0].numpy()
    if border == "same" and stride == 2:       # SAME pads (1, 1) for 7 / 2 -> 4: matches torch pad 1
        assert ref.shape[1] == 4
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride,groups", [(2, 1), (1, 2)])
def test_deconvolution_against_torch(stride, groups):
    torch = pytest.importorskip("torch")
    cin, cout = 4, 6
    w_t = _r(cin, cout // groups, 3, 3)           # torch ConvTranspose2d weight layout
    b = NeuralNetworkBuilder([("x", datatypes.Array(cin, 5, 5))], [("y", None)])
    b.add_convolution("deconv", cin, cout, 3, 3, stride, stride, "valid", groups,
                      w_t.transpose(2, 3, 0, 1), _r(cout) * 0, False, is_deconv=True,
                      input_name="x", output_name="y")
    x = _r(cin, 5, 5)
    y = _model(b).predict({"x": x})["y"]
    ref = torch.nn.functional.conv_transpose2d(torch.tensor(x[None]), torch.tensor(w_t), stride=stride,
                                               groups=groups)[0].numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["MAX", "AVERAGE"])
def test_global_and_same_pooling(kind):
    b = NeuralNetworkBuilder([("x", datatypes.Array(2, 5, 5))], [("g", None), ("s", None)])
    b.add_pooling("gp", 1, 1, 1, 1, kind, "VALID", "x", "g", is_global=True)
    b.add_pooling("sp", 3, 3, 2, 2, kind, "SAME", "x", "s", exclude_pad_area=True)
    x = _r(2, 5, 5)
    out = _model(b).predict({"x": x})
    f = np.max if kind == "MAX" else np.mean
    np.testing.assert_allclose(np.asarray(out["g"]).reshape(-1), f(x, axis=(1, 2)), rtol=1e-5)
    # SAME, 5 -> 3 with stride 2: total pad 2 -> (1, 1); windows exclude the padding.
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    ref = np.stack([[[(np.nanmax if kind == "MAX" else np.nanmean)(pad[c, 2 * i:2 * i + 3, 2 * j:2 * j + 3])
                      for j in range(3)] for i in range(3)] for c in range(2)])
    np.testing.assert_allclose(out["s"], ref, rtol=1e-5)


# --- sequence models ----------------------------------------------------------------------------
def _lstm_ref(xs, wx, wh, b, h, c):
    """Gate order i, f, o, z as the builder takes it."""
    outs = []
    for x in xs:
        i = _sigmoid(wx[0] @ x + wh[0] @ h + b[0])
        f = _sigmoid(wx[1] @ x + wh[1] @ h + b[1])
        o_pre = wx[2] @ x + wh[2] @ h + b[2]
        z = np.tanh(wx[3] @ x + wh[3] @ h + b[3])
        c = f * c + i * z
        h = _sigmoid(o_pre) * np.tanh(c)
        outs.append(h)
    return np.stack(outs), h, c


def test_lstm_sequence_rank5():
    n_in, n_h, seq = 3, 5, 4
    wx = [_r(n_h, n_in) for _ in range(4)]
    wh = [_r(n_h, n_h) * 0.5 for _ in range(4)]
    bias = [_r(n_h) for _ in range(4)]
    b = NeuralNetworkBuilder([("x", datatypes.Array(n_in)), ("h0", datatypes.Array(n_h)),
                              ("c0", datatypes.Array(n_h))], [("y", None), ("hT", None), ("cT", None)])
    b.add_unilstm("lstm", wh, wx, bias, n_h, n_in, ["x", "h0", "c0"], ["y", "hT", "cT"], output_all=True)
    xs, h0, c0 = _r(seq, n_in), _r(n_h), _r(n_h)
    out = _model(b).predict({"x": xs.reshape(seq, 1, n_in), "h0": h0, "c0": c0})
    ys, h, c = _lstm_ref(xs, wx, wh, bias, h0, c0)
    np.testing.assert_allclose(np.asarray(out["y"]).reshape(seq, n_h), ys, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["hT"]).reshape(-1), h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["cT"]).reshape(-1), c, rtol=1e-4, atol=1e-5)


def test_gru_and_simple_rnn():
    n_in, n_h, seq = 3, 4, 5
    wx = [_r(n_h, n_in) for _ in range(3)]      # z, r, o
    wh = [_r(n_h, n_h) * 0.5 for _ in range(3)]
    bias = [_r(n_h) for _ in range(3)]
    wr, ur, br = _r(n_h, n_in), _r(n_h, n_h) * 0.5, _r(n_h)
    b = NeuralNetworkBuilder([("x", datatypes.Array(n_in))], [("g", None), ("s", None)])
    # coremltools writes the default hard sigmoid without parameters: (0.2, 0.5) apply.
    b.add_gru("gru", wh, wx, bias, n_h, n_in, ["x"], ["g", "gh"], output_all=True)
    b.add_simple_rnn("rnn", ur, wr, br, n_h, n_in, "TANH", ["x"], ["s", "sh"], output_all=False)
    xs = _r(seq, n_in)
    out = _model(b).predict({"x": xs.reshape(seq, 1, n_in)})
    h, hs = np.zeros(n_h), []
    for x in xs:
        z = np.clip(0.2 * (wx[0] @ x + wh[0] @ h + bias[0]) + 0.5, 0, 1)
        r = np.clip(0.2 * (wx[1] @ x + wh[1] @ h + bias[1]) + 0.5, 0, 1)
        o = np.tanh(wx[2] @ x + wh[2] @ (r * h) + bias[2])
        h = (1 - z) * o + z * h
        hs.append(h)
    np.testing.assert_allclose(np.asarray(out["g"]).reshape(seq, n_h), np.stack(hs), rtol=1e-4, atol=1e-5)
    s = np.zeros(n_h)
    for x in xs:
        s = np.tanh(wr @ x + ur @ s + br)
    np.testing.assert_allclose(np.asarray(out["s"]).reshape(-1), s, rtol=1e-4, atol=1e-5)


def test_embedding_rank5():
    w, bias = _r(4, 10), _r(4)
    b = NeuralNetworkBuilder([("ids", datatypes.Array(1))], [("e", None)])
    b.add_embedding("emb", w, bias, 10, 4, True, "ids", "e")
    ids = np.array([3, 0, 9], np.float32).reshape(3, 1, 1)
    out = np.asarray(_model(b).predict({"ids": ids})["e"]).reshape(3, 4)
    np.testing.assert_allclose(out, w.T[[3, 0, 9]] + bias, rtol=1e-6)


# --- images -----------------------------------------------------------------------------------
def _image_spec(builder, name, *, color, height, width, output=False):
    fd = (builder.spec.description.output if output else builder.spec.description.input)[0]
    assert fd.name == name
    fd.type.imageType.width, fd.type.imageType.height = width, height
    fd.type.imageType.colorSpace = {"GRAYSCALE": 10, "RGB": 20, "BGR": 30}[color]
    return builder.spec


@pytest.mark.parametrize("color", ["RGB", "BGR", "GRAYSCALE"])
def test_image_input_with_scale_and_bias(color):
    PIL = pytest.importorskip("PIL.Image")
    c = 1 if color == "GRAYSCALE" else 3
    b = NeuralNetworkBuilder([("img", datatypes.Array(c, 4, 5))], [("y", None)])
    b.add_activation("id", "LINEAR", "img", "y", params=[1.0, 0.0])
    b.set_pre_processing_parameters(image_input_names=["img"], is_bgr=color == "BGR", red_bias=-0.5,
                                    green_bias=-0.25, blue_bias=0.1, gray_bias=-0.3, image_scale=1 / 255.0)
    m = mljax.MLModel(_image_spec(b, "img", color=color, height=4, width=5))
    pixels = RNG.integers(0, 256, size=(4, 5, c), dtype=np.uint8)
    image = PIL.fromarray(pixels[:, :, 0], "L") if c == 1 else PIL.fromarray(pixels, "RGB")
    chw = pixels.transpose(2, 0, 1).astype(np.float32)
    if color == "BGR":
        chw = chw[::-1]
        bias = np.array([0.1, -0.25, -0.5])
    elif color == "RGB":
        bias = np.array([-0.5, -0.25, 0.1])
    else:
        bias = np.array([-0.3])
    ref = chw / 255.0 + bias.reshape(-1, 1, 1)
    for value in (image, pixels if c == 3 else pixels[:, :, 0]):
        y = np.asarray(m.predict({"img": value})["y"]).reshape(c, 4, 5)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(mljax.InputError, match="4 x 5"):
        m.predict({"img": np.zeros((5, 5, c), np.uint8)})


def test_image_output_is_a_pil_image():
    PIL = pytest.importorskip("PIL.Image")
    b = NeuralNetworkBuilder([("x", datatypes.Array(3, 2, 3))], [("out", datatypes.Array(3, 2, 3))])
    b.add_activation("id", "LINEAR", "x", "out", params=[1.0, 0.0])
    spec = _image_spec(b, "out", color="RGB", height=2, width=3, output=True)
    x = RNG.integers(0, 256, size=(3, 2, 3)).astype(np.float32)
    img = mljax.MLModel(spec).predict({"x": x})["out"]
    assert isinstance(img, PIL.Image) and img.size == (3, 2)
    np.testing.assert_array_equal(np.asarray(img), x.transpose(1, 2, 0).astype(np.uint8))


# --- legacy shape layers ------------------------------------------------------------------------
def test_rank5_elementwise_concat_reshape_permute_padding_upsample():
    b = NeuralNetworkBuilder([("a", datatypes.Array(2, 3, 4)), ("b", datatypes.Array(2, 3, 4))],
                             [("sum", None), ("prod", None), ("avg", None), ("mx", None), ("cat", None),
                              ("rs", None), ("pm", None), ("pad", None), ("up", None), ("un", None)])
    b.add_elementwise("add", ["a", "b"], "sum", "ADD")
    b.add_elementwise("mul", ["a", "b"], "prod", "MULTIPLY")
    b.add_elementwise("avg", ["a", "b"], "avg", "AVE")
    b.add_elementwise("max", ["a", "b"], "mx", "MAX")
    b.add_elementwise("cat", ["a", "b"], "cat", "CONCAT")
    b.add_reshape("rs", "a", "rs", (4, 3, 2), 1)
    b.add_permute("pm", (0, 3, 1, 2), "a", "pm")
    b.add_padding("pad", 1, 2, 0, 1, input_name="a", output_name="pad", padding_type="reflection")
    b.add_upsample("up", 2, 3, "a", "up", mode="NN")
    b.add_unary("un", "a", "un", "rsqrt", epsilon=1e-4, scale=0.5, shift=3.0)
    a, bb = _r(2, 3, 4), _r(2, 3, 4)
    out = _model(b).predict({"a": a, "b": bb})
    np.testing.assert_allclose(out["sum"], a + bb, rtol=1e-6)
    np.testing.assert_allclose(out["prod"], a * bb, rtol=1e-6)
    np.testing.assert_allclose(out["avg"], (a + bb) / 2, rtol=1e-6)
    np.testing.assert_allclose(out["mx"], np.maximum(a, bb), rtol=1e-6)
    np.testing.assert_allclose(out["cat"], np.concatenate([a, bb]), rtol=1e-6)
    # CHANNEL_LAST reshape: flatten in H, W, C order, reshape to [H', W', C'], back to C', H', W'.
    ref_rs = a.transpose(1, 2, 0).reshape(3, 2, 4).transpose(2, 0, 1)
    np.testing.assert_allclose(out["rs"], ref_rs, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["pm"]).reshape(4, 2, 3), a.transpose(2, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(out["pad"], np.pad(a, ((0, 0), (0, 1), (1, 2)), mode="reflect"), rtol=1e-6)
    np.testing.assert_allclose(out["up"], a.repeat(2, axis=1).repeat(3, axis=2), rtol=1e-6)
    np.testing.assert_allclose(out["un"], 1 / np.sqrt(0.5 * a + 3 + 1e-4), rtol=1e-5)


def test_bilinear_upsample_align_corners_matches_torch():
    torch = pytest.importorskip("torch")
    b = NeuralNetworkBuilder([("x", datatypes.Array(2, 3, 4))], [("t", None), ("f", None)])
    b.add_upsample("t", 2, 2, "x", "t", mode="BILINEAR", linear_upsample_mode="ALIGN_CORNERS_TRUE")
    b.add_upsample("f", 2, 2, "x", "f", mode="BILINEAR", linear_upsample_mode="ALIGN_CORNERS_FALSE")
    x = _r(2, 3, 4)
    out = _model(b).predict({"x": x})
    tx = torch.tensor(x[None])
    for key, align in (("t", True), ("f", False)):
        ref = torch.nn.functional.interpolate(tx, scale_factor=2, mode="bilinear", align_corners=align)[0]
        np.testing.assert_allclose(out[key], ref.numpy(), rtol=1e-5, atol=1e-6)


def test_custom_layer_is_a_clear_error():
    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", None)])
    b.add_custom("mystery", ["x"], ["y"], custom_proto_spec=None)
    b.spec.neuralNetwork.layers[0].custom.className = "MyLayer"
    with pytest.raises(UnsupportedError, match="mystery.*custom.*MyLayer"):
        _model(b)


def test_depthwise_convolution_after_sigmoid_product_gets_the_padding_hint(monkeypatch):
    """x * sigmoid(x) (SiLU in NeuralNetwork layers) feeding a depthwise convolution marks it for the
    concatenated padding, a ReLU feeding one does not; both compute torch's values, single and listed."""
    torch = pytest.importorskip("torch")
    from mljax.neuralnetwork.network import _costly_blobs
    c = 4
    w_hwio = _r(3, 3, 1, c)
    b = NeuralNetworkBuilder([("x", datatypes.Array(c, 7, 6))], [("y", None)])
    b.add_activation("sig", "SIGMOID", "x", "s")
    b.add_elementwise("silu", ["x", "s"], "m", mode="MULTIPLY")
    b.add_activation("relu", "RELU", "x", "r")
    for name, src in (("dw_silu", "m"), ("dw_relu", "r")):
        b.add_convolution(name, 1, c, 3, 3, 1, 1, "same", c, w_hwio, None, False, input_name=src,
                          output_name=name + "_out")
    b.add_elementwise("sum", ["dw_silu_out", "dw_relu_out"], "y", mode="ADD")
    assert _costly_blobs(b.spec.neuralNetwork) == {"s", "m"}
    from mljax.ops import conv as conv_ops
    hints, plain = [], conv_ops.convolution
    monkeypatch.setattr(conv_ops, "convolution",
                        lambda *a, **k: hints.append(k.get("after_costly_op")) or plain(*a, **k))
    model = _model(b)
    w = torch.tensor(w_hwio.transpose(3, 2, 0, 1))

    def ref(x):
        t = torch.tensor(x[None])
        dw = lambda u: torch.nn.functional.conv2d(u, w, padding=1, groups=c)  # noqa: E731
        return (dw(t * torch.sigmoid(t)) + dw(torch.relu(t)))[0].numpy()
    xs = [_r(c, 7, 6) for _ in range(3)]
    np.testing.assert_allclose(np.asarray(model.predict({"x": xs[0]})["y"]).reshape(c, 7, 6), ref(xs[0]),
                               rtol=1e-4, atol=1e-4)
    for x, out in zip(xs, model.predict([{"x": x} for x in xs])):
        np.testing.assert_allclose(np.asarray(out["y"]).reshape(c, 7, 6), ref(x), rtol=1e-4, atol=1e-4)
    assert hints[:2] == [True, False]           # dw_silu, dw_relu (per trace)


def _depthwise_block_builder(ws):
    """A MobileNet-style network in NeuralNetwork layers (exact array mapping, [1, 3, 12, 10])."""
    w0, wd, w1, w2, wp, wfc = ws
    hwio = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))   # noqa: E731 - OIHW -> builder's HWIO
    b = NeuralNetworkBuilder([("x", datatypes.Array(1, 3, 12, 10))], [("y", None)],
                             disable_rank5_shape_mapping=True)
    b.add_convolution("stem", 3, 8, 3, 3, 1, 1, "same", 1, hwio(w0), None, False, input_name="x", output_name="a0")
    b.add_activation("relu0", "RELU", "a0", "a")
    b.add_convolution("dw", 1, 8, 3, 3, 1, 1, "same", 8, hwio(wd), None, False, input_name="a", output_name="d0")
    b.add_activation("sig", "SIGMOID", "d0", "s")
    b.add_elementwise("silu", ["d0", "s"], "d", mode="MULTIPLY")
    b.add_pooling("se_pool", 1, 1, 1, 1, "AVERAGE", "VALID", input_name="d", output_name="p", is_global=True)
    b.add_convolution("se1", 8, 4, 1, 1, 1, 1, "valid", 1, hwio(w1), None, False, input_name="p", output_name="q0")
    b.add_activation("se_relu", "RELU", "q0", "q")
    b.add_convolution("se2", 4, 8, 1, 1, 1, 1, "valid", 1, hwio(w2), None, False, input_name="q", output_name="g0")
    b.add_activation("se_sig", "SIGMOID", "g0", "g")
    b.add_elementwise("se_mul", ["d", "g"], "e", mode="MULTIPLY")
    b.add_convolution("pw", 8, 6, 1, 1, 1, 1, "valid", 1, hwio(wp), None, False, input_name="e", output_name="f")
    b.add_pooling("pool", 1, 1, 1, 1, "AVERAGE", "VALID", input_name="f", output_name="h", is_global=True)
    b.add_flatten("flat", 0, "h", "hf")
    b.add_inner_product("fc", wfc, None, 6, 5, False, input_name="hf", output_name="y")
    return b


def _depthwise_block_torch(x, ws, torch):
    import torch.nn.functional as F
    w0, wd, w1, w2, wp, wfc = (w if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=torch.float64)
                               for w in ws)
    a = torch.relu(F.conv2d(torch.tensor(x, dtype=torch.float64), w0, padding=1))
    d0 = F.conv2d(a, wd, padding=1, groups=8)
    d = d0 * torch.sigmoid(d0)
    g = torch.sigmoid(F.conv2d(torch.relu(F.conv2d(d.mean((2, 3), keepdim=True), w1)), w2))
    return F.conv2d(d * g, wp).mean((2, 3)) @ wfc.T


def test_depthwise_network_runs_channel_last():
    """The NeuralNetwork translator forms the ML-program graph layer's channel-last region: its
    first layer reads the channel-first input, the depthwise weight comes laid out by
    ``Stage.prepare`` (and follows ``with_weights``), the global pool before the classifier runs
    as a product; values equal torch's for one sample and a list, and gradients through the
    differentiable network function equal torch's."""
    torch = pytest.importorskip("torch")
    import jax
    from mljax.neuralnetwork.builder import network_function
    ws = [_r(8, 3, 3, 3) * 0.3, _r(8, 1, 3, 3) * 0.3, _r(4, 8, 1, 1) * 0.3, _r(8, 4, 1, 1) * 0.3,
          _r(6, 8, 1, 1) * 0.3, _r(5, 6) * 0.3]
    b = _depthwise_block_builder(ws)
    model = _model(b)
    roles = model.stage.network.channels_last
    assert set(roles) == {"stem", "relu0", "dw", "sig", "silu", "se_pool", "se1", "se_relu", "se2", "se_sig",
                          "se_mul", "pw", "pool"}
    assert [n for n, r in roles.items() if r.first_in] == ["stem"]
    assert [n for n, r in roles.items() if r.weight_hwio] == ["stem", "dw", "se1", "se2", "pw"]
    # the projection of the gated map runs as one product by per-image weights (120 positions >= 2 * 8)
    assert {n: r.scaled_by for n, r in roles.items() if r.scaled_by} == {"pw": ("d", "g")}
    assert [n for n, r in roles.items() if r.pool_by_product] == ["pool"]
    xs = [_r(1, 3, 12, 10) for _ in range(3)]
    ref = lambda x, w=ws: _depthwise_block_torch(x, w, torch).numpy().reshape(-1)   # noqa: E731
    np.testing.assert_allclose(np.asarray(model.predict({"x": xs[0]})["y"]).reshape(-1), ref(xs[0]),
                               rtol=1e-5, atol=1e-5)
    for x, out in zip(xs, model.predict([{"x": x} for x in xs])):
        np.testing.assert_allclose(np.asarray(out["y"]).reshape(-1), ref(x), rtol=1e-5, atol=1e-5)
    new = {**model.weights, "dw/weight": model.weights["dw/weight"] * -2.0}
    other = model.with_weights(new)
    np.testing.assert_allclose(np.asarray(other.predict({"x": xs[0]})["y"]).reshape(-1),
                               ref(xs[0], [ws[0], ws[1] * -2.0, *ws[2:]]), rtol=1e-5, atol=1e-5)
    fn, weights = network_function(b.spec)
    grad = jax.grad(lambda w: fn(w, {"x": xs[0]})["y"].sum())(weights)["dw/weight"]
    wd = torch.tensor(ws[1], dtype=torch.float64, requires_grad=True)
    _depthwise_block_torch(xs[0], [ws[0], wd, *ws[2:]], torch).sum().backward()
    np.testing.assert_allclose(np.asarray(grad), wd.grad.numpy(), rtol=1e-4, atol=1e-6)
