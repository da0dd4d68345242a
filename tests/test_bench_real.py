"""bench/real.py's architectures: published sizes, and one converted by coremltools matches torch in mljax."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
import mljax  # noqa: E402


def _load_real():
    """bench/real.py by path (putting bench/ on sys.path would shadow module names for other tests)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "real.py"
    spec = importlib.util.spec_from_file_location("bench_real", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod      # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


real = _load_real()


@pytest.mark.parametrize("name, params", [("resnet18", 11_689_512), ("mobilenet_v3_small", 2_542_856),
                                          ("efficientnet_b0", 5_288_548)])
def test_cnn_has_the_published_parameter_count(name, params):
    m = real.REAL[name].make()
    assert sum(p.numel() for p in m.parameters()) == params


@pytest.mark.slow
def test_mobilenet_v3_small_converts_and_matches_torch(tmp_path):
    m = real.torch_model("mobilenet_v3_small")
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    traced = torch.jit.trace(m, torch.from_numpy(x))
    ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=x.shape)], outputs=[ct.TensorType(name="y")],
                    convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                    compute_precision=ct.precision.FLOAT32)
    ml.save(str(tmp_path / "m.mlpackage"))
    got = mljax.MLModel(tmp_path / "m.mlpackage").predict({"x": x})["y"]
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_llama_ready_made_causal_mask_is_transformers_own():
    pytest.importorskip("transformers")
    m = real.torch_model("llama")
    ids = torch.from_numpy(real.example_input("llama", 2)).long()
    with torch.no_grad():
        np.testing.assert_array_equal(m(ids).numpy(), m.model(input_ids=ids, use_cache=False).logits.numpy())
