"""The validation boundary: what the fuzz campaign found, each as a real coremltools-written model
with one defect, ending in an mljax.errors exception that says what was expected and found."""
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import mljax
from mljax.errors import InputError, ModelFormatError
from mljax.format.package import load_spec
from mljax.proto import Model_pb2

from helpers import convert_mil, tmp_path_for

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

CORE = Path("Data", "com.apple.CoreML")
W = np.linspace(-1, 1, 120, dtype=np.float32).reshape(3, 40)


@mb.program(input_specs=[mb.TensorSpec(shape=(1, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
def _loop_prog(x):
    def cond(i, acc):
        return mb.less(x=i, y=np.int32(3))

    def body(i, acc):
        return mb.add(x=i, y=np.int32(1)), mb.mul(x=acc, y=np.float32(0.5))
    _, acc = mb.while_loop(_cond=cond, _body=body, loop_vars=(np.int32(0), x))
    return mb.matmul(x=acc, y=W, name="y")


@pytest.fixture(scope="module")
def program():
    path = convert_mil(_loop_prog)
    return path, load_spec(path).spec


def _load(spec, path):
    return mljax.MLModel(spec.SerializeToString(), weights_dir=path / CORE / "weights")


def _main_ops(spec):
    fn = spec.mlProgram.functions["main"]
    return fn.block_specializations[fn.opset].operations


def _copy(spec):
    out = Model_pb2.Model()
    out.CopyFrom(spec)
    return out


def test_the_seed_program_runs(program):
    path, spec = program
    x = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(_load(spec, path).predict({"x": x})["y"], (x / 8) @ W, rtol=1e-6)


def test_unknown_dtype_enum(program):
    path, spec = program
    bad = _copy(spec)
    bad.mlProgram.functions["main"].inputs[0].type.tensorType.dataType = 99
    with pytest.raises(ModelFormatError, match="unknown MIL DataType enum value 99; expected one of"):
        _load(bad, path)


def test_absurd_rank_and_shape_refused_before_allocating(program):
    path, spec = program
    bad = _copy(spec)
    bad.mlProgram.functions["main"].inputs[0].type.tensorType.rank = 2**31 - 1
    with pytest.raises(ModelFormatError, match="rank 2147483647: expected a rank of at most 64"):
        _load(bad, path)
    # a blob value is checked against the file; an immediate value before anything is allocated
    for source, message in [("blobFileValue", r"holds 120 values; the program declares shape \(549755813888, 549755813888\)"),
                            ("immediateValue", "expected at most 1,099,511,627,776 elements")]:
        bad = _copy(spec)
        const = next(op for op in bad.mlProgram.functions["main"].block_specializations["CoreML7"].operations
                     if op.type == "const" and op.attributes["val"].WhichOneof("value") == source)
        tt = const.attributes["val"].type.tensorType
        tt.rank = 2
        del tt.dimensions[:]
        for _ in range(2):
            tt.dimensions.add().constant.size = 2**39
        with pytest.raises(ModelFormatError, match=message):
            _load(bad, path)


def test_const_without_outputs(program):
    path, spec = program
    bad = _copy(spec)
    const = next(op for op in _main_ops(bad) if op.type == "const")
    del const.outputs[:]
    with pytest.raises(ModelFormatError, match="expected one output, found 0"):
        _load(bad, path)


def test_malformed_while_loop(program):
    path, spec = program
    bad = _copy(spec)
    loop = next(op for op in _main_ops(bad) if op.type == "while_loop")
    del loop.blocks[1].outputs[1:]
    with pytest.raises(ModelFormatError, match="while_loop.*expected _body with 2 outputs, found 1"):
        _load(bad, path)
    bad = _copy(spec)
    loop = next(op for op in _main_ops(bad) if op.type == "while_loop")
    del loop.blocks[1:]
    with pytest.raises(ModelFormatError, match=r"expected 2 blocks \(_cond, _body\), found 1"):
        _load(bad, path)


def test_blob_record_size_not_matching_dtype(program):
    path, spec = program
    pkg = tmp_path_for("blob.mlpackage")
    import shutil
    shutil.copytree(path, pkg)
    blob = pkg / CORE / "weights" / "weight.bin"
    raw = bytearray(blob.read_bytes())
    raw[64 + 8:64 + 16] = struct.pack("<Q", 479)     # 479 bytes of fp32
    blob.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="holds 479 bytes of fp32: expected a multiple of 4"):
        mljax.MLModel(pkg)


def _sklearn(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.converters.sklearn.convert(model).get_spec()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    return X, (X[:, 0] > 0).astype(int)


def test_ragged_support_vectors(data):
    from sklearn.svm import SVC
    spec = _sklearn(SVC().fit(*data))
    svc = spec.supportVectorClassifier if spec.HasField("supportVectorClassifier") else \
        spec.pipelineClassifier.pipeline.models[-1].supportVectorClassifier
    svc.denseSupportVectors.vectors[1].values.append(1.0)
    with pytest.raises(ModelFormatError, match=r"expected dense support vectors of one length; found lengths \[3, 4\]"):
        mljax.MLModel(spec)


def test_ragged_knn_samples(data):
    from sklearn.neighbors import KNeighborsClassifier
    spec = _sklearn(KNeighborsClassifier(3).fit(*data))
    knn = spec.kNearestNeighborsClassifier if spec.HasField("kNearestNeighborsClassifier") else \
        spec.pipelineClassifier.pipeline.models[-1].kNearestNeighborsClassifier
    del knn.nearestNeighborsIndex.floatSamples[2].vector[1:]
    with pytest.raises(ModelFormatError, match=r"expected samples of one length; found lengths \[1, 3\]"):
        mljax.MLModel(spec)


def test_pipeline_without_models(data):
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, _ = data
    spec = _sklearn(make_pipeline(StandardScaler(), LinearRegression()).fit(X, X[:, 0]))
    kind = spec.WhichOneof("Type")
    pipe = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
    del pipe.models[:]
    with pytest.raises(ModelFormatError, match="expected at least one model; found none"):
        mljax.MLModel(spec)


# --- predict inputs (issue 14 item 5) ------------------------------------------------------------
def test_double_features_given_non_numbers():
    from sklearn.linear_model import LinearRegression
    X = np.random.default_rng(0).normal(size=(20, 2))
    spec = _sklearn_named(LinearRegression().fit(X, X[:, 0]))
    model = mljax.MLModel(spec)
    assert model.predict({"a": 1.0, "b": 2.0})["target"] == pytest.approx(1.0, abs=1e-9)
    for bad, found in [({"x": 1}, "found dict"), ("1.5", "found str"), ([[1, 2], [3]], "found list"),
                       ([1.0, 2.0], r"found list of dtype float64 and shape \(2,\)"), (None, "found NoneType")]:
        with pytest.raises(InputError, match=f"input 'a': expected one number \\(double\\); {found}"):
            model.predict({"a": bad, "b": 2.0})


def _sklearn_named(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.converters.sklearn.convert(model, ["a", "b"], "target").get_spec()


def test_empty_batch_in_a_neural_network():
    sys.path.insert(0, str(Path(__file__).parents[1] / "updatable"))
    from models import dense_classifier
    model = mljax.MLModel(dense_classifier()[0])
    with pytest.raises(InputError, match=r"input 'features': expected a non-empty array; found shape \(0, 6\)"):
        model.predict({"features": np.zeros((0, 6), np.float32)})


def test_glm_and_knn_weights_wider_than_the_inputs(data):
    from sklearn.linear_model import LinearRegression
    from sklearn.neighbors import KNeighborsClassifier
    X, y = data
    spec = _sklearn(LinearRegression().fit(X, X[:, 0]))
    glm = spec.glmRegressor if spec.HasField("glmRegressor") else spec.pipelineRegressor.pipeline.models[-1].glmRegressor
    for row in glm.weights:
        row.value.append(0.5)
    with pytest.raises(ModelFormatError, match="GLMRegressor: its weight rows take 4 input values; the model's inputs describe 3"):
        mljax.MLModel(spec)
    spec = _sklearn(KNeighborsClassifier(3).fit(X, y))
    knn = spec.kNearestNeighborsClassifier if spec.HasField("kNearestNeighborsClassifier") else \
        spec.pipelineClassifier.pipeline.models[-1].kNearestNeighborsClassifier
    for sample in knn.nearestNeighborsIndex.floatSamples:
        del sample.vector[2:]
    with pytest.raises(ModelFormatError, match="its samples take 2 input values; the model's inputs describe 3"):
        mljax.MLModel(spec)


def test_an_op_input_given_a_dictionary_value(program):
    path, spec = program
    bad = _copy(spec)
    matmul = next(op for op in _main_ops(bad) if op.type == "matmul")
    arg = next(iter(matmul.inputs.values())).arguments[0]
    arg.ClearField("name")
    dict_type = arg.value.type.dictionaryType
    dict_type.keyType.tensorType.dataType = 23     # int32 (MIL DataType)
    dict_type.valueType.tensorType.dataType = 23
    arg.value.immediateValue.dictionary.SetInParent()
    with pytest.raises(ModelFormatError, match="is a DictType value; expected a tensor, a list or a variable"):
        _load(bad, path)


def test_a_network_output_no_layer_produces():
    sys.path.insert(0, str(Path(__file__).parents[1] / "updatable"))
    from models import dense_classifier
    spec = load_spec(dense_classifier()[0]).spec
    spec.neuralNetworkClassifier.layers[-1].output[0] = "elsewhere"
    with pytest.raises(ModelFormatError, match=r"the network describes outputs \['probs'\] that no input or layer produces"):
        mljax.MLModel(spec).predict({"features": np.ones(6, np.float32)})


def test_an_image_output_that_is_not_an_image():
    from mljax.neuralnetwork.images import array_to_image
    with pytest.raises(ModelFormatError, match=r"expected a \[.., C, H, W\] blob of one image with C in \(1, 3, 4\); found shape \(2, 4\)"):
        array_to_image(np.zeros((2, 4), np.float32), "RGB")
    assert np.asarray(array_to_image(np.full((1, 3, 2, 2), 7.0), "RGB")).shape == (2, 2, 3)


def test_scaler_values_not_one_per_input(data):
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, _ = data
    spec = _sklearn(make_pipeline(StandardScaler(), LinearRegression()).fit(X, X[:, 0]))
    kind = spec.WhichOneof("Type")
    pipe = spec.pipeline if kind == "pipeline" else getattr(spec, kind).pipeline
    scaler = next(m for m in pipe.models if m.HasField("scaler")).scaler
    scaler.shiftValue.append(1.0)
    with pytest.raises(ModelFormatError, match="Scaler: expected 1 or 3 shift values"):
        mljax.MLModel(spec)


def test_an_immediate_tuple_declared_as_a_tensor(program):
    path, spec = program
    bad = _copy(spec)
    const = next(op for op in _main_ops(bad)
                 if op.type == "const" and op.attributes["val"].WhichOneof("value") == "immediateValue")
    const.attributes["val"].immediateValue.tuple.SetInParent()
    with pytest.raises(ModelFormatError, match="an immediate tuple value declared with the type"):
        _load(bad, path)


def test_a_random_layer_with_a_negative_output_shape():
    sys.path.insert(0, str(Path(__file__).parents[1] / "updatable"))
    from models import dense_classifier
    spec = load_spec(dense_classifier()[0]).spec
    layer = spec.neuralNetworkClassifier.layers[1]            # relu1 -> a random layer
    layer.randomBernoulliStatic.outputShape.extend([2**40, 5])
    with pytest.raises(ModelFormatError, match=r"layer 'relu1': output shape \(1099511627776, 5\); expected sizes >= 0 "
                                               r"and at most 2,147,483,648 values"):
        mljax.MLModel(spec).predict({"features": np.ones(6, np.float32)})
