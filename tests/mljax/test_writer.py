"""The ML-program writer (IR -> MILSpec + weight blob -> .mlpackage) and the MIL text printer."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import mljax
from helpers import tmp_path_for
from mljax.errors import ModelFormatError
from mljax.format.package import load_spec
from mljax.mil.from_proto import program_from_proto, value_from_proto
from mljax.mil.text import program_to_text
from mljax.mil.to_proto import program_to_proto, value_to_proto, write_mlprogram_package
from mljax.mil.types import DTYPES, TensorType
from mljax.proto import Model_pb2

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402


def _convert(prog, target, fp16=False):
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                       compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)
    path = tmp_path_for("src.mlpackage")
    model.save(str(path))
    return path, model


def _conv_net(fp16):
    rng = np.random.default_rng(0)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 3, 8, 8), dtype=types.fp32)],
                opset_version=ct.target.iOS17)
    def prog(x):
        y = mb.conv(x=x, weight=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                    bias=rng.standard_normal(4).astype(np.float32), pad_type="same")
        y = mb.relu(x=y)
        y = mb.reduce_mean(x=y, axes=[2, 3], keep_dims=False)
        y = mb.linear(x=y, weight=rng.standard_normal((5, 4)).astype(np.float32))
        return mb.softmax(x=y, axis=-1)

    return _convert(prog, ct.target.iOS17, fp16)[0]


def _palettized_cond():
    """iOS18: 4-bit palettized weights (sub-byte blob data) and a cond with nested blocks."""
    import coremltools.optimize.coreml as cto
    rng = np.random.default_rng(1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 16), dtype=types.fp32)],
                opset_version=ct.target.iOS18)
    def prog(x):
        y = mb.linear(x=x, weight=rng.standard_normal((8, 16)).astype(np.float32))
        p = mb.greater(x=mb.reduce_sum(x=y), y=0.0)
        return mb.cond(pred=p, _true_fn=lambda: mb.relu(x=y), _false_fn=lambda: mb.sigmoid(x=y))

    _, model = _convert(prog, ct.target.iOS18)
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=4, weight_threshold=10))
    path = tmp_path_for("pal.mlpackage")
    cto.palettize_weights(model, config).save(str(path))
    return path


_MODELS = {"conv_fp32": lambda: _conv_net(False), "conv_fp16": lambda: _conv_net(True),
           "palettized_cond_ios18": _palettized_cond}
_INPUT_SHAPES = {"conv_fp32": (1, 3, 8, 8), "conv_fp16": (1, 3, 8, 8), "palettized_cond_ios18": (2, 16)}


@pytest.fixture(scope="module")
def source_models():
    return {name: make() for name, make in _MODELS.items()}


def _blob_bytes(loaded):
    return (loaded.model_dir / "weights" / "weight.bin").read_bytes()


@pytest.mark.parametrize("name", sorted(_MODELS))
def test_load_save_load_is_bit_exact(source_models, name):
    src = load_spec(source_models[name])
    program = program_from_proto(src.spec.mlProgram, src.model_dir)
    out = write_mlprogram_package(src.spec, program, tmp_path_for(f"{name}.mlpackage"))
    again = load_spec(out)
    # every op, type, attribute, binding and blob offset, and the description
    assert again.spec == src.spec
    assert _blob_bytes(again) == _blob_bytes(src)
    ct_model = ct.models.MLModel(str(out), skip_model_load=True)
    assert Model_pb2.Model.FromString(ct_model.get_spec().SerializeToString()) == src.spec
    x = {"x": np.random.default_rng(2).standard_normal(_INPUT_SHAPES[name]).astype(np.float32)}
    a, b = mljax.MLModel(source_models[name]).predict(x), mljax.MLModel(out).predict(x)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_without_blob_writer_everything_is_inline(source_models):
    src = load_spec(source_models["conv_fp16"])
    program = program_from_proto(src.spec.mlProgram, src.model_dir)
    pb = program_to_proto(program, None)
    assert "blobFileValue" not in str(pb)
    inline = program_from_proto(pb, None)
    want = {op.outputs[0].name: op.outputs[0].value for op in program.functions["main"].block.walk()
            if op.type == "const"}
    got = {op.outputs[0].name: op.outputs[0].value for op in inline.functions["main"].block.walk()
           if op.type == "const"}
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int32", "int8", "uint8", "int16", "uint16", "uint32",
                                   "int64", "bool", "uint4", "int4", "uint2", "fp64"])
@pytest.mark.parametrize("shape", [(), (3,), (2, 5)])
def test_immediate_values_round_trip(dtype, shape):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(3)
    if dt.is_float:
        values = rng.standard_normal(shape).astype(dt.numpy)
    elif dtype == "bool":
        values = rng.integers(0, 2, shape).astype(bool)
    else:
        info = (-(1 << (dt.bits - 1)), 1 << (dt.bits - 1)) if dtype.startswith("int") else (0, 1 << min(dt.bits, 31))
        values = rng.integers(*info, size=shape).astype(dt.numpy)
    t, got, ref = value_from_proto(value_to_proto(values, TensorType(dt, shape)))
    assert t == TensorType(dt, shape) and ref is None
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(values, np.float64))


def test_strings_dicts_and_tuples_round_trip():
    for value in ["same", {"a": "1", "b": ""}, ("x", np.arange(3, dtype=np.int32))]:
        _, got, _ = value_from_proto(value_to_proto(value))
        if isinstance(value, tuple):
            assert got[0] == value[0] and np.array_equal(got[1], value[1])
        else:
            assert got == value


@pytest.fixture(scope="module")
def linear_model():
    rng = np.random.default_rng(4)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 6), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.linear(x=x, weight=rng.standard_normal((4, 6)).astype(np.float32),
                         bias=rng.standard_normal(4).astype(np.float32))

    return _convert(prog, ct.target.iOS17)[0]


def test_save_writes_replaced_weights(linear_model):
    model = mljax.MLModel(linear_model)
    names = sorted(model.weights)
    (w_name,), (b_name,) = [n for n in names if np.ndim(model.weights[n]) == 2], \
        [n for n in names if np.ndim(model.weights[n]) == 1]
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    model._weights = {**model._weights, w_name: w, b_name: b}
    saved = mljax.MLModel(model.save(tmp_path_for("trained.mlpackage")))
    x = rng.standard_normal((3, 6)).astype(np.float32)
    out = next(iter(saved.predict({"x": x}).values()))
    np.testing.assert_allclose(out, x @ w.T + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(saved.weights[w_name]), w)


def test_unchanged_weights_copy_the_blob(linear_model):
    src = linear_model
    model = mljax.MLModel(src)
    out = model.save(tmp_path_for("copy.mlpackage"))
    assert _blob_bytes(load_spec(out)) == _blob_bytes(load_spec(src))


def test_replacement_weight_of_wrong_shape_is_refused(linear_model):
    src = load_spec(linear_model)
    program = program_from_proto(src.spec.mlProgram, src.model_dir)
    (name,) = [op.outputs[0].name for op in program.functions["main"].block.operations
               if op.type == "const" and np.ndim(op.outputs[0].value) == 2]
    with pytest.raises(ModelFormatError, match=f"{name}.*shape \\(6, 4\\)"):
        program_to_proto(program, None, weights={name: np.zeros((6, 4), np.float32)})


def test_text_printer(source_models):
    src = load_spec(source_models["palettized_cond_ios18"])
    text = program_to_text(program_from_proto(src.spec.mlProgram, src.model_dir))
    lines = text.splitlines()
    assert lines[0].startswith("program(version=1)")
    assert lines[1] == "func main<CoreML8>(%x: tensor<fp32, [2, 16]>) {"
    assert "  %linear_0: tensor<fp32, [2, 8]> = linear(" in text
    assert "  %greater_0: bool = greater(x=%reduce_sum_0, y=%greater_0_y_0)" in lines
    assert "  %cond_0: tensor<fp32, [2, 8]> = cond(pred=%greater_0) {" in lines
    assert "      %relu_0: tensor<fp32, [2, 8]> = relu(x=%linear_0)" in lines
    assert "    } -> (%relu_0)" in lines
    assert "<uint4 8x16> @ @model_path/weights/weight.bin:" in text
    assert lines[-1] == "} -> (%cond_0)"


def test_replaced_weights_of_a_neural_network_are_not_saved_silently(tmp_path):
    """A NeuralNetwork given new weight values without a spec that holds them cannot be saved with
    its old values: an UnsupportedError says why (before, the file silently kept the old weights)."""
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    from mljax.errors import UnsupportedError
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(2, 3)), rng.normal(size=2)

    def spec_of(w, b):
        builder = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(2))])
        builder.add_inner_product("fc", W=w, b=b, input_channels=3, output_channels=2, has_bias=True,
                                  input_name="x", output_name="y")
        return builder.spec
    path = tmp_path / "fc.mlmodel"
    path.write_bytes(spec_of(w, b).SerializeToString())
    model = mljax.MLModel(str(path))
    x = rng.normal(size=3).astype(np.float32)
    np.testing.assert_allclose(model.predict({"x": x})["y"], w @ x + b, rtol=1e-5, atol=1e-6)

    doubled = jax.tree_util.tree_map(lambda a: np.asarray(a) * 2, model.weights)
    other = model.with_weights(doubled)
    np.testing.assert_allclose(other.predict({"x": x})["y"], 2 * (w @ x + b), rtol=1e-5, atol=1e-6)
    before = path.read_bytes()
    with pytest.raises(UnsupportedError, match="neuralNetwork model's weights were replaced"):
        other.save(str(path))
    assert path.read_bytes() == before                  # the source model is untouched
    model.save(str(tmp_path / "same.mlmodel"))          # unchanged weights still save
    same = jax.tree_util.tree_map(np.asarray, model.weights)
    model.with_weights(same).save(str(tmp_path / "equal.mlmodel"))   # equal values: nothing is lost

    # a spec holding the doubled weights saves them; going back to the file's values without a spec
    # that holds those is refused too (compared with what the spec holds, not with the file)
    held = model.with_weights(doubled, spec=spec_of(2 * w, 2 * b))
    held.save(str(tmp_path / "doubled.mlmodel"))
    np.testing.assert_allclose(mljax.MLModel(str(tmp_path / "doubled.mlmodel")).predict({"x": x})["y"],
                               2 * (w @ x + b), rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsupportedError, match="weights were replaced"):
        held.with_weights(same).save(str(tmp_path / "back.mlmodel"))
