"""Featurizers: coremltools-converted scikit-learn transformers and pipelines vs scikit-learn, plus
hand-built specs (strings, dictionaries, categorical mappings) vs plain-Python expectations."""
import numpy as np
import pytest
from sklearn.feature_extraction import DictVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, OneHotEncoder, StandardScaler
from sklearn.svm import SVC

import mljax
from _classic_util import assert_regression, convert, data, predict_rows
from mljax.proto import Model_pb2


def _outputs(out, name):
    return np.array([o[name] for o in out])


def test_standard_scaler():
    X, _, rng = data()
    sk = StandardScaler().fit(X * 3 + 1)
    model, spec = convert(sk)
    Xt = rng.normal(size=(10, 4))
    assert_regression(_outputs(predict_rows(model, spec, Xt), spec.description.output[0].name), sk.transform(Xt))


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_normalizer(norm):
    X, _, rng = data()
    sk = Normalizer(norm=norm).fit(X)
    from coremltools.models import datatypes
    model, spec = convert(sk, [("x", datatypes.Array(4))], "y")
    Xt = np.concatenate([rng.normal(size=(6, 4)), np.zeros((1, 4))])   # an all-zero row stays zero
    assert_regression(_outputs(predict_rows(model, spec, Xt), "y"), sk.transform(Xt))


def test_imputer():
    X, _, rng = data()
    X[::4, 1] = np.nan
    X[::7, 3] = np.nan
    sk = SimpleImputer(strategy="mean").fit(X)
    model, spec = convert(sk)
    Xt = rng.normal(size=(8, 4))
    Xt[::2, 1] = np.nan
    Xt[1, 3] = np.nan
    assert_regression(_outputs(predict_rows(model, spec, Xt), spec.description.output[0].name), sk.transform(Xt))


def test_one_hot_encoder_pipeline():
    rng = np.random.default_rng(0)
    # categories 0..n-1: coremltools writes range(n_categories) whatever the fitted categories are
    X = np.stack([rng.integers(0, 3, 40), rng.integers(0, 5, 40), rng.integers(0, 2, 40)], axis=1)
    sk = OneHotEncoder().fit(X)
    model, spec = convert(sk)
    assert spec.WhichOneof("Type") == "pipeline"
    Xt = X[:12]
    got = _outputs(predict_rows(model, spec, Xt), spec.description.output[0].name)
    np.testing.assert_array_equal(got, sk.transform(Xt).toarray())


def test_dict_vectorizer_pipeline():
    records = [{"a": 1.0, "b": 2.5}, {"c": -3.0}, {"a": 0.5, "c": 4.0, "d": 1.0}]
    sk = DictVectorizer(sparse=False).fit(records)
    model, spec = convert(sk)
    name = spec.description.input[0].name
    tests = [{"a": 2.0}, {"b": 1.0, "d": -1.0}, {"c": 7.0, "a": 1.0}]
    out = model.predict([{name: r} for r in tests])
    got = _outputs(out, spec.description.output[0].name)
    np.testing.assert_allclose(got, sk.transform(tests))


@pytest.mark.parametrize("make_last", [
    lambda: SVC(kernel="rbf", gamma=0.5),
    lambda: LinearRegression(),
], ids=["scaler_svc", "normalizer_linreg"])
def test_sklearn_pipelines(make_last):
    X, y, rng = data(n=100, classes=3)
    last = make_last()
    first = StandardScaler() if isinstance(last, SVC) else Normalizer()
    target = y if isinstance(last, SVC) else X @ np.array([1.0, -1.0, 2.0, 0.5])
    sk = make_pipeline(first, last).fit(X * 2 + 1, target)
    from coremltools.models import datatypes
    model, spec = convert(sk, [("input", datatypes.Array(4))], "out")
    assert spec.WhichOneof("Type") in ("pipelineClassifier", "pipelineRegressor")
    Xt = rng.normal(size=(20, 4)) * 2 + 1
    out = predict_rows(model, spec, Xt)
    if isinstance(last, SVC):
        assert [o["out"] for o in out] == list(sk.predict(Xt))
    else:
        assert_regression(_outputs(out, "out"), sk.predict(Xt))


# --- hand-built specs ------------------------------------------------------------------

def _spec(kind, inputs, outputs):
    """``inputs``/``outputs``: [(name, type)] with type 'double', 'int64', 'string', ('array', n),
    ('dict', 'int'|'str')."""
    spec = Model_pb2.Model(specificationVersion=1)
    getattr(spec, kind).SetInParent()
    for coll, feats in ((spec.description.input, inputs), (spec.description.output, outputs)):
        for name, t in feats:
            ft = coll.add(name=name).type
            if t == "double":
                ft.doubleType.SetInParent()
            elif t == "int64":
                ft.int64Type.SetInParent()
            elif t == "string":
                ft.stringType.SetInParent()
            elif t[0] == "array":
                ft.multiArrayType.shape.append(t[1])
                ft.multiArrayType.dataType = Model_pb2.ArrayFeatureType.DOUBLE
            else:
                (ft.dictionaryType.int64KeyType if t[1] == "int" else ft.dictionaryType.stringKeyType).SetInParent()
    return spec


@pytest.mark.parametrize("sparse", [False, True])
def test_one_hot_encoder_strings(sparse):
    spec = _spec("oneHotEncoder", [("s", "string")], [("v", ("dict", "int") if sparse else ("array", 3))])
    ohe = spec.oneHotEncoder
    ohe.stringCategories.vector.extend(["red", "green", "blue"])
    ohe.outputSparse = sparse
    ohe.handleUnknown = Model_pb2.OneHotEncoder.IgnoreUnknown
    model = mljax.MLModel(spec)
    out = model.predict([{"s": "green"}, {"s": "blue"}, {"s": "pink"}])
    if sparse:
        assert [o["v"] for o in out] == [{1: 1.0}, {2: 1.0}, {}]
    else:
        np.testing.assert_array_equal(_outputs(out, "v"), [[0, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_one_hot_encoder_unknown_is_an_error():
    spec = _spec("oneHotEncoder", [("s", "string")], [("v", ("array", 2))])
    spec.oneHotEncoder.stringCategories.vector.extend(["a", "b"])
    with pytest.raises(mljax.InputError, match="'zzz'"):
        mljax.MLModel(spec).predict({"s": "zzz"})


def test_categorical_mapping_both_ways():
    to_int = _spec("categoricalMapping", [("s", "string")], [("i", "int64")])
    to_int.categoricalMapping.stringToInt64Map.map.update({"x": 10, "y": 20})
    to_int.categoricalMapping.int64Value = -1
    model = mljax.MLModel(to_int)
    assert [o["i"] for o in model.predict([{"s": "y"}, {"s": "x"}, {"s": "?"}])] == [20, 10, -1]

    to_str = _spec("categoricalMapping", [("i", "int64")], [("s", "string")])
    to_str.categoricalMapping.int64ToStringMap.map.update({3: "three", -7: "minus seven"})
    to_str.categoricalMapping.strValue = "unknown"
    model = mljax.MLModel(to_str)
    assert [o["s"] for o in model.predict([{"i": -7}, {"i": 3}, {"i": 4}])] == ["minus seven", "three", "unknown"]


def test_feature_vectorizer_mixed_inputs():
    spec = _spec("featureVectorizer", [("a", "double"), ("b", ("array", 3)), ("c", ("dict", "int")), ("d", "int64")],
                 [("out", ("array", 9))])
    for name, dims in (("a", 1), ("b", 3), ("c", 4), ("d", 1)):
        spec.featureVectorizer.inputList.add(inputColumn=name, inputDimensions=dims)
    model = mljax.MLModel(spec)
    out = model.predict({"a": 1.5, "b": np.array([1.0, 2.0, 3.0]), "c": {0: 4.0, 3: 5.0}, "d": 7})["out"]
    np.testing.assert_array_equal(out, [1.5, 1, 2, 3, 4, 0, 0, 5, 7])


def test_array_feature_extractor_and_scaler_broadcast():
    afe = _spec("arrayFeatureExtractor", [("x", ("array", 5))], [("y", ("array", 3))])
    afe.arrayFeatureExtractor.extractIndex.extend([4, 0, 2])
    x = np.array([10.0, 11.0, 12.0, 13.0, 14.0])
    np.testing.assert_array_equal(mljax.MLModel(afe).predict({"x": x})["y"], [14, 10, 12])

    one = _spec("arrayFeatureExtractor", [("x", ("array", 5))], [("y", "int64")])
    one.arrayFeatureExtractor.extractIndex.append(3)
    assert mljax.MLModel(one).predict({"x": x})["y"] == 13

    scaler = _spec("scaler", [("x", ("array", 5))], [("y", ("array", 5))])
    scaler.scaler.shiftValue.append(-10.0)
    scaler.scaler.scaleValue.append(0.5)
    np.testing.assert_allclose(mljax.MLModel(scaler).predict({"x": x})["y"], (x - 10) * 0.5)


def test_dict_vectorizer_int_keys_and_identity():
    dv = _spec("dictVectorizer", [("d", ("dict", "int"))], [("v", ("array", 3))])
    dv.dictVectorizer.int64ToIndex.vector.extend([30, 10, 20])
    np.testing.assert_array_equal(mljax.MLModel(dv).predict({"d": {10: 1.0, 20: 2.0, 99: 5.0}})["v"], [0, 1, 2])

    ident = _spec("identity", [("a", ("array", 2)), ("b", "double")], [("a2", ("array", 2)), ("b2", "double")])
    out = mljax.MLModel(ident).predict({"a": np.array([1.0, 2.0]), "b": 3.0})
    np.testing.assert_array_equal(out["a2"], [1.0, 2.0])
    assert out["b2"] == 3.0


def test_imputer_scalar_replace_value():
    spec = _spec("imputer", [("x", ("array", 3))], [("y", ("array", 3))])
    spec.imputer.imputedDoubleValue = 9.0
    spec.imputer.replaceDoubleValue = -1.0
    np.testing.assert_array_equal(mljax.MLModel(spec).predict({"x": np.array([-1.0, 2.0, -1.0])})["y"], [9, 2, 9])
