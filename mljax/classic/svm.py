"""Support vector machines (libsvm semantics): ``SupportVectorRegressor`` and ``SupportVectorClassifier``.

The classifier votes one-vs-one over the ``K(K-1)/2`` class pairs (ties go to the first
class in label order).  With ``probA``/``probB`` it turns each pair's decision value into a
Platt probability and couples them (libsvm's ``multiclass_probability``; two classes use
the pair's probability directly), and the label is the most probable class.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from mljax.classic._common import (class_labels, classifier_stage, feature_vector, float_dtype,
                                   input_width, matrix, regressor_stage)
from mljax.errors import ModelFormatError, UnsupportedError
from mljax.features import feature_specs
from mljax.stage import register_stage_builder

__all__ = ["build_support_vector_regressor", "build_support_vector_classifier", "kernel_config",
           "kernel_fn", "couple_probabilities"]

_MIN_PROB = 1e-7


def kernel_config(kernel) -> tuple:
    """The kernel message as a hashable ``(kind, gamma, c, degree)``."""
    which = kernel.WhichOneof("kernel")
    if which in (None, "linearKernel"):
        return ("linear",)
    if which == "rbfKernel":
        return ("rbf", float(kernel.rbfKernel.gamma))
    if which == "polyKernel":
        p = kernel.polyKernel
        return ("poly", float(p.gamma), float(p.c), int(p.degree))
    if which == "sigmoidKernel":
        return ("sigmoid", float(kernel.sigmoidKernel.gamma), float(kernel.sigmoidKernel.c))
    raise UnsupportedError(f"support vector machine: unknown kernel {which!r}")


def kernel_fn(config: tuple):
    """``k(sv, x) -> (L,)``: the kernel (a :func:`kernel_config`) between every support vector row and ``x``."""
    kind, *args = config
    if kind == "linear":
        return lambda sv, x: sv @ x
    if kind == "rbf":
        (g,) = args
        return lambda sv, x: jnp.exp(_rbf_exponent(g, sv, x))
    if kind == "poly":
        g, c, d = args
        return lambda sv, x: (g * (sv @ x) + c) ** d
    g, c = args
    return lambda sv, x: jnp.tanh(g * (sv @ x) + c)


def _rbf_exponent(g: float, sv, x):
    """``-gamma * ||sv_i - x||^2``: the log of each RBF kernel value."""
    return -g * jnp.sum(jnp.square(sv - x), axis=-1)


_SQRT_SUBNORMAL_SCALE = 2.0 ** 537             # squared: 2^1074, one over the smallest subnormal double
_LOG_MIN_NORMAL = float(np.log(np.finfo(np.float64).tiny))


def _subnormal_decisions(coef, log_k):
    """``coef @ exp(log_k)`` in units of the smallest subnormal double, over subnormal kernel values.

    XLA on CPU flushes subnormal results to zero; libsvm keeps them (gradual underflow), so for
    an input far from every support vector its decision value can be a tiny non-zero number whose
    sign picks the class.  Each subnormal value is counted as libsvm's rounding gives it.
    """
    units = jnp.square(jnp.exp(log_k / 2) * _SQRT_SUBNORMAL_SCALE)
    units = jnp.where(log_k < _LOG_MIN_NORMAL, jnp.rint(units), 0.0)
    return jnp.sum(jnp.rint(coef * units), axis=-1)


def _support_vectors(params, width: int | None, what: str) -> np.ndarray:
    which = params.WhichOneof("supportVectors")
    if which == "denseSupportVectors":
        return matrix((v.values for v in params.denseSupportVectors.vectors), what, "dense support vectors")
    if which == "sparseSupportVectors":
        vectors = params.sparseSupportVectors.vectors
        top = max((n.index for v in vectors for n in v.nodes), default=0)
        sv = np.zeros((len(vectors), max(width or 0, top)), np.float64)
        for i, v in enumerate(vectors):
            for n in v.nodes:               # libsvm indices start at 1
                if n.index < 1:
                    raise ModelFormatError(f"{what}: sparse support vector index {n.index}; libsvm indices start at 1")
                sv[i, n.index - 1] = n.value
        return sv
    raise ModelFormatError(f"{what}: expected dense or sparse support vectors; found none")


@register_stage_builder("supportVectorRegressor")
def build_support_vector_regressor(spec, weights_dir=None, **_):
    """``sum_i alpha_i k(sv_i, x) - rho``."""
    params = spec.supportVectorRegressor
    sv = _support_vectors(params, input_width(feature_specs(spec.description.input)), "SupportVectorRegressor")
    alpha = np.asarray(params.coefficients.alpha, np.float64)
    if alpha.shape != (sv.shape[0],):
        raise ModelFormatError(f"SupportVectorRegressor: expected {sv.shape[0]} coefficients; found {alpha.size}")
    config = kernel_config(params.kernel)
    kernel = kernel_fn(config)
    names = [fd.name for fd in spec.description.input]
    weights = {"support_vectors": sv, "alpha": alpha, "rho": np.float64(params.rho)}

    def predict(w, feats):
        x = feature_vector(feats, names, w["support_vectors"].shape[-1])
        return (w["alpha"] @ kernel(w["support_vectors"], x) - w["rho"])[None]

    return regressor_stage(spec, predict, weights, key=("supportVectorRegressor", config, tuple(names)))


def _pair_coefficients(params, k: int, n_sv: int, what: str) -> np.ndarray:
    """``(P, L)``: the coefficient of each support vector in each pair's decision function."""
    counts = list(params.numberOfSupportVectorsPerClass)
    if len(counts) != k or sum(counts) != n_sv:
        raise ModelFormatError(f"{what}: numberOfSupportVectorsPerClass {counts} does not fit {k} classes "
                               f"and {n_sv} support vectors")
    coef = matrix((c.alpha for c in params.coefficients), what, "coefficient rows")
    if coef.shape != (k - 1, n_sv):
        raise ModelFormatError(f"{what}: expected {k - 1} coefficient rows of {n_sv}; found shape {coef.shape}")
    start = np.concatenate([[0], np.cumsum(counts)])
    pairs = np.zeros((k * (k - 1) // 2, n_sv), np.float64)
    for p, (i, j) in enumerate(itertools.combinations(range(k), 2)):
        pairs[p, start[i]:start[i + 1]] = coef[j - 1, start[i]:start[i + 1]]
        pairs[p, start[j]:start[j + 1]] = coef[i, start[j]:start[j + 1]]
    return pairs


def _platt(dec, a, b):
    """libsvm's ``sigmoid_predict``: ``1 / (1 + exp(a*dec + b))``, evaluated without overflow."""
    f = dec * a + b
    e = jnp.exp(-jnp.abs(f))
    return jnp.where(f >= 0, e / (1.0 + e), 1.0 / (1.0 + e))


def couple_probabilities(r, k: int):
    """libsvm's ``multiclass_probability``: class probabilities from pairwise ``r[i, j] = P(i | i or j)``."""
    q = -r.T * r
    q = q.at[jnp.diag_indices(k)].set(jnp.sum(jnp.square(r), axis=0) - jnp.square(jnp.diagonal(r)))
    eps, max_iter = 0.005 / k, max(100, k)

    def sweep(t, carry):
        p, qp, pqp = carry
        diff = (-qp[t] + pqp) / q[t, t]
        p = p.at[t].add(diff)
        pqp = (pqp + diff * (diff * q[t, t] + 2.0 * qp[t])) / (1.0 + diff) / (1.0 + diff)
        return p / (1.0 + diff), (qp + diff * q[t]) / (1.0 + diff), pqp

    def body(carry):
        it, p, _ = carry
        qp = q @ p
        pqp = p @ qp
        converged = jnp.max(jnp.abs(qp - pqp)) < eps
        p_next, _, _ = jax.lax.fori_loop(0, k, sweep, (p, qp, pqp))
        return it + 1, jnp.where(converged, p, p_next), converged

    p0 = jnp.full((k,), 1.0 / k, r.dtype)
    _, p, _ = jax.lax.while_loop(lambda c: (c[0] < max_iter) & ~c[2], body, (0, p0, False))
    return p


def _pairwise_matrix(r_pairs, k: int):
    ii, jj = np.triu_indices(k, 1)            # same order as itertools.combinations
    r = jnp.zeros((k, k), r_pairs.dtype)
    return r.at[ii, jj].set(r_pairs).at[jj, ii].set(1.0 - r_pairs)


@register_stage_builder("supportVectorClassifier")
def build_support_vector_classifier(spec, weights_dir=None, **_):
    """One-vs-one libsvm classifier; Platt-scaled, coupled probabilities when probA/probB are set."""
    what = "SupportVectorClassifier"
    params = spec.supportVectorClassifier
    labels = class_labels(params, what)
    k = len(labels)
    if k < 2:
        raise ModelFormatError(f"{what}: expected at least 2 class labels; found {k}")
    sv = _support_vectors(params, input_width(feature_specs(spec.description.input)), what)
    n_pairs = k * (k - 1) // 2
    rho = np.asarray(params.rho, np.float64)
    if rho.shape != (n_pairs,):
        raise ModelFormatError(f"{what}: expected {n_pairs} rho values for {k} classes; found {rho.size}")
    weights = {"support_vectors": sv, "pair_coef": _pair_coefficients(params, k, sv.shape[0], what), "rho": rho}
    with_prob = len(params.probA) > 0
    if with_prob:
        if len(params.probA) != n_pairs or len(params.probB) != n_pairs:
            raise ModelFormatError(f"{what}: expected {n_pairs} probA and probB values; found "
                                   f"{len(params.probA)} and {len(params.probB)}")
        weights["prob_a"] = np.asarray(params.probA, np.float64)
        weights["prob_b"] = np.asarray(params.probB, np.float64)
    config = kernel_config(params.kernel)
    kernel = kernel_fn(config)
    names = [fd.name for fd in spec.description.input]
    ii, jj = np.triu_indices(k, 1)

    def predict(w, feats):
        x = feature_vector(feats, names, w["support_vectors"].shape[-1])
        dec = w["pair_coef"] @ kernel(w["support_vectors"], x) - w["rho"]
        first = dec > 0
        if config[0] == "rbf" and x.dtype == jnp.float64:     # recover what flush-to-zero lost
            tiny = _subnormal_decisions(w["pair_coef"], _rbf_exponent(config[1], w["support_vectors"], x))
            first = first | ((dec == 0) & (w["rho"] == 0) & (tiny > 0))
        winners = jnp.where(first, ii, jj)
        votes = jnp.zeros((k,), jnp.int32).at[winners].add(1)
        if not with_prob:
            return jnp.argmax(votes), votes.astype(float_dtype()) / n_pairs
        r = jnp.clip(_platt(dec, w["prob_a"], w["prob_b"]), _MIN_PROB, 1.0 - _MIN_PROB)
        probs = jnp.stack([r[0], 1.0 - r[0]]) if k == 2 else couple_probabilities(_pairwise_matrix(r, k), k)
        return jnp.argmax(probs), probs

    return classifier_stage(spec, predict, weights, labels,
                            key=("supportVectorClassifier", k, with_prob, config, tuple(names)))
