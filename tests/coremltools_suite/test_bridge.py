"""mljax.coremltools: coremltools' MLModel.predict / make_state running on mljax."""
from __future__ import annotations

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

import mljax.coremltools as bridge  # noqa: E402
from helpers import accumulator_program, tmp_path_for  # noqa: E402
from mljax.ops._registry import lookup  # noqa: E402


@pytest.fixture
def enabled():
    bridge.enable()
    yield
    bridge.disable()


def _convert(prog, opset=ct.target.iOS17, fp16=False):
    return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
                      compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)


def _relu_sub_model():
    @mb.program(input_specs=[mb.TensorSpec((2, 3)), mb.TensorSpec((2, 3))], opset_version=ct.target.iOS17)
    def prog(x, y):
        return mb.relu(x=mb.sub(x=x, y=y, name="d"), name="out")
    return _convert(prog)


def test_predict_runs_on_mljax_and_matches_numpy(enabled):
    model = _relu_sub_model()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(2, 3)).astype(np.float32)
    out = model.predict({"x": x, "y": y})
    assert set(out) == {"out"}
    assert out["out"].dtype == np.float32
    np.testing.assert_allclose(out["out"], np.maximum(x - y, 0), rtol=1e-6, atol=1e-6)
    # cached: the second call reuses the same mljax model
    first = bridge.mljax_model(model)
    model.predict({"x": y, "y": x})
    assert bridge.mljax_model(model) is first


def test_batch_predict_list_of_dicts(enabled):
    model = _relu_sub_model()
    rng = np.random.default_rng(1)
    items = [{"x": rng.normal(size=(2, 3)), "y": rng.normal(size=(2, 3))} for _ in range(3)]
    outs = model.predict(items)
    assert isinstance(outs, list) and len(outs) == 3
    for d, o in zip(items, outs):
        np.testing.assert_allclose(o["out"], np.maximum(d["x"] - d["y"], 0).astype(np.float32), atol=1e-6)


def test_input_conventions_lists_torch_and_bad_names(enabled):
    torch = pytest.importorskip("torch")
    model = _relu_sub_model()
    x = [[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]]
    out = model.predict({"x": x, "y": torch.ones(2, 3)})
    np.testing.assert_allclose(out["out"], np.maximum(np.array(x) - 1, 0))
    with pytest.raises(KeyError):
        model.predict({"x": x, "y": x, "z": x})
    with pytest.raises(TypeError):
        model.predict(("x", x))


def test_int32_program_takes_float_inputs_like_core_ml(enabled):
    @mb.program(input_specs=[mb.TensorSpec((4,), dtype=types.int32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.mul(x=x, y=np.int32(3), name="out")
    model = _convert(prog)
    out = model.predict({"x": np.array([1, 2, -3, 4], np.float32)})
    assert out["out"].dtype == np.int32
    np.testing.assert_array_equal(out["out"], [3, 6, -9, 12])


def test_disable_restores_coremltools_predict():
    model = _relu_sub_model()
    bridge.enable()
    assert bridge.is_enabled()
    bridge.disable()
    assert not bridge.is_enabled()
    with pytest.raises(Exception, match="(?i)unable to load|framework|predict"):
        model.predict({"x": np.zeros((2, 3)), "y": np.zeros((2, 3))})


def test_multifunction_model_runs_the_chosen_function(enabled):
    @mb.program(input_specs=[mb.TensorSpec((3,))], opset_version=ct.target.iOS18)
    def double(x):
        return mb.mul(x=x, y=2.0, name="out")

    @mb.program(input_specs=[mb.TensorSpec((3,))], opset_version=ct.target.iOS18)
    def negate(x):
        return mb.mul(x=x, y=-1.0, name="out")

    paths = []
    for prog in (double, negate):
        path = str(tmp_path_for("fn.mlpackage"))
        _convert(prog, opset=ct.target.iOS18).save(path)
        paths.append(path)
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(paths[0], src_function_name="main", target_function_name="double")
    desc.add_function(paths[1], src_function_name="main", target_function_name="negate")
    desc.default_function_name = "double"
    multi = str(tmp_path_for("multi.mlpackage"))
    ct.utils.save_multifunction(desc, multi)

    x = np.array([1.0, -2.0, 3.5], np.float32)
    np.testing.assert_allclose(ct.models.MLModel(multi).predict({"x": x})["out"], 2 * x)
    neg = ct.models.MLModel(multi, function_name="negate")
    np.testing.assert_allclose(neg.predict({"x": x})["out"], -x)


def _read_only_state_model():
    @mb.program(input_specs=[mb.StateTensorSpec((2, 3), dtype=types.fp16), mb.TensorSpec((2, 3), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(acc, x):
        return mb.add(x=mb.read_state(input=acc), y=x, name="out")
    return _convert(prog, opset=ct.target.iOS18, fp16=True)


def test_make_state_read_write_and_predict_with_state(enabled):
    model = _read_only_state_model()
    state = model.make_state()
    assert isinstance(state, ct.models.model.MLState)
    np.testing.assert_array_equal(state.read_state("acc"), np.zeros((2, 3), np.float16))
    state.write_state("acc", np.full((2, 3), 1.5, np.float16))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = model.predict({"x": x}, state=state)
    np.testing.assert_allclose(out["out"], x + 1.5)
    with pytest.raises(Exception):
        state.write_state("acc", np.zeros((3, 3), np.float16))
    with pytest.raises(Exception):
        state.read_state("nope")


def test_state_updates_accumulate_across_predictions(enabled):
    assert lookup("write_state", 18) is not None
    model = _convert(accumulator_program(), opset=ct.target.iOS18, fp16=True)
    state = model.make_state()
    x = np.array([1, 2, 3], np.float32)
    for i in range(1, 4):
        np.testing.assert_allclose(model.predict({"x": x}, state=state)["out"], i * x)
    np.testing.assert_allclose(state.read_state("acc"), 3 * x)


def test_pil_image_input_and_output(enabled):
    Image = pytest.importorskip("PIL.Image")

    @mb.program(input_specs=[mb.TensorSpec((1, 3, 4, 5))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.mul(x=x, y=0.5, name="out")
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                       compute_precision=ct.precision.FLOAT32,
                       inputs=[ct.ImageType(name="x", shape=(1, 3, 4, 5), color_layout=ct.colorlayout.BGR)])
    spec = model.get_spec()   # make the output an RGB image (what style-transfer models declare)
    image_type = spec.description.output[0].type.imageType
    image_type.width, image_type.height = 5, 4
    image_type.colorSpace = ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    model = ct.models.MLModel(spec, weights_dir=model.weights_dir)
    rgb = (np.arange(60).reshape(4, 5, 3) * 4).astype(np.uint8)
    out = model.predict({"x": Image.fromarray(rgb, "RGB")})["out"]
    # Core ML hands RGB image outputs back as RGBA (coremltools' test_io_types checks this)
    assert isinstance(out, Image.Image) and out.size == (5, 4) and out.mode == "RGBA"
    # the program sees BGR channels; its RGB output image therefore holds them swapped
    expected = np.rint(rgb[:, :, ::-1].astype(np.float32) * 0.5)
    pixels = np.asarray(out, np.float32)
    np.testing.assert_allclose(pixels[:, :, :3], expected, atol=1)
    np.testing.assert_array_equal(pixels[:, :, 3], 255)
    with pytest.raises(TypeError):   # coremltools' own check: image inputs must be PIL images
        model.predict({"x": rgb})


def test_input_with_extra_leading_unit_dims_is_reshaped(enabled):
    """Core ML takes a (1, 3) array for a classic model's fixed (3,) feature (coremltools'
    test_io_types relies on it)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    from coremltools.converters import sklearn as sk_convert
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    reg = linear_model.LinearRegression().fit(X, y)
    model = sk_convert.convert(reg, "data", "target")
    x = np.array([[1.0, -2.0, 3.5]])
    np.testing.assert_allclose(model.predict({"data": x})["target"], reg.predict(x)[0], rtol=1e-5)
    with pytest.raises(Exception):   # a different element count is still refused
        model.predict({"data": np.ones((2, 3))})


def test_input_used_as_tile_reps_is_specialized_by_value(enabled):
    """An input that an op needs as a static value (here tile's reps) is passed by value."""
    @mb.program(input_specs=[mb.TensorSpec((2, 3)), mb.TensorSpec((2,), dtype=types.int32)],
                opset_version=ct.target.iOS17)
    def prog(x, reps):
        return mb.tile(x=x, reps=reps, name="out")
    model = _convert(prog)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for reps in ([1, 1], [2, 3], [3, 1], [2, 3]):
        out = model.predict({"x": x, "reps": np.array(reps, np.float32)})["out"]
        np.testing.assert_array_equal(out, np.tile(x, reps))
    assert bridge.mljax_model(model).stage.static_inputs == ("reps",)
