"""Classic models compute as Core ML does: in float64 (scikit-learn's float64 predictions within
1e-9), with float32 comparisons where every tree threshold is a float32 value (XGBoost), libsvm's
subnormal RBF decisions, and stage functions shared by models of the same structure."""
import random
import warnings

import jax
import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR

import mljax
from _classic_util import convert, data, predict_rows
from mljax.proto import Model_pb2


def _large_magnitude(n=60, seed=3):
    # coremltools' SVM tests use features around 200, -100, 100 with spread 30: float32 keeps ~5 digits
    rng = np.random.default_rng(seed)
    X = rng.normal([200.0, -100.0, 100.0], [30.0, 22.0, 42.0], size=(n, 3))
    return X, rng


def test_linear_regression_in_float64():
    X, rng = _large_magnitude()
    sk = LinearRegression().fit(X, X @ np.array([1.234567, -2.5, 0.75]) + 1e3 + rng.normal(size=len(X)))
    model, spec = convert(sk)
    got = np.array([o["prediction"] for o in predict_rows(model, spec, X)])
    np.testing.assert_allclose(got, sk.predict(X), rtol=1e-12)


@pytest.mark.parametrize("kw", [dict(kernel="rbf", gamma=1e-4), dict(kernel="poly", degree=3, gamma=1e-4)],
                         ids=["rbf", "poly"])
def test_svr_in_float64(kw):
    X, rng = _large_magnitude()
    sk = SVR(C=10.0, **kw).fit(X, X[:, 0] / 50 + np.sin(X[:, 1] / 10))
    model, spec = convert(sk)
    got = np.array([o["prediction"] for o in predict_rows(model, spec, X[:20])])
    np.testing.assert_allclose(got, sk.predict(X[:20]), rtol=1e-9, atol=1e-12)


def test_scaler_in_float64():
    X, _ = _large_magnitude()
    sk = StandardScaler().fit(X)
    model, spec = convert(sk)
    out_name = spec.description.output[0].name
    got = np.stack([np.asarray(o[out_name], np.float64) for o in predict_rows(model, spec, X)])
    np.testing.assert_allclose(got, sk.transform(X), rtol=1e-12, atol=1e-12)


def test_forest_sums_in_float64():
    X, y, rng = data(n=150)
    sk = RandomForestRegressor(n_estimators=40, random_state=0).fit(X, X[:, 0] * 1e3 + y)
    model, spec = convert(sk)
    Xt = X.astype(np.float32).astype(np.float64)   # scikit-learn compares float32 features
    got = np.array([o["prediction"] for o in predict_rows(model, spec, Xt)])
    np.testing.assert_allclose(got, sk.predict(Xt), rtol=1e-12)


def test_rbf_subnormal_decisions_follow_libsvm():
    # coremltools' SVC stress test data: far-apart points, gamma 1.2, so many kernel values are
    # subnormal; XLA flushes them to zero, libsvm (and Core ML) keep them and vote on their sign
    random.seed(42)
    x, y = [], []
    for _ in range(50):
        x.append([random.gauss(200, 30), random.gauss(-100, 22), random.gauss(100, 42)])
        y.append(random.choice(["A", "B"]))
    y[:2] = ["A", "B"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")              # max_iter=10 stops before convergence
        sk = SVC(kernel="rbf", gamma=1.2, max_iter=10).fit(x, y)
    dec = sk.decision_function(x)
    tiny = (dec != 0) & (np.abs(dec) < np.finfo(np.float64).tiny)
    assert tiny.any()                                # the case this test is about
    model, spec = convert(sk)
    assert [o["classLabel"] for o in predict_rows(model, spec, np.asarray(x))] == list(sk.predict(x))


# --- trees whose thresholds are float32 values compare float32 inputs -------------------------

def _one_split_spec(threshold: float, mode: int = 1):
    spec = Model_pb2.Model(specificationVersion=1)
    te = spec.treeEnsembleRegressor.treeEnsemble
    te.numPredictionDimensions = 1
    te.nodes.add(treeId=0, nodeId=0, nodeBehavior=mode, branchFeatureIndex=0, branchFeatureValue=threshold,
                 trueChildNodeId=1, falseChildNodeId=2)
    for node_id, value in ((1, 1.0), (2, 2.0)):
        te.nodes.add(treeId=0, nodeId=node_id, nodeBehavior=6).evaluationInfo.add(evaluationIndex=0,
                                                                                  evaluationValue=value)
    inp = spec.description.input.add(name="x")
    inp.type.multiArrayType.shape.append(1)
    inp.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.DOUBLE
    spec.description.output.add(name="y").type.doubleType.SetInParent()
    return mljax.MLModel(spec)


@pytest.mark.parametrize("mode,op", [(0, np.less_equal), (1, np.less), (2, np.greater_equal), (3, np.greater)])
def test_float32_thresholds_compare_float32_inputs(mode, op):
    t32 = np.float32(0.1)
    model32 = _one_split_spec(float(t32), mode)
    t64 = 0.1                                    # not a float32 value: inputs compare as doubles
    model64 = _one_split_spec(t64, mode)
    for x in (np.nextafter(float(t32), -1.0), float(t32), np.nextafter(float(t32), 1.0), 0.09, 0.11,
              np.nextafter(t64, -1.0), t64, np.nextafter(t64, 1.0)):
        want32 = 1.0 if op(np.float32(x), t32) else 2.0
        want64 = 1.0 if op(x, t64) else 2.0
        assert model32.predict({"x": np.array([x])})["y"] == want32, x
        assert model64.predict({"x": np.array([x])})["y"] == want64, x


def test_xgboost_on_training_points():
    xgb = pytest.importorskip("xgboost")
    import coremltools as ct
    X, _, rng = data(n=200)
    y = X[:, 0] * 2 + np.sin(X[:, 1])
    booster = xgb.XGBRegressor(n_estimators=20, max_depth=3, base_score=0.5).fit(X, y)
    names = ["a", "b", "c", "d"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mljax.MLModel(ct.converters.xgboost.convert(booster, feature_names=names, target="y"))
    # training points lie on split values: XGBoost compares them as float32, so must we
    got = np.array([o["y"] for o in model.predict([dict(zip(names, x)) for x in X])])
    np.testing.assert_allclose(got, booster.predict(X), rtol=1e-5, atol=1e-5)


# --- shared stage functions -------------------------------------------------------------------

def test_models_of_one_structure_share_their_function():
    X, y, rng = data(n=120)
    Xt = X.astype(np.float32).astype(np.float64)
    models = []
    for seed in range(3):
        sk = RandomForestRegressor(n_estimators=5, max_depth=4, random_state=seed).fit(X, X[:, seed] + y)
        model, spec = convert(sk)
        got = np.array([o["prediction"] for o in predict_rows(model, spec, Xt[:15])])
        np.testing.assert_allclose(got, sk.predict(Xt[:15]), rtol=1e-12)   # each its own weights
        models.append(model)
    assert models[0].stage.fn is models[1].stage.fn is models[2].stage.fn
    clf = RandomForestClassifier(n_estimators=5, max_depth=4, random_state=0).fit(X, y)
    assert convert(clf)[0].stage.fn is not models[0].stage.fn


def test_stage_runs_in_float32_without_x64():
    # inside a pipeline with a neural network (which runs without x64) a classic stage computes
    # in float32: tree thresholds are then rounded so float32 inputs still take the same branches
    X, y, rng = data(n=120)
    sk = RandomForestClassifier(n_estimators=6, max_depth=5, random_state=0).fit(X, y)
    model, spec = convert(sk)
    Xt = X.astype(np.float32)
    outs, _ = jax.jit(jax.vmap(model.stage.fn, in_axes=(None, 0, None)))(
        jax.device_put(model.stage.weights), {spec.description.input[0].name: Xt}, {})
    probs = np.asarray(outs["classProbability"])
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), sk.predict_proba(Xt), rtol=1e-5, atol=1e-6)
