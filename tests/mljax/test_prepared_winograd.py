"""Dense 3x3 convolutions run by Winograd get their weight transform computed once per weight
values (the lowering's prepared weights), not on every call; values, list predicts, other
weights and gradients stay those of torch."""
import numpy as np
import pytest

import mljax
from helpers import convert_torch_twins

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")


def _net():
    torch.manual_seed(0)
    nn = torch.nn
    # conv1: a first layer (im2col); conv2 at 32x32 (64 4x4 tiles: F(4x4)); conv3 at 16x16
    # (16 4x4 tiles, 64 2x2 tiles: F(2x2))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


def _twins(net, folder):
    """``net`` and its ML program and NeuralNetwork twins, loaded."""
    paths = convert_torch_twins(net, torch.randn(1, 3, 32, 32), folder)
    return net, {kind: mljax.MLModel(path) for kind, path in paths.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _twins(_net(), tmp_path_factory.mktemp("winograd"))


def _torch(net, xs):
    with torch.no_grad():
        return net(torch.from_numpy(xs)).numpy()


def test_the_transforms_are_prepared_per_variant(models):
    _, m = models
    assert sorted(m for _, m in m["mlprogram"].stage.lowered.derived.values()) == [2, 4]
    assert sorted(m["neuralnetwork"].stage.network.winograd.values()) == [2, 4]


@pytest.mark.parametrize("kind", ["mlprogram", "neuralnetwork"])
def test_predicts_equal_torch(models, kind):
    net, m = models
    model = m[kind]
    xs = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    ref = _torch(net, xs)
    np.testing.assert_allclose(model.predict({"x": xs[:1]})["y"], ref[:1], rtol=1e-4, atol=1e-5)
    got = np.concatenate([o["y"] for o in model.predict([{"x": x[None]} for x in xs])])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_the_call_no_longer_transforms_the_weights(models):
    """A predict's executable (prepared weights passed in) holds no weight-transform product; the
    stage's own function (plain weights, as training calls it) still does."""
    import jax
    _, m = models
    model = m["mlprogram"]
    x = {"x": np.zeros((1, 3, 32, 32), np.float32)}
    kron = ("tensor<36x9xf32>", "tensor<16x9xf32>")     # the constant G (x) G of F(4x4) and F(2x2)
    predict_hlo = jax.jit(model.stage.fn).lower(model._run_weights(), x, {}).as_text()
    plain_hlo = jax.jit(model.stage.fn).lower(model.weights, x, {}).as_text()
    assert not any(k in predict_hlo for k in kron)
    assert all(k in plain_hlo for k in kron)


def test_other_weights_and_gradients(models):
    """``with_weights`` prepares its own transforms; gradients through ``stage.fn`` reach the
    program's own conv weight, equal to torch's."""
    import jax
    net, m = models
    model = m["mlprogram"]
    w3 = net[5].weight.detach().numpy()
    name = next(k for k, v in model.weights.items() if np.shape(v) == w3.shape and np.allclose(v, w3))
    xs = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    other = model.with_weights({**model.weights, name: -2.0 * w3})
    with torch.no_grad():
        net2 = _net()
        net2[5].weight.mul_(-2.0)
    np.testing.assert_allclose(other.predict({"x": xs})["y"], _torch(net2, xs), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.predict({"x": xs})["y"], _torch(net, xs), rtol=1e-4, atol=1e-5)

    def loss(w):
        out, _ = model.stage.fn({**model.weights, name: w}, {"x": xs}, {})
        return out["y"].sum()
    g = np.asarray(jax.grad(loss)(np.asarray(model.weights[name])))
    xt = torch.from_numpy(xs)
    net.zero_grad()
    net(xt).sum().backward()
    np.testing.assert_allclose(g, net[5].weight.grad.numpy(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlprogram", "neuralnetwork"])
def test_a_list_predict_gets_the_variants_its_batch_picks(models, kind):
    """conv3 runs F(2x2) at one sample (16 tiles of 4x4); a list predict of 6 folds 96 tiles and
    picks F(4x4): its transform is prepared too, and that executable transforms no weight."""
    import jax

    from mljax.stage import PREPARED
    _, m = models
    model = m[kind]
    extra = model.stage.prepare_batch(model.weights, 6)
    assert [np.shape(v)[0] for v in extra.values()] == [36]      # F(4x4): 6x6 tile positions
    assert model.stage.prepare_batch(model.weights, 1) == {}
    weights = model._batch_weights(6)
    assert set(extra) <= set(weights[PREPARED])
    stacked = {"x": np.zeros((6, 1, 3, 32, 32), np.float32)}
    batched = model.stage.map_batch or jax.vmap(model.stage.fn, in_axes=(None, 0, None))
    hlo = jax.jit(batched).lower(weights, stacked, {}).as_text()
    assert not any(k in hlo for k in ("tensor<36x9xf32>", "tensor<16x9xf32>"))
    hlo_before = jax.jit(batched).lower(model._run_weights(), stacked, {}).as_text()
    assert "tensor<36x9xf32>" in hlo_before      # one sample's prepared set lacks conv3's F(4x4)
    # another batch size that picks the same variant shares the prepared array
    (key,) = extra
    assert model._batch_weights(8)[PREPARED][key] is weights[PREPARED][key]


def _strided_net():
    torch.manual_seed(1)
    nn = torch.nn
    # conv2: a 3x3 stride-2 layer of a channel-last region, by XLA's convolution (256 positions:
    # no im2col; stride 2: no Winograd), issued NHWC / HWIO
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


@pytest.fixture(scope="module")
def strided(tmp_path_factory):
    return _twins(_strided_net(), tmp_path_factory.mktemp("strided"))


@pytest.mark.parametrize("kind", ["mlprogram", "neuralnetwork"])
def test_a_region_conv_on_xlas_path_gets_its_weight_laid_out_once(strided, kind):
    """The stride-2 layer's weight comes prepared HWIO: the predict's executable transposes no
    weight ([32, 16, 3, 3] -> [3, 3, 16, 32]), the stage's own function (plain weights) still does;
    single and list predicts equal torch."""
    import jax
    net, m = strided
    model = m[kind]
    w = net[2].weight.detach().numpy()
    prepared = model.stage.prepare(model.weights)
    laid_out = [v for v in prepared.values() if np.shape(v) == (3, 3, 16, 32)]
    assert len(laid_out) == 1 and np.array_equal(np.asarray(laid_out[0]), w.transpose(2, 3, 1, 0))
    x = {"x": np.zeros((1, 3, 32, 32), np.float32)}
    transpose = "tensor<32x16x3x3xf32>) -> tensor<3x3x16x32xf32>"
    assert transpose not in jax.jit(model.stage.fn).lower(model._run_weights(), x, {}).as_text()
    assert transpose in jax.jit(model.stage.fn).lower(model.weights, x, {}).as_text()
    xs = np.random.default_rng(2).standard_normal((5, 3, 32, 32)).astype(np.float32)
    ref = _torch(net, xs)
    np.testing.assert_allclose(model.predict({"x": xs[:1]})["y"], ref[:1], rtol=1e-4, atol=1e-5)
    got = np.concatenate([o["y"] for o in model.predict([{"x": x[None]} for x in xs])])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
