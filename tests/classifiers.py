"""A small image classifier converted by coremltools (``ct.ClassifierConfig``) and PyTorch's answers
for it: shared by tests/mljax/test_classifier.py and tests/mljax/test_cli.py."""
import numpy as np
import torch
import coremltools as ct
from PIL import Image

from helpers import tmp_path_for

INT_LABELS = [0, 7, 2**40, -3, 12]          # 2**40: an int64 label no int32 holds
STR_LABELS = ["cat", "dog", "fish", "bird", "frog"]
TOL = {"fp32": 1e-5, "fp16": 2e-3}          # on probabilities (fp16: the weights are rounded to fp16)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.fc = torch.nn.Linear(6 * 4, 5)

    def forward(self, x):
        return torch.softmax(self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1)), -1)


def make_classifier(labels, precision: str, **config):
    torch.manual_seed(0)
    net = SmallCNN().eval()
    with torch.no_grad():
        net.fc.weight.mul_(20.0)              # decisive probabilities: labels do not hinge on rounding
    example = torch.rand(1, 3, 12, 12)
    model = ct.convert(torch.jit.trace(net, example),
                       inputs=[ct.ImageType(name="image", shape=(1, 3, 12, 12), scale=1 / 255.0)],
                       classifier_config=ct.ClassifierConfig(labels, **config), convert_to="mlprogram",
                       compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                       minimum_deployment_target=ct.target.iOS15)
    path = tmp_path_for(f"classifier-{precision}.mlpackage")
    model.save(str(path))
    return net, path


def torch_probabilities(net, images) -> np.ndarray:
    x = torch.tensor(np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 255.0 for im in images]))
    with torch.no_grad():
        return net(x).numpy().astype(np.float64)


def images(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]


def decisive_images(net, n: int, margin: float, seed: int = 0):
    """``n`` random images whose top two torch probabilities differ by more than ``margin`` (their label
    cannot hinge on rounding), and torch's probabilities of them."""
    candidates = images(20 * n, seed)
    probs = torch_probabilities(net, candidates)
    top2 = np.sort(probs, 1)[:, -2:]
    keep = np.flatnonzero(top2[:, 1] - top2[:, 0] > margin)[:n]
    assert len(keep) == n, f"only {len(keep)} of {len(candidates)} images are decisive"
    return [candidates[i] for i in keep], probs[keep]
