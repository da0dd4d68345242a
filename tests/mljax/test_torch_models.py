"""Networks converted by coremltools' PyTorch frontend predict what PyTorch predicts.

ResNet-, MobileNet-, transformer- and LSTM/GRU-style networks, fp32 and fp16 programs.
Tolerance is relative to the largest magnitude of the reference output: 1e-3 (fp32), 3e-2 (fp16).
"""
import numpy as np
import pytest

import mljax
from helpers import tmp_path_for

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
nn = torch.nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.blocks = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return torch.softmax(self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1)), -1)


class InvertedResidual(nn.Module):
    def __init__(self, c, expand):
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.Hardswish(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class TinyMobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.blocks = nn.Sequential(InvertedResidual(8, 4), InvertedResidual(8, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(32, 5), nn.Sigmoid())

    def forward(self, x):
        up = nn.functional.interpolate(self.blocks(self.stem(x)), scale_factor=2, mode="nearest")
        return self.head(up)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.n1, self.att, self.n2 = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x):
        x = x + self.att(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, 12, d) * 0.1)
        self.blocks = nn.Sequential(EncoderBlock(d, 4, 64), EncoderBlock(d, 4, 64))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.blocks(self.emb(tokens) + self.pos)
        return torch.log_softmax(self.out(self.norm(h)), -1)


class TinyRecurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=1, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(24, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        g, _ = self.gru(h)
        return torch.tanh(self.fc(g))


def _case(name):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if name == "resnet":
        return TinyResNet(), rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    if name == "mobilenet":
        return TinyMobileNet(), rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    if name == "transformer":
        return TinyTransformer(), rng.integers(0, 50, size=(1, 12)).astype(np.int32)
    return TinyRecurrent(), rng.normal(size=(1, 7, 6)).astype(np.float32)


def _randomize_bn(module):
    # Non-trivial batch-norm statistics, so folding and normalization are really exercised.
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer", "recurrent"])
def test_torch_network_matches_pytorch(name, precision):
    module, x = _case(name)
    _randomize_bn(module)
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
        traced = torch.jit.trace(module, torch.from_numpy(x))
    dtype = np.int32 if x.dtype == np.int32 else np.float32
    mlmodel = ct.convert(
        traced, convert_to="mlprogram", inputs=[ct.TensorType(name="x", shape=x.shape, dtype=dtype)],
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    path = tmp_path_for(f"{name}-{precision}.mlpackage")
    mlmodel.save(str(path))
    model = mljax.MLModel(path)
    (got,) = model.predict({"x": x}).values()
    scale = np.abs(expected).max()
    tol = 3e-2 if precision == "fp16" else 1e-3
    err = np.abs(got.astype(np.float64) - expected).max() / scale
    assert got.shape == expected.shape
    assert err <= tol, f"{name} {precision}: max error {err:.2e} of the largest magnitude (tolerance {tol})"
    if name == "transformer":     # each block's attention ran as one op (mljax.optimize.passes.fuse_attention)
        assert model.stage.lowered.optimizations["fuse_attention"] == 2
    if precision == "fp16":
        # the program really computes in fp16 by default, and fp32 on request
        program = model.stage.program
        computed = [v.type.dtype.name for op in program.functions["main"].block.walk()
                    if op.type != "const" for v in op.outputs]
        assert computed.count("fp16") > len(computed) // 2
        fp32 = mljax.MLModel(path, compute_precision="float32")
        (got32,) = fp32.predict({"x": x}).values()
        err32 = np.abs(got32.astype(np.float64) - expected).max() / scale
        assert err32 <= 1e-3
