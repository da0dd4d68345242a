"""Tree ensembles: ``TreeEnsembleRegressor`` and ``TreeEnsembleClassifier``.

All trees are packed into flat node tables and walked together, one level per step of a
``lax.fori_loop`` (its trip count, the deepest tree's depth, is a weight); leaves point at
themselves, so a tree that reaches a leaf early stays there.  No Python loop over nodes runs
at predict time.  The tables are padded to power-of-two lengths with zero-valued leaves (and
padded roots point at one), so ensembles of similar size share compiled code (``_common``).
Thresholds and leaf values are float64; a float32 copy of the thresholds, rounded so float32
inputs compare as they would against the float64 ones, serves pipelines that run in float32.
When every threshold is a float32 value (XGBoost models; coremltools' converter rounds them so
on purpose), Core ML compares the inputs as float32 too: an input is rounded to float32 before
its comparisons (what XGBoost and scikit-learn, whose trees take float32 features, do).
"""
from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from mljax.classic._common import (class_labels, classifier_stage, feature_vector, input_width,
                                   regressor_stage)
from mljax.errors import ModelFormatError, UnsupportedError
from mljax.features import feature_specs
from mljax.stage import register_stage_builder

__all__ = ["build_tree_ensemble_regressor", "build_tree_ensemble_classifier", "pack_tree_ensemble"]

_LEAF = 6
_NO_TRANSFORM, _SOFTMAX, _LOGISTIC, _SOFTMAX_ZERO_REF = 0, 1, 2, 3


def _f32_thresholds(values: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """float32 thresholds that compare float32 inputs exactly as the float64 ones would.

    ``x <= t`` and ``x > t`` need the largest float32 not above ``t``; ``x < t`` and
    ``x >= t`` the smallest not below it; ``==``/``!=`` an unrepresentable ``t`` never matches
    (NaN compares unequal to everything).
    """
    t = values.astype(np.float32)
    up = t.astype(np.float64) > values
    down = t.astype(np.float64) < values
    round_down = np.isin(modes, (0, 3)) & up
    round_up = np.isin(modes, (1, 2)) & down
    t = np.where(round_down, np.nextafter(t, np.float32(-np.inf)), t)
    t = np.where(round_up, np.nextafter(t, np.float32(np.inf)), t)
    return np.where(np.isin(modes, (4, 5)) & (up | down), np.float32(np.nan), t).astype(np.float32)


def _tree_depth(root: int, children: dict) -> int:
    depth, frontier, seen = 0, [root], {root}
    while True:
        nxt = [c for n in frontier for c in children.get(n, ()) if c not in seen]
        if not nxt:
            return depth
        seen.update(nxt)
        frontier, depth = nxt, depth + 1


def _root_of(tree_id, ids: list, children: dict) -> int:
    referenced = {c for cs in children.values() for c in cs}
    roots = [i for i in ids if i not in referenced]
    if len(roots) != 1:
        raise ModelFormatError(f"tree {tree_id}: expected exactly one root node (a node no branch points "
                               f"to); found {len(roots)}")
    return roots[0]


def _bucket(n: int) -> int:
    """The power of two (at least 8) that a table of ``n`` entries is padded to."""
    return max(8, 1 << max(0, int(n) - 1).bit_length())


_MAX_TABLE = 1 << 28   # leaf values (float64): 2 GiB


def _dimensions(params) -> int:
    declared = int(params.numPredictionDimensions)
    if declared:
        return declared
    used = [e.evaluationIndex for n in params.nodes for e in n.evaluationInfo]
    return 1 + max(used + [len(params.basePredictionValue) - 1, 0])


def pack_tree_ensemble(params, what: str) -> dict:
    """Node tables of all trees (padded), their roots, leaf values ``(N, D)``, base values and depth."""
    by_tree = defaultdict(list)
    for node in params.nodes:
        by_tree[node.treeId].append(node)
    if not by_tree:
        raise ModelFormatError(f"{what}: expected at least one tree node; found none")
    dims = _dimensions(params)
    n_real = len(params.nodes)
    n_total = _bucket(n_real + 1)           # at least one padding leaf, for the padded roots
    if dims * n_total > _MAX_TABLE:
        raise ModelFormatError(f"{what}: {dims} prediction dimensions for {n_real} nodes need a table of "
                               f"{dims * n_total:,} values; expected at most {_MAX_TABLE:,}")
    feat = np.zeros(n_total, np.int32)
    thr = np.zeros(n_total, np.float64)
    mode = np.full(n_total, _LEAF, np.int32)
    true_child = np.arange(n_total, dtype=np.int32)
    false_child = np.arange(n_total, dtype=np.int32)
    nan_true = np.zeros(n_total, bool)
    values = np.zeros((n_total, dims), np.float64)
    roots = np.full(_bucket(len(by_tree)), n_real, np.int32)
    depth, offset = 0, 0
    for t, (tree_id, nodes) in enumerate(sorted(by_tree.items())):
        local = {n.nodeId: offset + i for i, n in enumerate(nodes)}
        if len(local) != len(nodes):
            raise ModelFormatError(f"{what}: tree {tree_id} has duplicate node ids")
        children = {n.nodeId: (n.trueChildNodeId, n.falseChildNodeId) for n in nodes if n.nodeBehavior != _LEAF}
        root = _root_of(tree_id, list(local), children)
        roots[t] = local[root]
        depth = max(depth, _tree_depth(root, children))
        for n in nodes:
            _pack_node(n, local[n.nodeId], local, (feat, thr, mode, true_child, false_child, nan_true, values),
                       dims, f"{what}: tree {tree_id} node {n.nodeId}")
        offset += len(nodes)
    base_value = np.zeros(dims, np.float64)
    bp = np.asarray(params.basePredictionValue, np.float64)
    if bp.size:
        base_value[:] = bp if bp.size == dims else bp[0]
    branch = thr[mode != _LEAF]
    float32_thresholds = bool(np.all(branch.astype(np.float32).astype(np.float64) == branch))
    return {"feature": feat, "threshold": thr, "threshold_f32": _f32_thresholds(thr, mode), "mode": mode,
            "true_child": true_child, "false_child": false_child, "nan_true": nan_true,
            "root": roots, "leaf_value": values, "base": base_value, "depth": np.int32(depth),
            "float32_inputs": np.bool_(float32_thresholds)}


def _pack_node(n, g: int, local: dict, tables, dims: int, where: str) -> None:
    """Write node ``n`` at row ``g`` of the tables."""
    feat, thr, mode, true_child, false_child, nan_true, values = tables
    mode[g] = n.nodeBehavior
    for e in n.evaluationInfo:
        if e.evaluationIndex >= dims:
            raise ModelFormatError(f"{where} writes prediction dimension {e.evaluationIndex}; "
                                   f"only {dims} declared")
        values[g, e.evaluationIndex] += e.evaluationValue
    if n.nodeBehavior == _LEAF:
        return
    for cid in (n.trueChildNodeId, n.falseChildNodeId):
        if cid not in local:
            raise ModelFormatError(f"{where} points to missing node {cid}")
    if not 0 <= n.branchFeatureIndex < 2**31:
        raise ModelFormatError(f"{where} branches on feature {n.branchFeatureIndex}; expected an index "
                               f"in [0, 2^31)")
    feat[g], thr[g] = n.branchFeatureIndex, n.branchFeatureValue
    true_child[g], false_child[g] = local[n.trueChildNodeId], local[n.falseChildNodeId]
    nan_true[g] = n.missingValueTracksTrueChild


def _branch(mode, v, t):
    """The branch condition of each node (``mode`` = TreeNodeBehavior)."""
    conds = jnp.stack([v <= t, v < t, v >= t, v > t, v == t, v != t])
    return jnp.take_along_axis(conds, jnp.clip(mode, 0, 5)[None], axis=0)[0]


def evaluate_trees(w: dict, x):
    """Sum of the leaf values every tree reaches for input vector ``x``, plus the base value."""
    if x.dtype == jnp.float64:
        threshold = w["threshold"]
        x = jnp.where(w["float32_inputs"], x.astype(jnp.float32).astype(x.dtype), x)
    else:
        threshold = w["threshold_f32"]

    def step(_, node):         # a leaf's children are the leaf itself
        v = x[w["feature"][node]]
        go_true = jnp.where(jnp.isnan(v), w["nan_true"][node], _branch(w["mode"][node], v, threshold[node]))
        return jnp.where(go_true, w["true_child"][node], w["false_child"][node])

    leaves = jax.lax.fori_loop(0, w["depth"], step, w["root"])
    return jnp.sum(w["leaf_value"][leaves].astype(x.dtype), axis=0) + w["base"].astype(x.dtype)


def _check_width(spec, tables, what):
    n_inputs = input_width(feature_specs(spec.description.input))
    used = tables["feature"][tables["mode"] != _LEAF]
    if n_inputs is not None and used.size and used.max() >= n_inputs:
        raise ModelFormatError(f"{what}: a branch reads feature {int(used.max())}; the input has {n_inputs}")


@register_stage_builder("treeEnsembleRegressor")
def build_tree_ensemble_regressor(spec, weights_dir=None, **_):
    """Sum of tree outputs plus base values; ``Regression_Logistic`` applies a sigmoid."""
    params = spec.treeEnsembleRegressor
    tables = pack_tree_ensemble(params.treeEnsemble, "TreeEnsembleRegressor")
    _check_width(spec, tables, "TreeEnsembleRegressor")
    transform = params.postEvaluationTransform
    names = [fd.name for fd in spec.description.input]

    def predict(w, feats):
        s = evaluate_trees(w, feature_vector(feats, names))
        if transform == _LOGISTIC:
            return jax.nn.sigmoid(s)
        if transform in (_SOFTMAX, _SOFTMAX_ZERO_REF):
            return _class_probabilities(s, s.shape[0], transform)
        return s

    return regressor_stage(spec, predict, tables,
                           key=("treeEnsembleRegressor", transform, tuple(names)))


def _class_probabilities(s, n_classes: int, transform: int):
    """Class probabilities from the ensemble's scores ``s`` (D = 1 for binary models)."""
    if s.shape[0] == 1 and n_classes == 2:
        p1 = s[0] if transform == _NO_TRANSFORM else jax.nn.sigmoid(s[0])
        return jnp.stack([1.0 - p1, p1])
    if transform == _SOFTMAX_ZERO_REF:
        if s.shape[0] == n_classes - 1:
            s = jnp.concatenate([jnp.zeros((1,), s.dtype), s])   # class 0 is the zero reference
        return jax.nn.softmax(s)
    if transform == _SOFTMAX:
        return jax.nn.softmax(s)
    if transform == _LOGISTIC:
        return jax.nn.sigmoid(s)
    return s


@register_stage_builder("treeEnsembleClassifier")
def build_tree_ensemble_classifier(spec, weights_dir=None, **_):
    """Tree scores per class, then the post-evaluation transform; label = the most probable class."""
    params = spec.treeEnsembleClassifier
    labels = class_labels(params, "TreeEnsembleClassifier")
    tables = pack_tree_ensemble(params.treeEnsemble, "TreeEnsembleClassifier")
    _check_width(spec, tables, "TreeEnsembleClassifier")
    k, dims = len(labels), tables["leaf_value"].shape[1]
    transform = params.postEvaluationTransform
    if transform not in (0, 1, 2, 3):
        raise UnsupportedError(f"TreeEnsembleClassifier: unknown postEvaluationTransform {transform}")
    if not (dims == k or (dims == 1 and k == 2) or (dims == k - 1 and transform == _SOFTMAX_ZERO_REF)):
        raise ModelFormatError(f"TreeEnsembleClassifier: {dims} prediction dimensions do not fit {k} classes")
    names = [fd.name for fd in spec.description.input]

    def predict(w, feats):
        probs = _class_probabilities(evaluate_trees(w, feature_vector(feats, names)), k, transform)
        return jnp.argmax(probs), probs

    return classifier_stage(spec, predict, tables, labels,
                            key=("treeEnsembleClassifier", k, transform, tuple(names)))
