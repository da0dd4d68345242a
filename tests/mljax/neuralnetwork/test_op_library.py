"""NeuralNetwork layers compute through the ML-program op functions (mljax.ops), not XLA directly.

The first test scans the package's source; the others check behaviour the shared ops brought to
NeuralNetwork models (fresh random draws per prediction, MIL's resize grids), with coremltools-built
models against hand-computed / NumPy references.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import mljax

PACKAGE = Path(mljax.__file__).parent / "neuralnetwork"

#: XLA kernels that only mljax.ops may call: convolution, windowed reductions, contractions,
#: loops, resizing.  Matched as the last attribute of a call on jax / lax / jnp / np.
KERNELS = {"conv", "conv_general_dilated", "conv_transpose", "conv_with_general_padding",
           "reduce_window", "einsum", "dot", "dot_general", "matmul", "tensordot", "inner", "vdot",
           "scan", "while_loop", "fori_loop", "map", "associative_scan", "resize", "scale_and_translate",
           "top_k", "linalg"}
MODULE_ROOTS = {"jax", "lax", "jnp", "np", "numpy"}
#: (file name, kernel) -> why a direct call is right there.  Keep empty unless there is a reason.
ALLOWED: dict[tuple[str, str], str] = {}


def _root(node) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _kernel_uses(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in KERNELS and _root(node) in MODULE_ROOTS:
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in MODULE_ROOTS:
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                      if a.name in KERNELS]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            found.append((node.lineno, "the @ operator (matmul)"))
    return found


def test_scan_finds_kernel_calls(tmp_path):
    """The scanner itself: it must see each kind of direct call."""
    src = tmp_path / "bad.py"
    src.write_text("import jax\nfrom jax import lax\nimport jax.numpy as jnp\n"
                   "def f(a, b):\n    y = lax.conv_general_dilated(a, b, (1, 1), 'SAME')\n"
                   "    z = jnp.einsum('ij,jk->ik', a, b) + a @ b\n    return jax.image.resize(y, (2, 2), 'linear')\n"
                   "from jax.lax import scan\n")
    kinds = {text for _, text in _kernel_uses(src)}
    assert kinds == {"lax.conv_general_dilated", "jnp.einsum", "the @ operator (matmul)", "jax.image.resize",
                     "from jax.lax import scan"}


def test_neuralnetwork_layers_make_no_direct_xla_kernel_calls():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 8, f"expected the neuralnetwork package's modules under {PACKAGE}"
    offenders = [f"{f.name}:{line}: {text}" for f in files for line, text in _kernel_uses(f)
                 if (f.name, text.split(".")[-1]) not in ALLOWED]
    assert not offenders, ("NeuralNetwork layers must compute through mljax.ops (add the math there); "
                           "direct kernel calls:\n" + "\n".join(offenders))


# --- behaviour that comes with the shared ops ---------------------------------------------------
ct = pytest.importorskip("coremltools")
from coremltools.models import datatypes  # noqa: E402
from coremltools.models.neural_network import NeuralNetworkBuilder  # noqa: E402


def _random_model(seed: int):
    b = NeuralNetworkBuilder([("x", datatypes.Array(2))], [("y", None)], disable_rank5_shape_mapping=True)
    b.add_random_normal_static("rnd", "r", output_shape=[4000], mean=1.0, stddev=2.0, seed=seed)
    b.add_elementwise("keep_x", ["x"], "x_copy", mode="MULTIPLY", alpha=1.0)
    b.add_reduce_sum("sum_x", "x_copy", "sx", axes=[0], keepdims=True)
    b.add_multiply_broadcastable("mul0", ["sx", "r"], "zero_r")   # sx == 0: r only reaches y as + 0 * ...
    b.add_add_broadcastable("y", ["r", "zero_r"], "y")
    return mljax.MLModel(b.spec)


def test_random_layer_with_negative_seed_draws_fresh_values_per_prediction():
    m = _random_model(-1)
    x = {"x": np.zeros(2, np.float32)}
    a, b = m.predict(x)["y"], m.predict(x)["y"]
    assert a.shape == (4000,) and not np.allclose(a, b)
    for v in (a, b):   # N(1, 2^2): sample mean within 5 standard errors, std within 10%
        assert abs(v.mean() - 1.0) < 5 * 2.0 / np.sqrt(v.size) and abs(v.std() - 2.0) < 0.2


def test_random_layer_with_a_seed_repeats_its_values():
    m = _random_model(7)
    x = {"x": np.zeros(2, np.float32)}
    np.testing.assert_array_equal(m.predict(x)["y"], m.predict(x)["y"])
    np.testing.assert_array_equal(m.predict(x)["y"], _random_model(7).predict(x)["y"])


# coremltools' resize_bilinear test (ops/tests/iOS14/test_image_resizing.py): x = [0, 1] resized to
# width 5; its NeuralNetwork backend writes these modes as SamplingMode STRICT_ALIGN_ENDPOINTS,
# UPSAMPLE and ROI_ALIGN.
@pytest.mark.parametrize("mode,expected", [
    ("STRICT_ALIGN_ENDPOINTS_MODE", [0, 0.25, 0.5, 0.75, 1]),
    ("UPSAMPLE_MODE", [0, 0.4, 0.8, 1, 1]),
    ("ROI_ALIGN_MODE", [0.1, 0.3, 0.5, 0.7, 0.9]),
    ("ALIGN_ENDPOINTS_MODE", [0, 0.25, 0.5, 0.75, 1]),
])
def test_resize_bilinear_grids_match_coremltools_expected_values(mode, expected):
    b = NeuralNetworkBuilder([("x", datatypes.Array(1, 1, 2))], [("y", None)], disable_rank5_shape_mapping=True)
    b.add_resize_bilinear("rs", "x", "y", target_height=1, target_width=5, mode=mode)
    y = mljax.MLModel(b.spec).predict({"x": np.array([0, 1], np.float32).reshape(1, 1, 2)})["y"]
    np.testing.assert_allclose(y.reshape(-1), expected, atol=1e-6)


@pytest.mark.parametrize("mode,expected", [("ALIGN_ENDPOINTS_MODE", 1.5), ("STRICT_ALIGN_ENDPOINTS_MODE", 0.0)])
def test_resize_bilinear_to_one_pixel(mode, expected):
    """One output point: ALIGN_ENDPOINTS samples the centre (Xin - 1) / 2, STRICT_ALIGN_ENDPOINTS
    the first pixel (MIL's ALIGN_CORNERS / STRICT_ALIGN_CORNERS, which the NN backend writes as these)."""
    b = NeuralNetworkBuilder([("x", datatypes.Array(1, 1, 4))], [("y", None)], disable_rank5_shape_mapping=True)
    b.add_resize_bilinear("rs", "x", "y", target_height=1, target_width=1, mode=mode)
    y = mljax.MLModel(b.spec).predict({"x": np.arange(4, dtype=np.float32).reshape(1, 1, 4)})["y"]
    np.testing.assert_allclose(y.reshape(-1), [expected], atol=1e-6)


def test_elu_layer_gradient_is_finite_for_large_inputs():
    """Updatable NeuralNetwork models train through these layers: d/dW sum(elu(W x)) = elu'(W x) x^T
    with elu'(h) = 1 for h > 0, alpha * exp(h) otherwise (the untaken expm1 branch must not be inf)."""
    import jax

    from mljax.neuralnetwork.builder import network_function
    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", None)], disable_rank5_shape_mapping=True)
    b.add_inner_product("ip", np.eye(3, dtype=np.float32), None, 3, 3, False, "x", "h")
    b.add_activation("elu", "ELU", "h", "y", params=0.5)
    fn, weights = network_function(b.spec)
    x = np.array([-1.0, 0.5, 200.0], np.float32)
    grad = jax.grad(lambda w: fn(w, {"x": x})["y"].sum())(weights)["ip/weight"]
    slope = np.where(x > 0, 1.0, 0.5 * np.exp(x))
    np.testing.assert_allclose(np.asarray(grad), slope[:, None] * x[None, :], rtol=1e-6)


def test_neuralnetwork_models_use_the_executable_cache(tmp_path, monkeypatch):
    """A second load of the same NeuralNetwork deserializes the executable (as ML programs do)."""
    import mljax.cache
    monkeypatch.setattr(mljax.cache, "_DIR", [tmp_path])
    rng = np.random.default_rng(3)
    w, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", None)], disable_rank5_shape_mapping=True)
    b.add_inner_product("ip", w, bias, 3, 4, True, "x", "h")
    b.add_activation("relu", "RELU", "h", "y")
    x = rng.normal(size=3).astype(np.float32)
    first = mljax.MLModel(b.spec)
    y1 = first.predict({"x": x})["y"]
    assert first._cached_fn.loaded_from_disk == 0 and len(list(tmp_path.glob("*.bin"))) == 1
    second = mljax.MLModel(b.spec)
    y2 = second.predict({"x": x})["y"]
    assert second._cached_fn.loaded_from_disk == 1
    np.testing.assert_allclose(y2, np.maximum(w @ x + bias, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y1, y2)
