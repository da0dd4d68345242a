"""GLMRegressor / GLMClassifier: coremltools-converted scikit-learn models vs scikit-learn, plus
hand-built specs for the transforms and encodings no sklearn converter emits (vs a NumPy reference)."""
import warnings

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.svm import LinearSVC, LinearSVR

import mljax
from _classic_util import assert_regression, convert, data, predict_rows
from mljax.proto import Model_pb2


def _fit_logistic(X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # multi_class is deprecated in scikit-learn 1.5
        return LogisticRegression(multi_class="ovr").fit(X, y)


@pytest.mark.parametrize("cls", [LinearRegression, Ridge, LinearSVR])
def test_linear_regressors_match_sklearn(cls):
    X, _, rng = data()
    y = X @ np.array([1.5, -2.0, 0.3, 4.0]) + 0.7 + 0.05 * rng.normal(size=len(X))
    sk = cls().fit(X, y)
    model, spec = convert(sk)
    Xt = rng.normal(size=(12, 4)) * 3
    out = predict_rows(model, spec, Xt)
    assert_regression([o["prediction"] for o in out], sk.predict(Xt))


def test_linear_regression_with_named_double_inputs():
    X, _, rng = data()
    sk = LinearRegression().fit(X, X @ np.array([1.0, 2.0, 3.0, 4.0]))
    model, spec = convert(sk, ["a", "b", "c", "d"], "y")
    Xt = rng.normal(size=(5, 4))
    got = [model.predict(dict(zip("abcd", map(float, x))))["y"] for x in Xt]
    assert_regression(got, sk.predict(Xt))


@pytest.mark.parametrize("classes", [2, 3, 4])
@pytest.mark.parametrize("fit", [_fit_logistic, lambda X, y: LinearSVC().fit(X, y)], ids=["logistic", "linear_svc"])
def test_linear_classifiers_match_sklearn(classes, fit):
    X, y, rng = data(classes=classes)
    sk = fit(X, y)
    model, spec = convert(sk)
    Xt = rng.normal(size=(25, 4))
    out = predict_rows(model, spec, Xt)
    assert [o["classLabel"] for o in out] == list(sk.predict(Xt))
    if isinstance(sk, LogisticRegression):
        probs = [[o["classProbability"][c] for c in sk.classes_] for o in out]
        assert_regression(probs, sk.predict_proba(Xt), rtol=1e-4, atol=1e-5)


def test_string_labels():
    X, y, rng = data(classes=3)
    names = np.array(["cat", "dog", "emu"])
    sk = _fit_logistic(X, names[y])
    model, spec = convert(sk)
    Xt = rng.normal(size=(10, 4))
    out = predict_rows(model, spec, Xt)
    assert [o["classLabel"] for o in out] == list(sk.predict(Xt))
    assert set(out[0]["classProbability"]) == set(names)


def _glm_spec(kind, W, b, *, transform=0, encoding=1, labels=None):
    spec = Model_pb2.Model(specificationVersion=1)
    params = getattr(spec, kind)
    for row in W:
        params.weights.add().value.extend(row)
    params.offset.extend(b)
    params.postEvaluationTransform = transform
    inp = spec.description.input.add(name="x")
    inp.type.multiArrayType.shape.append(W.shape[1])
    inp.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.DOUBLE
    if kind == "glmRegressor":
        out = spec.description.output.add(name="y")
        out.type.multiArrayType.shape.append(W.shape[0])
        out.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.DOUBLE
        spec.description.predictedFeatureName = "y"
        return spec
    params.classEncoding = encoding
    params.int64ClassLabels.vector.extend(labels)
    spec.description.output.add(name="label").type.int64Type.SetInParent()
    spec.description.output.add(name="probs").type.dictionaryType.int64KeyType.SetInParent()
    spec.description.predictedFeatureName = "label"
    spec.description.predictedProbabilitiesName = "probs"
    return spec


@pytest.mark.parametrize("transform,f", [(0, lambda z: z), (1, lambda z: 1 / (1 + np.exp(-z))), (2, norm.cdf)])
def test_glm_regressor_transforms_multi_output(transform, f):
    rng = np.random.default_rng(1)
    W, b, x = rng.normal(size=(3, 5)), rng.normal(size=3), rng.normal(size=5)
    model = mljax.MLModel(_glm_spec("glmRegressor", W, b, transform=transform))
    assert_regression(model.predict({"x": x})["y"], f(W @ x + b), rtol=1e-5)


def test_glm_classifier_reference_class_logit():
    rng = np.random.default_rng(2)
    W, b = rng.normal(size=(2, 4)), rng.normal(size=2)      # 3 classes, class 10 is the reference
    model = mljax.MLModel(_glm_spec("glmClassifier", W, b, encoding=0, labels=[10, 20, 30]))
    for x in rng.normal(size=(5, 4)):
        z = np.concatenate([[0.0], W @ x + b])
        p = np.exp(z) / np.exp(z).sum()
        out = model.predict({"x": x})
        assert out["label"] == [10, 20, 30][int(np.argmax(p))]
        assert_regression([out["probs"][k] for k in (10, 20, 30)], p, rtol=1e-5)


def test_glm_classifier_binary_probit():
    rng = np.random.default_rng(3)
    W, b = rng.normal(size=(1, 4)), rng.normal(size=1)
    model = mljax.MLModel(_glm_spec("glmClassifier", W, b, transform=1, encoding=0, labels=[0, 1]))
    for x in rng.normal(size=(5, 4)):
        p1 = norm.cdf(W[0] @ x + b[0])
        out = model.predict({"x": x})
        assert out["label"] == int(p1 > 0.5)
        assert_regression([out["probs"][0], out["probs"][1]], [1 - p1, p1], rtol=1e-5)


def test_bad_weight_rows_are_rejected():
    W = np.ones((5, 3))
    with pytest.raises(mljax.ModelFormatError, match="weight rows"):
        mljax.MLModel(_glm_spec("glmClassifier", W, np.zeros(5), labels=[0, 1, 2]))


def test_a_feature_vector_of_another_width_is_an_input_error():
    """Inside a pipeline an earlier stage may hand a GLM a vector of another width: an InputError
    naming both widths (was a raw dot_general TypeError; a width of 1 would have broadcast)."""
    from mljax.errors import InputError
    X, y, rng = data()
    model, _ = convert(LinearRegression().fit(X, X @ np.arange(4.0)))
    name = next(iter(model.input_description))
    for width in (0, 1, 5):
        with pytest.raises(InputError, match=f"expected 4 values in all.*found {width}"):
            model.stage.fn(model.weights, {name: np.zeros(width)}, {})
