"""Feature engineering models: Scaler, Normalizer, OneHotEncoder, Imputer, ArrayFeatureExtractor,
FeatureVectorizer, DictVectorizer, CategoricalMapping, Identity.

Strings never enter JAX: ``preprocess`` maps a string input to an index (or, for a
string-keyed CategoricalMapping, to its int64 value) and ``postprocess`` maps indices back.
Dictionaries are dense vectors inside JAX (see ``mljax.classic._common``).  Numbers are
float64 (Core ML's featurizers compute in double precision; see ``_common``).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mljax.classic._common import classic_stage, dense_dict_input, dict_output, float_dtype, input_width
from mljax.errors import InputError, ModelFormatError, UnsupportedError
from mljax.features import feature_specs
from mljax.stage import register_stage_builder

__all__ = ["build_scaler", "build_normalizer", "build_one_hot_encoder", "build_imputer",
           "build_array_feature_extractor", "build_feature_vectorizer", "build_dict_vectorizer",
           "build_categorical_mapping", "build_identity"]

_NUMERIC = ("multiArray", "double", "int64")


def _io(spec, what: str, n_in: int | None = 1, n_out: int | None = 1):
    inputs, outputs = feature_specs(spec.description.input), feature_specs(spec.description.output)
    if (n_in is not None and len(inputs) != n_in) or (n_out is not None and len(outputs) != n_out):
        raise ModelFormatError(f"{what}: expected {n_in} input(s) and {n_out} output(s); "
                               f"found {list(inputs)} and {list(outputs)}")
    return inputs, outputs


def _as_output(value, spec):
    """Cast a computed value to the declared output kind (int64 truncates; strings are indices)."""
    if spec.kind in ("int64", "string"):
        return jnp.asarray(value).astype(jnp.int32)
    return jnp.asarray(value).astype(float_dtype())


def _unary_stage(spec, what, compute, weights=None, *, key, input_kinds=_NUMERIC, preprocess=None,
                 postprocess=None):
    """A one-input, one-output stage ``out = compute(w, x)``; ``key``: all ``compute`` closes over."""
    inputs, outputs = _io(spec, what)
    (in_name, in_spec), (out_name, out_spec) = next(iter(inputs.items())), next(iter(outputs.items()))
    if in_spec.kind not in input_kinds:
        raise UnsupportedError(f"{what}: input {in_name!r} of type {in_spec.kind} is not supported; "
                               f"expected one of {list(input_kinds)}")

    def make_fn():
        def fn(w, feats, states):
            return {out_name: _as_output(compute(w, feats[in_name]), out_spec)}, states
        return fn

    return classic_stage((what, key, in_name, out_name, out_spec.kind), make_fn, weights=weights or {},
                         inputs=inputs, outputs=outputs, preprocess=preprocess, postprocess=postprocess)


def _dict_postprocess(name, spec, keys=None):
    if spec.kind != "dictionary":
        return None
    return lambda values: {**values, name: dict_output(values[name], keys)} if name in values else values


@register_stage_builder("scaler")
def build_scaler(spec, weights_dir=None, **_):
    """``(x + shift) * scale``, element-wise (a single shift/scale value broadcasts)."""
    p = spec.scaler
    w = {"shift": np.asarray(p.shiftValue or [0.0], np.float64),
         "scale": np.asarray(p.scaleValue or [1.0], np.float64)}
    width = input_width(dict(list(feature_specs(spec.description.input).items())[:1]))
    for name, values in w.items():
        if values.size != 1 and width is not None and values.size != width:
            raise ModelFormatError(f"Scaler: expected 1 or {width} {name} values (one per input value); "
                                   f"found {values.size}")
    return _unary_stage(spec, "Scaler", lambda w, x: (x.astype(float_dtype()) + w["shift"]) * w["scale"], w,
                        key=())


@register_stage_builder("normalizer")
def build_normalizer(spec, weights_dir=None, **_):
    """``x / ||x||`` with the LMax, L1 or L2 norm; an all-zero input stays zero."""
    norm_type = spec.normalizer.normType
    norms = {0: lambda a: jnp.max(jnp.abs(a)), 1: lambda a: jnp.sum(jnp.abs(a)),
             2: lambda a: jnp.sqrt(jnp.sum(jnp.square(a)))}
    if norm_type not in norms:
        raise UnsupportedError(f"Normalizer: unknown normType {norm_type}")

    def compute(w, x):
        x = x.astype(float_dtype())
        n = norms[norm_type](x)
        return x / jnp.where(n == 0, 1.0, n)

    return _unary_stage(spec, "Normalizer", compute, key=norm_type)


def _string_index_preprocess(name: str, vocab: list, what: str, *, error_on_unknown: bool,
                             default=None):
    """``preprocess`` mapping the string input ``name`` to its position in ``vocab`` (or ``default``)."""
    table = {s: i for i, s in enumerate(vocab)}

    def preprocess(data: dict) -> dict:
        if not isinstance(data, dict) or name not in data:
            return data
        value = data[name]
        if not isinstance(value, str):
            return data                      # already an index (e.g. inside a pipeline)
        if value not in table and error_on_unknown:
            raise InputError(f"{what}: input {name!r} is {value!r}; expected one of {vocab[:20]}")
        return {**data, name: np.asarray(table.get(value, default), np.int64)}
    return preprocess


@register_stage_builder("oneHotEncoder")
def build_one_hot_encoder(spec, weights_dir=None, **_):
    """One-hot vector of an int64 or string category; unknown categories give all zeros (or an error)."""
    p = spec.oneHotEncoder
    inputs, outputs = _io(spec, "OneHotEncoder")
    in_name, in_spec = next(iter(inputs.items()))
    out_name, out_spec = next(iter(outputs.items()))
    if in_spec.kind == "multiArray" and in_spec.shape and int(np.prod(in_spec.shape)) != 1:
        raise ModelFormatError(f"OneHotEncoder: input {in_name!r} must hold one category; the model "
                               f"describes shape {in_spec.shape}")
    error_on_unknown = p.handleUnknown == 0
    kind = p.WhichOneof("CategoryType")
    if kind == "stringCategories":
        cats = list(p.stringCategories.vector)
        pre = _string_index_preprocess(in_name, cats, "OneHotEncoder", error_on_unknown=error_on_unknown,
                                       default=-1)
        compute = lambda w, x: jnp.arange(len(cats)) == jnp.asarray(x).reshape(())   # noqa: E731
        weights = {}
    else:
        cats = [int(v) for v in p.int64Categories.vector]
        known = set(cats)

        def pre(data):
            if error_on_unknown and isinstance(data, dict) and in_name in data:
                value = np.asarray(data[in_name]).reshape(-1)
                if value.size == 1 and value[0] == int(value[0]) and int(value[0]) not in known:
                    raise InputError(f"OneHotEncoder: input {in_name!r} is {int(value[0])}; "
                                     f"expected one of {cats[:20]}")
            return data
        compute = lambda w, x: w["categories"] == jnp.asarray(x).reshape(()).astype(jnp.int32)  # noqa: E731
        weights = {"categories": np.asarray(cats, np.int32)}
    return _unary_stage(spec, "OneHotEncoder", compute, weights, input_kinds=("int64", "string", "multiArray",
                        "double"), preprocess=pre, postprocess=_dict_postprocess(out_name, out_spec),
                        key=(kind, len(cats)))


def _replace_value(p):
    which = p.WhichOneof("ReplaceValue")
    if which == "replaceDoubleValue":
        return float(p.replaceDoubleValue)
    if which == "replaceInt64Value":
        return float(p.replaceInt64Value)
    if which == "replaceStringValue":
        raise UnsupportedError("Imputer: string imputation is not supported (strings do not run in JAX)")
    return float("nan")


@register_stage_builder("imputer")
def build_imputer(spec, weights_dir=None, **_):
    """Replace values equal to the replace value (NaN by default) with the imputed value(s)."""
    p = spec.imputer
    which = p.WhichOneof("ImputedValue")
    if which == "imputedDoubleArray":
        imputed = np.asarray(p.imputedDoubleArray.vector, np.float64)
    elif which == "imputedInt64Array":
        imputed = np.asarray(p.imputedInt64Array.vector, np.float64)
    elif which == "imputedDoubleValue":
        imputed = np.asarray(p.imputedDoubleValue, np.float64)
    elif which == "imputedInt64Value":
        imputed = np.asarray(p.imputedInt64Value, np.float64)
    else:
        raise UnsupportedError(f"Imputer: imputed value of kind {which!r} is not supported; "
                               "numeric values and arrays are")
    replace = _replace_value(p)

    def compute(w, x):
        x = x.astype(float_dtype())
        missing = jnp.isnan(x) if np.isnan(replace) else x == replace
        return jnp.where(missing, jnp.broadcast_to(w["imputed"], x.shape), x)

    return _unary_stage(spec, "Imputer", compute, {"imputed": imputed}, key=repr(replace))


@register_stage_builder("arrayFeatureExtractor")
def build_array_feature_extractor(spec, weights_dir=None, **_):
    """The input's elements at ``extractIndex`` (one index: a scalar of the declared output type)."""
    idx = np.asarray(spec.arrayFeatureExtractor.extractIndex, np.int64)
    inputs, outputs = _io(spec, "ArrayFeatureExtractor")
    in_spec = next(iter(inputs.values()))
    if in_spec.shape and idx.size and idx.max() >= int(np.prod(in_spec.shape)):
        raise ModelFormatError(f"ArrayFeatureExtractor: index {int(idx.max())} is outside the input of "
                               f"shape {in_spec.shape}")
    out_kind = next(iter(outputs.values())).kind
    scalar = idx.size == 1 and out_kind in ("double", "int64")
    index = idx.astype(np.int32)

    def compute(w, x):
        values = jnp.ravel(x)[index]
        return values[0] if scalar else values

    return _unary_stage(spec, "ArrayFeatureExtractor", compute, input_kinds=("multiArray",),
                        key=(tuple(index.tolist()), scalar))


@register_stage_builder("featureVectorizer")
def build_feature_vectorizer(spec, weights_dir=None, **_):
    """Concatenate the input columns (scalars, arrays, int64-keyed dictionaries) into one vector."""
    columns = [(c.inputColumn, int(c.inputDimensions)) for c in spec.featureVectorizer.inputList]
    if not columns:
        raise ModelFormatError("FeatureVectorizer: expected at least one input column; found none")
    inputs, outputs = _io(spec, "FeatureVectorizer", n_in=None)
    out_name = next(iter(outputs))
    missing = [c for c, _ in columns if c not in inputs]
    if missing:
        raise ModelFormatError(f"FeatureVectorizer: input columns {missing} are not model inputs {list(inputs)}")
    dict_cols = {c: d for c, d in columns if inputs[c].kind == "dictionary"}

    def preprocess(data):
        if not isinstance(data, dict):
            return data
        return {k: dense_dict_input(v, dict_cols[k], k) if k in dict_cols else v for k, v in data.items()}

    def make_fn():
        def fn(w, feats, states):
            parts = []
            for name, dims in columns:
                v = jnp.ravel(jnp.asarray(feats[name])).astype(float_dtype())
                parts.append(v[:dims] if v.shape[0] >= dims else jnp.pad(v, (0, dims - v.shape[0])))
            return {out_name: jnp.concatenate(parts)}, states
        return fn

    return classic_stage(("FeatureVectorizer", tuple(columns), out_name), make_fn, weights={}, inputs=inputs,
                         outputs=outputs, preprocess=preprocess)


@register_stage_builder("dictVectorizer")
def build_dict_vectorizer(spec, weights_dir=None, **_):
    """A dictionary as a vector: each key's value at the key's position in the index mapping."""
    p = spec.dictVectorizer
    keys = (list(p.stringToIndex.vector) if p.WhichOneof("Map") == "stringToIndex"
            else [int(v) for v in p.int64ToIndex.vector])
    inputs, outputs = _io(spec, "DictVectorizer")
    in_name = next(iter(inputs))
    out_name, out_spec = next(iter(outputs.items()))
    index = {k: i for i, k in enumerate(keys)}

    def preprocess(data):
        if not isinstance(data, dict) or in_name not in data:
            return data
        return {**data, in_name: dense_dict_input(data[in_name], len(keys), in_name, index)}

    return _unary_stage(spec, "DictVectorizer", lambda w, x: x, input_kinds=("dictionary",),
                        preprocess=preprocess, postprocess=_dict_postprocess(out_name, out_spec),
                        key=())


@register_stage_builder("categoricalMapping")
def build_categorical_mapping(spec, weights_dir=None, **_):
    """string -> int64 (on the host) or int64 -> string (index in JAX, string in ``postprocess``)."""
    p = spec.categoricalMapping
    inputs, outputs = _io(spec, "CategoricalMapping")
    in_name = next(iter(inputs))
    out_name = next(iter(outputs))
    if p.WhichOneof("MappingType") == "stringToInt64Map":
        mapping = dict(p.stringToInt64Map.map)
        default = int(p.int64Value) if p.WhichOneof("ValueOnUnknown") == "int64Value" else None

        def preprocess(data):
            if not isinstance(data, dict) or not isinstance(data.get(in_name), str):
                return data
            value = data[in_name]
            if value not in mapping and default is None:
                raise InputError(f"CategoricalMapping: input {in_name!r} is {value!r}, not in the mapping "
                                 "and the model has no value for unknown inputs")
            return {**data, in_name: np.asarray(mapping.get(value, default), np.int64)}
        return _unary_stage(spec, "CategoricalMapping", lambda w, x: x, input_kinds=("string", "int64"),
                            preprocess=preprocess, key="stringToInt64")
    items = sorted(p.int64ToStringMap.map.items())
    strings = [v for _, v in items] + [p.strValue]     # index len(items) = unknown

    def compute(w, x):
        hit = w["keys"] == jnp.asarray(x).reshape(()).astype(jnp.int32)
        return jnp.where(jnp.any(hit), jnp.argmax(hit), len(items))

    def postprocess(values):
        if out_name not in values:
            return values
        return {**values, out_name: strings[int(np.asarray(values[out_name]).reshape(-1)[0])]}

    return _unary_stage(spec, "CategoricalMapping", compute, {"keys": np.asarray([k for k, _ in items], np.int32)},
                        input_kinds=("int64", "double"), postprocess=postprocess, key=("int64ToString", len(items)))


@register_stage_builder("identity")
def build_identity(spec, weights_dir=None, **_):
    """Outputs equal to the inputs, matched by position (numeric features only)."""
    inputs, outputs = _io(spec, "Identity", n_in=None, n_out=None)
    if len(inputs) != len(outputs):
        raise ModelFormatError(f"Identity: expected as many outputs as inputs; found {list(inputs)} -> {list(outputs)}")
    bad = [n for n, s in inputs.items() if s.kind not in _NUMERIC]
    if bad:
        raise UnsupportedError(f"Identity: inputs {bad} are not numeric; only numeric features run in JAX")
    pairs = list(zip(inputs, outputs))

    def make_fn():
        def fn(w, feats, states):
            return {o: feats[i] for i, o in pairs}, states
        return fn

    return classic_stage(("Identity", tuple(pairs)), make_fn, weights={}, inputs=inputs, outputs=outputs)
