"""``MLModel`` as coremltools users meet it: constructor keywords, descriptions, the path ``save`` returns."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mljax
from helpers import tmp_path_for
from mljax.errors import InputError, PredictionError

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402


@pytest.fixture(scope="module")
def flexible():
    """An ML program with a range-shaped input, an enumerated-shape input and a fixed one."""
    from coremltools.converters.mil.mil import get_new_symbol

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, get_new_symbol())), mb.TensorSpec(shape=(get_new_symbol(), 4))])
    def prog(x, y):
        return mb.relu(x=x, name="out_x"), mb.mul(x=y, y=2.0, name="out_y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
                       compute_precision=ct.precision.FLOAT32,
                       inputs=[ct.TensorType(name="x", shape=(1, ct.RangeDim(2, 10, default=3))),
                               ct.TensorType(name="y", shape=ct.EnumeratedShapes([(2, 4), (3, 4)], default=(2, 4)))])
    path = tmp_path_for("flexible.mlpackage")
    model.save(str(path))
    return path


def test_unknown_keyword_is_a_type_error_naming_it(flexible):
    with pytest.raises(TypeError) as err:
        mljax.MLModel(flexible, compute_precison="float32")
    text = str(err.value)
    assert "'compute_precison'" in text and "did you mean 'compute_precision'" in text
    for accepted in ("is_temp_package", "mil_program", "skip_model_load", "compute_units", "weights_dir",
                     "function_name", "optimization_hints", "compute_precision"):
        assert accepted in text
    with pytest.raises(TypeError, match="is_temp_package, is keyword-only"):
        mljax.MLModel(flexible, True)            # coremltools' second positional argument


def test_coremltools_keywords_are_accepted(flexible):
    import inspect
    ct_params = set(inspect.signature(ct.models.MLModel.__init__).parameters) - {"self", "model"}
    mljax_params = set(inspect.signature(mljax.MLModel.__init__).parameters)
    assert ct_params <= mljax_params, ct_params - mljax_params
    model = mljax.MLModel(flexible, compute_units=ct.ComputeUnit.CPU_ONLY, mil_program=None,
                          optimization_hints={"reshapeFrequency": ct.ReshapeFrequency.Frequent})
    assert model.compute_unit == "CPU_ONLY"
    x = np.array([[1.0, -2.0, 3.0, -4.0]], np.float32)
    np.testing.assert_array_equal(model.predict({"x": x, "y": np.ones((2, 4), np.float32)})["out_x"],
                                  np.maximum(x, 0))
    with pytest.raises(InputError, match="compute_units must be"):
        mljax.MLModel(flexible, compute_units="GPU_ONLY")
    with pytest.raises(InputError, match="unknown key"):
        mljax.MLModel(flexible, optimization_hints={"fast": True})


def test_skip_model_load_describes_and_saves_but_does_not_predict(flexible, tmp_path):
    model = mljax.MLModel(flexible, skip_model_load=True)
    assert list(model.input_description) == ["x", "y"]
    with pytest.raises(PredictionError, match="skip_model_load=True"):
        model.predict({"x": np.zeros((1, 3), np.float32), "y": np.zeros((2, 4), np.float32)})
    again = mljax.MLModel(model.save(tmp_path / "copy.mlpackage"))
    out = again.predict({"x": np.array([[-1.0, 2.0]], np.float32), "y": np.ones((3, 4), np.float32)})
    np.testing.assert_array_equal(out["out_y"], np.full((3, 4), 2.0, np.float32))


def test_is_temp_package_deletes_the_package_at_exit(flexible, tmp_path):
    import shutil
    temp = tmp_path / "temp.mlpackage"
    shutil.copytree(flexible, temp)
    code = ("import mljax, sys; m = mljax.MLModel(sys.argv[1], is_temp_package=True, skip_model_load=True); "
            "print(m.package_path.exists())")
    run = subprocess.run([sys.executable, "-c", code, str(temp)], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True" and not temp.exists()


def test_descriptions_name_type_shape_and_flexibility(flexible):
    model = mljax.MLModel(flexible)
    spec = ct.utils.load_spec(str(flexible)).description     # coremltools' reading of the same file
    x, y = spec.input
    rng = x.type.multiArrayType.shapeRange.sizeRanges
    text = repr(model.input_description)
    assert f"x: MultiArray (Float32 {rng[0].lowerBound} x {rng[1].lowerBound}..{rng[1].upperBound}, default " \
           f"{' x '.join(map(str, x.type.multiArrayType.shape))})" in text
    shapes = [" x ".join(map(str, s.shape)) for s in y.type.multiArrayType.enumeratedShapes.shapes]
    assert f"y: MultiArray (Float32 {' | '.join(shapes)}, default" in text
    assert str(model.output_description["out_x"]).startswith("MultiArray (Float32")
    printed = str(model)
    assert printed.startswith("mljax.MLModel (mlProgram") and "inputs: Features(" in printed
    assert "FeatureSpec(" not in printed + repr(model.output_description)


def test_classifier_and_image_descriptions():
    """A NeuralNetwork classifier with an image input: image format and size (width x height), the
    label and probability outputs with their class labels, as coremltools' spec states them."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder
    builder = NeuralNetworkBuilder([("image", datatypes.Array(3, 4, 6))], [("probs", None)],
                                   mode="classifier")
    builder.add_flatten(name="flat", mode=0, input_name="image", output_name="flat")
    builder.add_inner_product("ip", np.ones((3, 72), np.float32), None, 3, 72, False, "flat", "logits")
    builder.add_softmax("soft", "logits", "probs")
    builder.set_class_labels(["low", "mid", "high"], predicted_feature_name="level",
                             prediction_blob="probs")
    builder.set_pre_processing_parameters(image_input_names=["image"], is_bgr=False, image_scale=1 / 255.0)
    model = mljax.MLModel(builder.spec)
    spec = builder.spec.description
    im = spec.input[0].type.imageType
    assert str(model.input_description["image"]) == f"Image (RGB {im.width} x {im.height})"
    outputs = repr(model.output_description)
    assert f"{spec.predictedFeatureName}: String (predicted class label, one of 3)" in outputs
    assert "Dictionary (String -> Double) (probability of each class label: 'low', 'mid', 'high')" in outputs


def test_save_returns_a_path_coremltools_accepts(flexible, tmp_path):
    model = mljax.MLModel(flexible)
    saved = model.save(tmp_path / "copy.mlpackage")
    assert isinstance(saved, str) and isinstance(saved, os.PathLike)
    assert saved == tmp_path / "copy.mlpackage" and saved == str(tmp_path / "copy.mlpackage")
    assert saved.exists() and saved.suffix == ".mlpackage" and (saved / "Manifest.json").is_file()
    assert Path(saved) == tmp_path / "copy.mlpackage"
    ct_model = ct.models.MLModel(saved, skip_model_load=True)     # a plain Path: coremltools' TypeError
    assert [f.name for f in ct_model.get_spec().description.input] == ["x", "y"]


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS coremltools runs models itself")
def test_bridge_doc_quotes_what_coremltools_says(flexible):
    """docs/coremltools_bridge.md quotes coremltools' own messages on Linux: they must be current."""
    import re
    import mljax.coremltools as bridge
    doc = (Path(__file__).resolve().parents[2] / "docs" / "coremltools_bridge.md").read_text()
    quoted = set(re.findall(r'\*"([^"]+)"\*', " ".join(doc.split())))
    assert not bridge.is_enabled()
    ct_model = ct.models.MLModel(str(flexible))
    said = []
    for call in (lambda: ct_model.predict({"x": np.zeros((1, 3), np.float32), "y": np.zeros((2, 4), np.float32)}),
                 ct_model.make_state, ct_model.get_compiled_model_path,
                 lambda: ct.models.MLModel(Path(flexible))):
        with pytest.raises(Exception) as err:
            call()
        said.append(str(err.value))
    assert quoted == set(said), (quoted, said)


def test_list_predict_outputs_keep_their_size_one_axes():
    """A list predict's executable returns its outputs without their size-1 axes (XLA copied a
    product's output into its default layout otherwise) and predict restores them: every output
    has the single predict's shape and NumPy's values, whatever its size-1 axes, and a model
    with other input shapes (the flexible dimension) records its own shapes."""
    from coremltools.converters.mil.mil import get_new_symbol
    from helpers import convert_mil
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, get_new_symbol(), 3))], opset_version=ct.target.iOS17)
    def prog(x):
        y = mb.linear(x=x, weight=w, bias=b, name="y")                                  # [1, T, 5]
        col = mb.reduce_sum(x=y, axes=[1, 2], keep_dims=True, name="total")          # [1, 1, 1]
        return y, col, mb.expand_dims(x=y, axes=[2], name="y4"), mb.squeeze(x=col, name="flat")

    model = mljax.MLModel(convert_mil(prog))
    for t in (2, 1):
        xs = rng.standard_normal((6, 1, t, 3)).astype(np.float32)
        outs = model.predict([{"x": x} for x in xs])
        stacked, _ = model._batched_fn(model.weights, {"x": xs}, {})
        assert stacked["y"].shape == ((6, t, 5) if t > 1 else (6, 5))      # the executable's: squeezed
        for x, out in zip(xs, outs):
            y = x @ w.T + b
            want = {"y": y, "total": y.sum(axis=(1, 2), keepdims=True), "y4": y[:, :, None], "flat": y.sum()}
            single = model.predict({"x": x})
            for k, v in want.items():
                assert out[k].shape == np.shape(v) == single[k].shape, k
                np.testing.assert_allclose(out[k], v, rtol=1e-5, atol=1e-5)


def test_a_list_predict_checks_every_item(flexible):
    """A list predict checks its first item in full and the rest by names, dtypes and shapes: an
    item like the first computes as the single predict; one that differs (float64, a list, a bad
    shape, an unknown name) gets the single predict's checks and its error."""
    model = mljax.MLModel(flexible)
    rng = np.random.default_rng(5)
    items = [{"x": rng.standard_normal((1, 3)).astype(np.float32), "y": rng.standard_normal((2, 4)).astype(np.float32)}
             for _ in range(4)]
    items[2] = {"y": items[2]["y"].astype(np.float64), "x": items[2]["x"].tolist()}     # other order, dtype, type
    outs = model.predict(items)
    for item, out in zip(items, outs):
        x, y = np.asarray(item["x"], np.float32), np.asarray(item["y"], np.float32)
        np.testing.assert_allclose(out["out_x"], np.maximum(x, 0), rtol=1e-6)
        np.testing.assert_allclose(out["out_y"], y * 2, rtol=1e-6)
        assert list(out) == ["out_x", "out_y"] and out["out_y"].dtype == np.float32
    bad_shape = items[:3] + [{"x": items[0]["x"], "y": np.zeros((4, 4), np.float32)}]
    with pytest.raises(InputError, match=r"input 'y': expected one of the shapes .*found shape \(4, 4\)"):
        model.predict(bad_shape)
    with pytest.raises(InputError, match=r"unknown \['z'\]"):
        model.predict(items[:2] + [{**items[0], "z": np.zeros(1, np.float32)}])
    with pytest.raises(InputError, match="expected a numeric array"):
        model.predict(items[:2] + [{"x": np.array([["a", "b", "c"]]), "y": items[0]["y"]}])


def test_list_predicts_reuse_their_input_buffer_safely():
    """A list predict stacks small batches into a per-thread buffer that the next call refills:
    outputs equal to an input (a reshape, an identity) keep their values after later calls, and
    threads predicting at once each get their own results."""
    import threading

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        return mb.reshape(x=x, shape=[3, 2], name="y"), mb.identity(x=x, name="z")

    path = tmp_path_for("identity.mlpackage")
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
               compute_precision=ct.precision.FLOAT32).save(str(path))
    model = mljax.MLModel(path)
    batch = lambda base: [{"x": np.full((2, 3), base + i, np.float32)} for i in range(4)]  # noqa: E731
    first = model.predict(batch(0))
    model.predict(batch(100))
    for i, out in enumerate(first):
        np.testing.assert_array_equal(out["y"], np.full((3, 2), i, np.float32))
        np.testing.assert_array_equal(out["z"], np.full((2, 3), i, np.float32))
    wrong = []

    def worker(base):
        for _ in range(30):
            outs = model.predict(batch(base))
            if any(not np.array_equal(o["z"], np.full((2, 3), base + i, np.float32)) for i, o in enumerate(outs)):
                wrong.append(base)
    threads = [threading.Thread(target=worker, args=(b,)) for b in (1000, 2000, 3000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
