"""Updatable k-NN classifiers update by adding samples, as Core ML does."""
import numpy as np
import pytest

import mljax
import updatable
from mljax.errors import UpdateError

ct = pytest.importorskip("coremltools")
from coremltools.models.nearest_neighbors import KNearestNeighborsClassifierBuilder  # noqa: E402
neighbors = pytest.importorskip("sklearn.neighbors")


def test_knn_update_adds_samples_and_matches_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    b = KNearestNeighborsClassifierBuilder(input_name="x", output_name="label", number_of_dimensions=4,
                                           default_class_label="none", number_of_neighbors=3)
    b.author = "test"
    old_x = rng.normal(size=(10, 4)).astype(np.float32)
    old_y = ["a" if v[0] > 0 else "b" for v in old_x]
    b.add_samples(old_x, old_y)
    spec = b.spec
    assert spec.isUpdatable
    path = tmp_path / "knn.mlmodel"
    ct.models.utils.save_spec(spec, str(path))
    new_x = rng.normal(loc=3.0, size=(8, 4)).astype(np.float32)
    ctx = updatable.UpdateTask(path, [{"x": x, "label": "c"} for x in new_x]).run()
    model = ctx.model
    knn = model.get_spec().kNearestNeighborsClassifier
    assert len(knn.nearestNeighborsIndex.floatSamples) == 18
    ref = neighbors.KNeighborsClassifier(3).fit(np.vstack([old_x, new_x]), old_y + ["c"] * 8)
    queries = rng.normal(loc=1.5, size=(20, 4)).astype(np.float32)
    got = [model.predict({"x": q})["label"] for q in queries]
    assert got == list(ref.predict(queries))
    with pytest.raises(UpdateError, match="expected 4 features"):
        updatable.UpdateTask(path, [{"x": np.zeros(3), "label": "c"}]).run()
