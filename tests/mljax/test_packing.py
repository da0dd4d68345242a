"""``mljax.packing``: a single predict passes its small weights as one buffer per dtype.

Checked against the unpacked weights themselves (bit for bit) and against torch's forward pass
of the network a model was converted from."""
import jax
import numpy as np
import pytest

import mljax
from helpers import convert_torch_twins
from mljax import packing

torch = pytest.importorskip("torch")


def _weights():
    rng = np.random.default_rng(0)
    return {
        "conv": {"w": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),       # 4.6 KB: its own argument
                 "b": rng.standard_normal(16).astype(np.float32)},
        "half": rng.standard_normal((3, 5)).astype(np.float16),
        "index": np.arange(7, dtype=np.int32),
        "scale": np.float32(0.5) * np.ones((), np.float32),
        "vec": rng.standard_normal(33).astype(np.float32),
    }


def test_pack_and_unpack_give_back_every_array_exactly():
    w = jax.device_put(_weights())
    packed = packing.pack(w)
    assert isinstance(packed, packing.PackedWeights)
    # float32 buffer, float16 buffer, int32 buffer, and the one large array
    assert len(packed.buffers) == 3 and len(packed.arrays) == 1
    assert len(jax.tree.leaves(packed)) == 4 < len(jax.tree.leaves(w)) == 6
    for got in (packed.unpack(), jax.jit(packing.unpack)(packed)):
        assert jax.tree.structure(got) == jax.tree.structure(w)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(w)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # each packed array starts on a 64-byte boundary of its buffer
    for place in packed.layout.places:
        if place[0] == "packed":
            itemsize = np.dtype(packed.layout.dtypes[place[1]]).itemsize
            assert place[2] * itemsize % packing.ALIGN == 0


def test_nothing_to_pack_leaves_the_weights_as_they_are():
    w = jax.device_put(_weights())
    assert packing.pack(w, max_bytes=-1) is w                  # no array small enough
    one = {"a": np.ones(3, np.float32)}
    assert packing.pack(one) is one                            # a single array: nothing gained
    odd = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float32), "label": "cat"}
    assert packing.pack(odd) is odd                            # a leaf that is not an array
    assert packing.unpack(w) is w


class _SmallNet(torch.nn.Module):
    """Conv + batch norm + depthwise + squeeze-excite + classifier: many small weights."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.Hardswish())
        self.dw = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, 1, 1, groups=16), torch.nn.BatchNorm2d(16),
                                      torch.nn.ReLU())
        self.se = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(16, 8, 1), torch.nn.ReLU(),
                                      torch.nn.Conv2d(8, 16, 1), torch.nn.Hardsigmoid())
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        y = self.dw(self.stem(x))
        y = y * self.se(y)
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module")
def small_net(tmp_path_factory):
    torch.manual_seed(0)
    net = _SmallNet().eval()
    with torch.no_grad():        # batch norms with statistics of their own
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    example = torch.randn(1, 3, 16, 16)
    return net, convert_torch_twins(net, example, tmp_path_factory.mktemp("packing"))


@pytest.mark.parametrize("kind", ["mlprogram", "neuralnetwork"])
def test_single_predict_passes_packed_weights_and_matches_torch(small_net, kind):
    net, paths = small_net
    model = mljax.MLModel(paths[kind])
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    got = model.predict({"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    passed = model._call_weights()
    assert isinstance(passed, packing.PackedWeights)
    assert len(jax.tree.leaves(passed)) < len(jax.tree.leaves(model._run_weights()))
    # the same compiled function on the plain weights: the same bits
    plain, _ = model._predict_fn(model._run_weights(), {"x": x}, {})
    np.testing.assert_array_equal(got, np.asarray(plain["y"]))
    # a list predict (plain weights, vmapped) agrees
    batch = model.predict([{"x": x}, {"x": 2 * x}])
    np.testing.assert_allclose(batch[0]["y"], got, rtol=1e-6, atol=1e-6)


def test_new_weight_values_are_packed_again(small_net):
    """``with_weights``: the packed buffers follow the new values (never the old model's)."""
    net, paths = small_net
    model = mljax.MLModel(paths["mlprogram"])
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    before = model.predict({"x": x})["y"]
    doubled = jax.tree.map(lambda a: a * 2 if a.dtype.kind == "f" else a, model.weights)
    other = model.with_weights(doubled)
    after = other.predict({"x": x})["y"]
    want, _ = other._predict_fn(other._run_weights(), {"x": x}, {})
    np.testing.assert_array_equal(after, np.asarray(want["y"]))
    assert not np.allclose(after, before)
    np.testing.assert_array_equal(model.predict({"x": x})["y"], before)    # the first model is unchanged
