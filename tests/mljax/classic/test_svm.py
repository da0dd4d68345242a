"""Support vector machines: coremltools-converted scikit-learn SVC/NuSVC/SVR/NuSVR vs scikit-learn
(labels by one-vs-one voting, Platt/coupled probabilities), plus sparse support vectors and the
probability coupling vs a NumPy transcription of libsvm's algorithm."""
import itertools

import numpy as np
import pytest
from sklearn.svm import SVC, SVR, NuSVC, NuSVR

import jax
import jax.numpy as jnp
import mljax
from _classic_util import assert_regression, convert, data, predict_rows
from mljax.classic.svm import couple_probabilities
from mljax.proto import Model_pb2

KERNELS = [dict(kernel="linear"), dict(kernel="rbf", gamma=0.3), dict(kernel="poly", degree=3, gamma=0.5, coef0=1.0),
           dict(kernel="sigmoid", gamma=0.05, coef0=0.2)]
KIDS = ["linear", "rbf", "poly", "sigmoid"]


@pytest.mark.parametrize("kw", KERNELS, ids=KIDS)
@pytest.mark.parametrize("cls", [SVR, NuSVR])
def test_svr_matches_sklearn(cls, kw):
    X, _, rng = data(n=80)
    y = np.sin(X[:, 0]) + 0.5 * X[:, 1]
    sk = cls(C=2.0, **kw).fit(X, y)
    model, spec = convert(sk)
    Xt = rng.normal(size=(15, 4))
    assert_regression([o["prediction"] for o in predict_rows(model, spec, Xt)], sk.predict(Xt))


@pytest.mark.parametrize("kw", KERNELS, ids=KIDS)
@pytest.mark.parametrize("classes", [2, 4])
def test_svc_labels_match_sklearn(kw, classes):
    X, y, rng = data(n=120, classes=classes)
    sk = SVC(C=3.0, **kw).fit(X, y)
    model, spec = convert(sk)
    Xt = rng.normal(size=(30, 4))
    out = predict_rows(model, spec, Xt)
    assert [o["classLabel"] for o in out] == list(sk.predict(Xt))
    assert "classProbability" not in out[0]


def test_nusvc_string_labels():
    X, y, rng = data(n=90, classes=3)
    labels = np.array(["a", "b", "c"])
    sk = NuSVC(nu=0.3).fit(X, labels[y])
    model, spec = convert(sk)
    Xt = rng.normal(size=(20, 4))
    assert [o["classLabel"] for o in predict_rows(model, spec, Xt)] == list(sk.predict(Xt))


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_svc_probabilities_match_sklearn(classes):
    X, y, rng = data(n=150, classes=classes)
    sk = SVC(probability=True, random_state=0).fit(X, y)
    model, spec = convert(sk)
    Xt = rng.normal(size=(25, 4))
    out = predict_rows(model, spec, Xt)
    probs = np.array([[o["classProbability"][c] for c in sk.classes_] for o in out])
    expected = sk.predict_proba(Xt)
    # scikit-learn couples pairwise probabilities even for two classes (coremltools documents a
    # difference "usually less than 0.5%"); with more classes both run libsvm's coupling
    np.testing.assert_allclose(probs, expected, atol=5e-3 if classes == 2 else 2e-4)
    # with probabilities the label is the most probable class (libsvm's svm_predict_probability)
    top2 = np.sort(expected, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-2
    labels = np.array([o["classLabel"] for o in out])
    np.testing.assert_array_equal(labels[clear], sk.classes_[expected.argmax(axis=1)][clear])


def _libsvm_coupling(r, k):
    """libsvm's multiclass_probability, transcribed loop for loop from its published description."""
    Q = np.zeros((k, k))
    p = np.full(k, 1.0 / k)
    for t in range(k):
        for j in range(k):
            if j != t:
                Q[t, t] += r[j, t] ** 2
                Q[t, j] = -r[j, t] * r[t, j]
    for _ in range(max(100, k)):
        Qp = Q @ p
        pQp = p @ Qp
        if np.max(np.abs(Qp - pQp)) < 0.005 / k:
            break
        for t in range(k):
            diff = (-Qp[t] + pQp) / Q[t, t]
            p[t] += diff
            pQp = (pQp + diff * (diff * Q[t, t] + 2 * Qp[t])) / (1 + diff) ** 2
            Qp = (Qp + diff * Q[t]) / (1 + diff)
            p = p / (1 + diff)
    return p


@pytest.mark.parametrize("k", [3, 4, 6])
def test_coupling_matches_libsvm_loop(k):
    rng = np.random.default_rng(k)
    couple = jax.jit(couple_probabilities, static_argnums=1)
    for _ in range(5):
        r = np.zeros((k, k))
        for i, j in itertools.combinations(range(k), 2):
            r[i, j] = rng.uniform(0.05, 0.95)
            r[j, i] = 1 - r[i, j]
        got = np.asarray(couple(jnp.asarray(r, jnp.float32), k))
        np.testing.assert_allclose(got, _libsvm_coupling(r, k), atol=1e-5)


def test_sparse_support_vectors_one_based():
    """A libsvm-style spec: sparse support vectors (1-based indices), RBF kernel, 3 classes."""
    rng = np.random.default_rng(4)
    X, y, _ = data(n=60, classes=3)
    sk = SVC(kernel="rbf", gamma=0.4).fit(X, y)
    dense_model, spec = convert(sk)
    sparse = Model_pb2.Model.FromString(spec.SerializeToString())
    svc = sparse.supportVectorClassifier
    for row in sk.support_vectors_:
        vec = svc.sparseSupportVectors.vectors.add()
        for i, v in enumerate(row):
            if v != 0:
                vec.nodes.add(index=i + 1, value=v)
    model = mljax.MLModel(sparse)
    assert model.stage.weights["support_vectors"].shape == sk.support_vectors_.shape
    Xt = rng.normal(size=(15, 4))
    assert [o["classLabel"] for o in predict_rows(model, spec, Xt)] == list(sk.predict(Xt))
