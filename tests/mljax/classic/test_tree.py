"""Tree ensembles: coremltools-converted scikit-learn (and xgboost) models vs their own predictions,
plus hand-built specs for the branch modes and missing values (vs a NumPy tree walk)."""
import numpy as np
import pytest
from sklearn.ensemble import (GradientBoostingClassifier, GradientBoostingRegressor, RandomForestClassifier,
                              RandomForestRegressor)
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

import mljax
from _classic_util import assert_regression, convert, data, predict_rows
from mljax.classic.tree import _f32_thresholds
from mljax.proto import Model_pb2


@pytest.mark.parametrize("make", [
    lambda: DecisionTreeRegressor(max_depth=6, random_state=0),
    lambda: RandomForestRegressor(n_estimators=8, max_depth=5, random_state=0),
    lambda: GradientBoostingRegressor(n_estimators=15, max_depth=3, random_state=0),
    # (loss="huber" is left out: coremltools stores init_.quantile, the quantile level 0.5, as the base value)
], ids=["dt", "rf", "gb"])
def test_tree_regressors_match_sklearn(make):
    X, _, rng = data(n=120)
    y = np.sin(X[:, 0]) * 3 + X[:, 1] ** 2 + 0.1 * rng.normal(size=len(X))
    sk = make().fit(X, y)
    model, spec = convert(sk)
    Xt = np.concatenate([rng.normal(size=(30, 4)), X[:10]])    # includes training points (on thresholds' sides)
    out = predict_rows(model, spec, Xt)
    assert_regression([o["prediction"] for o in out], sk.predict(Xt))


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("make", [
    lambda: DecisionTreeClassifier(max_depth=5, random_state=0),
    lambda: RandomForestClassifier(n_estimators=7, max_depth=4, random_state=0),
    lambda: GradientBoostingClassifier(n_estimators=12, max_depth=2, random_state=0),
], ids=["dt", "rf", "gb"])
def test_tree_classifiers_match_sklearn(make, classes):
    X, y, rng = data(n=150, classes=classes)
    sk = make().fit(X, y)
    model, spec = convert(sk)
    Xt = np.concatenate([rng.normal(size=(40, 4)), X[:10]])
    out = predict_rows(model, spec, Xt)
    assert [o["classLabel"] for o in out] == list(sk.predict(Xt))
    probs = np.array([[o["classProbability"][c] for c in sk.classes_] for o in out])
    if isinstance(sk, RandomForestClassifier) and classes > 2:
        probs = probs / probs.sum(axis=1, keepdims=True)   # NoTransform: raw per-tree sums
    assert_regression(probs, sk.predict_proba(Xt), rtol=1e-4, atol=1e-5)


def test_string_labels_and_single_vs_batch():
    X, y, rng = data(n=100, classes=3)
    labels = np.array(["low", "mid", "high"])
    sk = GradientBoostingClassifier(n_estimators=5, random_state=0).fit(X, labels[y])
    model, spec = convert(sk)
    Xt = rng.normal(size=(8, 4))
    batch, single = predict_rows(model, spec, Xt), predict_rows(model, spec, Xt, batch=False)
    assert [o["classLabel"] for o in batch] == list(sk.predict(Xt)) == [o["classLabel"] for o in single]


@pytest.mark.parametrize("task", ["regressor", "binary", "multiclass"])
def test_xgboost_matches_booster(task):
    xgb = pytest.importorskip("xgboost")
    import coremltools as ct
    X, y, rng = data(n=200, classes=3)
    # coremltools' converter writes base value 0.5 (xgboost's old default): train with that base
    if task == "regressor":
        booster = xgb.XGBRegressor(n_estimators=10, max_depth=3, base_score=0.5).fit(X, X[:, 0] * 2 + np.abs(X[:, 1]))
    else:
        booster = xgb.XGBClassifier(n_estimators=6, max_depth=2, base_score=0.5).fit(
            X, (y > 1).astype(int) if task == "binary" else y)
    names = ["f0", "f1", "f2", "f3"]
    kw = {} if task == "regressor" else {"mode": "classifier"}
    ct_model = ct.converters.xgboost.convert(booster, feature_names=names, target="y", **kw)
    model = mljax.MLModel(ct_model)
    Xt = rng.normal(size=(20, 4)).astype(np.float32)
    out = model.predict([{n: float(v) for n, v in zip(names, x)} for x in Xt])
    if task == "regressor":
        assert_regression([o["y"] for o in out], booster.predict(Xt))
        return
    assert [o["y"] for o in out] == list(booster.predict(Xt))
    probs = [[o["classProbability"][c] for c in range(len(booster.classes_))] for o in out]
    assert_regression(probs, booster.predict_proba(Xt), rtol=1e-4, atol=1e-5)


# --- hand-built specs ------------------------------------------------------------------

def _tree_spec(nodes, *, dims=1, base=(0.0,), n_inputs=2):
    spec = Model_pb2.Model(specificationVersion=1)
    te = spec.treeEnsembleRegressor.treeEnsemble
    te.numPredictionDimensions = dims
    te.basePredictionValue.extend(base)
    for n in nodes:
        node = te.nodes.add(**{k: v for k, v in n.items() if k != "value"})
        for i, v in enumerate(np.atleast_1d(n.get("value", []))):
            node.evaluationInfo.add(evaluationIndex=i, evaluationValue=v)
    inp = spec.description.input.add(name="x")
    inp.type.multiArrayType.shape.append(n_inputs)
    inp.type.multiArrayType.dataType = Model_pb2.ArrayFeatureType.DOUBLE
    spec.description.output.add(name="y").type.doubleType.SetInParent()
    return spec


@pytest.mark.parametrize("mode,op", [(0, np.less_equal), (1, np.less), (2, np.greater_equal), (3, np.greater),
                                     (4, np.equal), (5, np.not_equal)])
def test_branch_modes(mode, op):
    nodes = [dict(treeId=0, nodeId=7, nodeBehavior=mode, branchFeatureIndex=1, branchFeatureValue=0.5,
                  trueChildNodeId=3, falseChildNodeId=4),
             dict(treeId=0, nodeId=3, nodeBehavior=6, value=10.0),
             dict(treeId=0, nodeId=4, nodeBehavior=6, value=-10.0),
             dict(treeId=1, nodeId=0, nodeBehavior=6, value=1.0)]          # a single-leaf tree
    model = mljax.MLModel(_tree_spec(nodes, base=(0.25,)))
    for v in (0.0, 0.5, 1.0):
        expected = (10.0 if op(v, 0.5) else -10.0) + 1.0 + 0.25
        assert model.predict({"x": np.array([9.0, v])})["y"] == pytest.approx(expected)


@pytest.mark.parametrize("tracks_true", [True, False])
def test_missing_values_follow_flag(tracks_true):
    nodes = [dict(treeId=0, nodeId=0, nodeBehavior=0, branchFeatureIndex=0, branchFeatureValue=0.0,
                  trueChildNodeId=1, falseChildNodeId=2, missingValueTracksTrueChild=tracks_true),
             dict(treeId=0, nodeId=1, nodeBehavior=6, value=1.0),
             dict(treeId=0, nodeId=2, nodeBehavior=6, value=2.0)]
    model = mljax.MLModel(_tree_spec(nodes))
    assert model.predict({"x": np.array([np.nan, 0.0])})["y"] == (1.0 if tracks_true else 2.0)


def test_thresholds_compare_like_float64():
    rng = np.random.default_rng(0)
    thr = rng.normal(size=2000)
    x = np.concatenate([thr.astype(np.float32), np.nextafter(thr.astype(np.float32), np.float32(np.inf)),
                        np.nextafter(thr.astype(np.float32), np.float32(-np.inf))]).reshape(3, -1)
    for mode, op in [(0, np.less_equal), (1, np.less), (2, np.greater_equal), (3, np.greater)]:
        t32 = _f32_thresholds(thr, np.full(thr.shape, mode))
        np.testing.assert_array_equal(op(x, t32), op(x.astype(np.float64), thr))


def test_deep_unbalanced_tree_vs_walk():
    # a chain: node i tests x[i % 3] <= c_i; left = leaf, right = next node
    rng = np.random.default_rng(5)
    depth, cuts = 12, rng.normal(size=12)
    nodes = []
    for i in range(depth):
        nodes.append(dict(treeId=0, nodeId=2 * i, nodeBehavior=0, branchFeatureIndex=i % 3,
                          branchFeatureValue=cuts[i], trueChildNodeId=2 * i + 1, falseChildNodeId=2 * i + 2))
        nodes.append(dict(treeId=0, nodeId=2 * i + 1, nodeBehavior=6, value=float(i)))
    nodes.append(dict(treeId=0, nodeId=2 * depth, nodeBehavior=6, value=100.0))
    model = mljax.MLModel(_tree_spec(nodes, n_inputs=3))
    X = rng.normal(size=(30, 3))

    def walk(x):
        for i in range(depth):
            if x[i % 3] <= cuts[i]:
                return float(i)
        return 100.0
    got = [o["y"] for o in model.predict([{"x": x} for x in X])]
    assert got == [walk(x) for x in X]


def test_missing_child_is_a_format_error():
    nodes = [dict(treeId=0, nodeId=0, nodeBehavior=0, trueChildNodeId=1, falseChildNodeId=9),
             dict(treeId=0, nodeId=1, nodeBehavior=6, value=1.0)]
    with pytest.raises(mljax.ModelFormatError, match="missing node 9"):
        mljax.MLModel(_tree_spec(nodes))
