"""KNearestNeighborsClassifier: coremltools-converted scikit-learn models (brute force and kd-tree)
vs scikit-learn, and builder-made models (string labels, inverse-distance weighting) vs NumPy."""
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

import mljax
from _classic_util import convert, data, predict_rows


@pytest.mark.parametrize("algorithm", ["brute", "kd_tree"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_knn_matches_sklearn(algorithm, k):
    X, y, rng = data(n=80, classes=3)
    sk = KNeighborsClassifier(n_neighbors=k, algorithm=algorithm).fit(X, y)
    model, spec = convert(sk)
    Xt = rng.normal(size=(30, 4))
    out = predict_rows(model, spec, Xt)
    assert [o["classLabel"] for o in out] == list(sk.predict(Xt))


def _builder_model(samples, labels, k, weighting):
    from coremltools.models.nearest_neighbors import KNearestNeighborsClassifierBuilder
    builder = KNearestNeighborsClassifierBuilder(
        input_name="x", output_name="label", number_of_dimensions=samples.shape[1],
        default_class_label=labels[0], number_of_neighbors=k, weighting_scheme=weighting)
    builder.add_samples(samples, labels)
    return mljax.MLModel(builder.spec)


def _reference(samples, labels, x, k, inverse):
    d = np.sum((samples - x) ** 2, axis=1)
    nearest = np.argsort(d, kind="stable")[:k]
    classes = sorted(set(labels))
    votes = np.zeros(len(classes))
    for i in nearest:
        w = 1.0 / d[i] if inverse else 1.0
        votes[classes.index(labels[i])] += w
    return classes[int(np.argmax(votes))], dict(zip(classes, votes / votes.sum()))


@pytest.mark.parametrize("weighting", ["uniform", "inverse_distance"])
def test_knn_builder_string_labels(weighting):
    rng = np.random.default_rng(3)
    samples = rng.normal(size=(40, 3)).astype(np.float32)
    labels = [["north", "south", "east"][i] for i in rng.integers(0, 3, 40)]
    model = _builder_model(samples, labels, 5, weighting)
    for x in rng.normal(size=(12, 3)).astype(np.float32):
        out = model.predict({"x": x})
        label, probs = _reference(samples, labels, x, 5, weighting == "inverse_distance")
        assert out["label"] == label
        assert out["labelProbs"] == pytest.approx(probs, rel=1e-4)


def test_knn_inverse_distance_exact_match_wins():
    samples = np.array([[0.0, 0.0], [1.0, 0.0], [1.1, 0.0], [0.9, 0.0]], np.float32)
    model = _builder_model(samples, [7, 8, 8, 8], 4, "inverse_distance")
    assert model.predict({"x": np.zeros(2, np.float32)})["label"] == 7


def test_a_negative_number_of_neighbors_is_a_format_error():
    """Found by the fuzz suite: numberOfNeighbors of -2**31 reached top_k as a raw ValueError."""
    from mljax.errors import ModelFormatError
    X, y, _ = data(n=20, classes=2)
    spec = convert(KNeighborsClassifier(n_neighbors=3).fit(X, y))[1]
    spec.kNearestNeighborsClassifier.numberOfNeighbors.defaultValue = -2**31
    with pytest.raises(ModelFormatError, match="numberOfNeighbors must be a positive count"):
        mljax.MLModel(spec)
