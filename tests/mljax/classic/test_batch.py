"""Every classic stage is vmappable: a batch of feature dicts runs in one jitted vmapped call and
gives what one-by-one prediction gives."""
import warnings

import jax
import numpy as np
import pytest
from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from _classic_util import convert, data, predict_rows, rows


def _logistic():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(multi_class="ovr")


MODELS = {
    "glm": _logistic,
    "forest": lambda: RandomForestRegressor(n_estimators=4, max_depth=4, random_state=0),
    "boosting": lambda: GradientBoostingClassifier(n_estimators=5, random_state=0),
    "svc_prob": lambda: SVC(probability=True, random_state=0),
    "knn": lambda: KNeighborsClassifier(n_neighbors=3),
    "scaler": StandardScaler,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_vmapped_batch_equals_single(name):
    X, y, rng = data(n=90, classes=3)
    sk = MODELS[name]()
    sk.fit(X, y if name != "forest" else X[:, 0])
    model, spec = convert(sk)
    assert model.stage.batchable
    Xt = rng.normal(size=(9, 4))
    batch = predict_rows(model, spec, Xt, batch=True)
    single = predict_rows(model, spec, Xt, batch=False)
    for b, s in zip(batch, single):
        assert b.keys() == s.keys()
        for k in b:
            if isinstance(b[k], dict):
                assert b[k] == pytest.approx(s[k], rel=1e-5, abs=1e-6)
            else:
                np.testing.assert_allclose(np.asarray(b[k], float), np.asarray(s[k], float), rtol=1e-5, atol=1e-6)
    # the stage function itself under vmap (what MLModel.predict(list) jits, in float64)
    feats = [model._prepare(f) for f in rows(spec, Xt)]
    stacked = {k: np.stack([f[k] for f in feats]) for k in feats[0]}
    assert model.stage.x64
    with jax.enable_x64(True):
        outs, _ = jax.jit(jax.vmap(model.stage.fn, in_axes=(None, 0, None)))(model.weights, stacked, {})
    assert all(np.shape(v)[0] == len(Xt) for v in outs.values())
