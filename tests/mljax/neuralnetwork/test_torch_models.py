"""PyTorch models converted with ``ct.convert(..., convert_to="neuralnetwork")``, run on mljax, vs torch."""
from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

import mljax  # noqa: E402

torch.manual_seed(0)


def _convert(module, *examples, names=None):
    module = module.eval()
    traced = torch.jit.trace(module, examples)
    names = names or [f"x{i}" for i in range(len(examples))]
    inputs = [ct.TensorType(name=n, shape=e.shape) for n, e in zip(names, examples)]
    ml = ct.convert(traced, inputs=inputs, convert_to="neuralnetwork", minimum_deployment_target=None)
    return mljax.MLModel(ml.get_spec())


def _only(out: dict):
    assert len(out) == 1, list(out)
    return np.asarray(next(iter(out.values())))


def test_cnn_classifier_like_model():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 4, 3, stride=2, groups=4), torch.nn.AvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 5), torch.nn.Softmax(dim=1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 10, 10)
    m = _convert(model, x)
    assert m.stage.rank5 is False
    np.testing.assert_allclose(_only(m.predict({"x0": x.numpy()})), model(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_lstm_sequence_model():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 6)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.head(y)

    net = Net()
    x = torch.randn(7, 1, 4)
    m = _convert(net, x)
    types = {l["type"] for l in m.stage.network.layers}
    assert "uniDirectionalLSTM" in types
    np.testing.assert_allclose(_only(m.predict({"x0": x.numpy()})), net(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_bidirectional_lstm_and_gru():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(3, 4, bidirectional=True)
            self.gru = torch.nn.GRU(8, 5)

        def forward(self, x):
            y, _ = self.lstm(x)
            z, _ = self.gru(y)
            return z

    net = Net()
    x = torch.randn(5, 1, 3)
    try:
        m = _convert(net, x)
    except Exception as e:  # noqa: BLE001 - the converter may not map this model to NeuralNetwork
        pytest.skip(f"coremltools could not convert: {e}")
    np.testing.assert_allclose(_only(m.predict({"x0": x.numpy()})), net(x).detach().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_rank_n_layers_from_torch():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(6)
            self.up = torch.nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)

        def forward(self, a, b):
            m = torch.matmul(a, b.transpose(1, 2))                # [2, 3, 3]
            s = torch.nn.functional.gelu(self.norm(torch.cat([a, b], dim=2)))   # [2, 3, 6]
            p, q = torch.split(s, [2, 4], dim=2)
            r = p.mean(dim=1, keepdim=True) + q.amax(dim=2).unsqueeze(-1)
            g = torch.index_select(a, 1, torch.tensor([2, 0]))
            img = self.up(a.reshape(1, 2, 3, 3))
            return m, r, g.permute(2, 0, 1), img.squeeze(0)

    net = Net()
    a, b = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    m = _convert(net, a, b, names=["a", "b"])
    out = m.predict({"a": a.numpy(), "b": b.numpy()})
    refs = [t.detach().numpy() for t in net(a, b)]
    got = [out[name] for name in m.output_description]    # the description lists outputs in order
    assert len(got) == 4
    for g, r in zip(got, refs):
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-5)


def test_dense_cnn_runs_as_one_channel_last_region():
    """A ResNet-style network of dense convs, pools and a residual add: every layer up to the global
    pool is one channel-last region (as the ML program's graph layer forms it); single and list
    predicts equal torch."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 5, stride=2, padding=2)
            self.c1, self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            p = torch.nn.functional.max_pool2d(torch.relu(self.stem(x)), 3, 2, padding=1)
            r = torch.relu(self.c2(torch.relu(self.c1(p))) + p)
            q = torch.nn.functional.avg_pool2d(r, 2)
            return self.head(q.mean((2, 3)))
    model = Net().eval()
    xs = torch.randn(3, 1, 3, 48, 48)
    m = _convert(model, xs[0])
    roles = m.stage.network.channels_last
    kinds = {lyr.name: lyr.WhichOneof("layer") for lyr in m.stage.network.nn.layers}
    in_region = sorted(kinds[name] for name in roles)
    assert in_region.count("convolution") == 3 and in_region.count("pooling") >= 2, in_region
    for x, out in zip(xs, m.predict([{"x0": x.numpy()} for x in xs])):
        np.testing.assert_allclose(_only(out), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_only(m.predict({"x0": xs[0].numpy()})), model(xs[0]).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
