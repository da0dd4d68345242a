"""``mljax.MLModel``: load any Core ML model and predict, shaped like coremltools' MLModel."""
from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import functools
import math
import os
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from google.protobuf.message import Message

from mljax import distribute, packing
from mljax.cache import CachedJit
from mljax.cpu import ALIGN_ABOVE, aligned, aligned_empty, batched_compiler_options, is_device_dtype
from mljax.errors import InputError, OpError, PredictionError
from mljax.features import Features, convert_inputs, convert_output, feature_specs
from mljax.format.package import load_spec
from mljax.lower import resolve_compute_precision
from mljax.ops.random import CALL_KEY_INPUT
from mljax.stage import PREPARED, Stage, build_stage, shared_fn

__all__ = ["MLModel"]


class MLModel:
    """A Core ML model running on JAX.

    Takes the arguments of ``coremltools.models.MLModel`` (coremltools 9), plus mljax's own.

    Args:
      model: a path to an ``.mlpackage`` folder or ``.mlmodel`` file, serialized ``Model``
        bytes, a ``Model`` protobuf message (coremltools' ``get_spec()`` too), or a
        coremltools ``MLModel``.
      weights_dir: for specs given in memory, the folder holding their weight files (as in
        coremltools: a package's ``Data/com.apple.CoreML/weights``).  The one argument besides
        ``model`` that may be positional (coremltools' second positional is ``is_temp_package``:
        pass it by keyword).
      is_temp_package: ``True`` deletes the model's package folder (or file) when the
        interpreter exits, as coremltools does for the temporary packages ``ct.convert`` writes.
      mil_program: a coremltools MIL ``Program`` the model was converted from; kept as
        ``_mil_program`` (as coremltools keeps it) and not used: mljax reads the program from the spec.
      skip_model_load: ``True`` reads the spec and its descriptions without lowering or
        compiling the model (fast, for inspecting or re-saving); ``predict`` then raises
        :class:`~mljax.errors.PredictionError`.
      compute_units: advisory, accepted for coremltools compatibility: a ``ct.ComputeUnit`` or
        its name (``"ALL"``, ``"CPU_ONLY"``, ``"CPU_AND_GPU"``, ``"CPU_AND_NE"``), kept as
        ``compute_unit``.  JAX chooses the device (``JAX_PLATFORMS``, ``jax.default_device``);
        there is no neural engine.
      function_name: which function of a multifunction ML program to run.
      optimization_hints: advisory, accepted for coremltools compatibility: a dict with
        coremltools' keys (``allowLowPrecisionAccumulationOnGPU``, ``reshapeFrequency``,
        ``specializationStrategy``), kept as ``optimization_hints``; XLA compiles once per input
        shape whatever they say.
      compute_precision: typed execution, as Core ML defines it (declared types are the
        *minimum* precision).  ``"auto"`` (or ``None``, the default): fp16/bf16 programs compute
        in fp32 on the CPU, where XLA has no fp16 arithmetic, and in their declared types on
        GPUs/TPUs; ``"declared"`` (alias ``"float16"``): the declared types everywhere (exact
        fp16 rounding); ``"float32"``: fp32 everywhere.  Inputs and outputs keep their declared
        dtypes in every mode.
      optimize: run :mod:`mljax.optimize`'s graph passes on ML programs at load (default);
        ``False`` lowers the program exactly as the file holds it.

    Any other keyword is a ``TypeError`` naming it and listing these.
    """

    def __init__(self, model, weights_dir=None, *, is_temp_package: bool = False, mil_program=None,
                 skip_model_load: bool = False, compute_units=None, function_name: str | None = None,
                 optimization_hints: dict | None = None, compute_precision: str | None = None,
                 optimize: bool = True, _stage: Stage | None = None, **unknown):
        if unknown:
            raise TypeError(_unknown_keywords(unknown))
        if weights_dir is not None and not isinstance(weights_dir, (str, os.PathLike)):
            raise TypeError(f"MLModel(): weights_dir must be a folder path; found {type(weights_dir).__name__} "
                            f"{weights_dir!r} (coremltools' second positional argument, is_temp_package, "
                            f"is keyword-only in mljax)")
        self.compute_unit = _compute_unit(compute_units)
        self.optimization_hints = _optimization_hints(optimization_hints)
        self._mil_program = mil_program
        self.is_temp_package = bool(is_temp_package)
        loaded = load_spec(model, weights_dir)
        self._spec = loaded.spec
        self.model_dir = loaded.model_dir
        self.package_path = loaded.path
        if self.is_temp_package and loaded.path is not None:
            atexit.register(_remove_path, loaded.path)
        self.function_name = function_name
        resolve_compute_precision(compute_precision)    # an unknown value fails here, for every model type
        self.compute_precision = compute_precision
        self.skip_model_load = bool(skip_model_load)
        if self.skip_model_load:
            self._stage = _description_stage(self._spec, function_name)
            self._weights = self._loaded_weights = {}
            return
        self._stage = _stage or build_stage(self._spec, self.model_dir, function_name=function_name,
                                            compute_precision=compute_precision, optimize=optimize)
        self._stage = _per_call(self._stage)
        with self._x64_scope():
            self._weights = jax.device_put(self._stage.weights)
        self._loaded_weights = self._weights   # replaced weights (training) differ by identity
        self._eager = False                     # set when the model's shapes depend on input values
        self._call_keys = _CallKeys()           # fresh random keys, for programs with seed=-1 random ops
        self._predict_fn = _jit_stage(self._stage)
        self._cached_fn = (CachedJit(self._predict_fn, self._stage.digest)
                           if self._stage.digest is not None and not self._stage.static_inputs else None)
        self._batched_fn, self._batched_shapes = _jit_batched(self._stage)
        # XLA:CPU takes 64-byte aligned input arrays without a copy (mljax.cpu.aligned)
        self._zero_copy = jax.default_backend() == "cpu"

    @property
    def weights_dir(self) -> Path | None:
        """The folder holding the weight files (coremltools' meaning), if any."""
        return None if self.model_dir is None else self.model_dir / "weights"

    # --- descriptions ------------------------------------------------------------------
    @property
    def input_description(self) -> Features:
        """``{name: FeatureSpec}`` of the inputs; prints one line a feature (type, shape, image format)."""
        return Features(self._stage.inputs)

    @property
    def output_description(self) -> Features:
        """``{name: FeatureSpec}`` of the outputs; a classifier's lines name its class labels."""
        from mljax.inspect import classifier_notes
        return Features(self._stage.outputs, classifier_notes(self._spec))

    @property
    def user_defined_metadata(self) -> dict[str, str]:
        return dict(self._spec.description.metadata.userDefined)

    @property
    def short_description(self) -> str:
        return self._spec.description.metadata.shortDescription

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def weights(self) -> dict:
        """The weights pytree the jitted function takes (trainable by ``updatable``)."""
        return self._weights

    def with_weights(self, weights, *, spec=None) -> "MLModel":
        """A new MLModel running the same compiled function with other weight values.

        ``weights`` must be a pytree like :attr:`weights`: the same names, and each array of
        the same shape and dtype (:class:`InputError` otherwise).  ``spec``: the ``Model``
        message that holds these weights (e.g. trained NeuralNetwork layers written into it),
        which ``save`` then writes; it must describe the same model type, inputs and outputs.
        Without it the spec is shared, and a pipeline whose weights changed cannot be saved.
        This model is unchanged.
        """
        _check_weights_like(self._weights, weights)
        if isinstance(spec, Message):   # a copy in this project's schema (coremltools' specs too)
            spec = load_spec(spec).spec
        if spec is not None:
            mine, theirs = self._spec, getattr(spec, "description", None)
            if (theirs is None or spec.WhichOneof("Type") != mine.WhichOneof("Type")
                    or list(theirs.input) != list(mine.description.input)
                    or list(theirs.output) != list(mine.description.output)):
                raise InputError(f"with_weights: spec must describe this {mine.WhichOneof('Type')} model "
                                 f"(same type, inputs and outputs); found {type(spec).__name__}"
                                 + (f" of type {spec.WhichOneof('Type')}" if theirs is not None else ""))
        new = copy.copy(self)
        with self._x64_scope():
            new._weights = jax.device_put(weights)
        if spec is not None:   # the spec holds these weights: they are what a save writes
            new._spec, new._loaded_weights = spec, new._weights
        new._call_keys = _CallKeys()
        return new

    def get_spec(self):
        """A copy of the model's ``Model`` protobuf (this project's schema)."""
        return copy.deepcopy(self._spec)

    def get_compiled_model_path(self) -> str | None:
        return None if self.package_path is None else str(self.package_path)

    # --- prediction ----------------------------------------------------------------------
    def _x64_scope(self):
        """``jax.enable_x64`` for stages that compute in float64 (classic models), else nothing."""
        return jax.enable_x64(True) if self._stage.x64 else contextlib.nullcontext()

    def _prepare(self, data: dict) -> dict:
        if self.skip_model_load:
            raise PredictionError("this MLModel was loaded with skip_model_load=True: it describes and saves "
                                  "the model but cannot predict; load it without skip_model_load")
        if self._stage.preprocess is not None:
            data = self._stage.preprocess(data)
        inputs = convert_inputs(self._stage.inputs, data, fp16_in_graph=self._stage.fp16_in_graph)
        if self._stage.call_key:
            inputs[CALL_KEY_INPUT] = self._call_keys.next()
        return inputs

    def _finish(self, outputs: dict) -> dict:
        outputs = {k: np.asarray(v) for k, v in outputs.items()}
        if self._stage.postprocess is not None:
            outputs = self._stage.postprocess(outputs)
        specs = self._stage.outputs
        if not specs:
            return outputs
        # in the model description's order (JAX returns dict pytrees sorted by key)
        return {k: convert_output(specs[k], outputs[k]) for k in specs if k in outputs}

    #: the most inputs of a list predict that run in one vmapped call
    BATCH_CHUNK = 1024
    PROGRESS_ABOVE = 4096     # list predicts of more samples show a progress bar (tqdm, on stderr)

    def predict_stream(self, data, *, chunk: int = 4096, progress: bool = True):
        """Predictions of an iterable of feature dicts, yielded one by one in order, ``chunk``
        inputs at a time (each chunk a list predict): for datasets larger than memory."""
        return distribute.predict_stream(self, data, chunk=chunk, progress=progress)

    def predict(self, data, state: "MLState | None" = None):
        """Predict one dict of features, or a list of dicts (batched in one call when shapes agree)."""
        if isinstance(data, (list, tuple)):
            return self._predict_batch(list(data), state)
        inputs = self._prepare(data)
        states = self._state_values(state)
        outputs, new_states = self._run(inputs, states)
        outputs = _raise_failed_checks(outputs)
        if state is not None:
            state._values = new_states
        return self._finish(outputs)

    def _prepare_many(self, items: list) -> tuple[list, bool]:
        """``[self._prepare(d) for d in items]`` and whether every item has the first's names and
        shapes (False: not known).  Where the inputs are all arrays (no preprocessing, no per-call
        key), an item of NumPy arrays with the first item's names, dtypes and shapes passes the
        same checks as the first, so only the first is checked in full: 1.5 us a sample saved
        (the checks were a tenth of a 32-sample LSTM's host time)."""
        first = self._prepare(items[0])
        stage = self._stage
        if (len(items) == 1 or stage.preprocess is not None or stage.call_key
                or not all(spec.kind == "multiArray" for spec in stage.inputs.values())
                or not isinstance(items[0], dict) or not all(type(v) is np.ndarray for v in items[0].values())):
            return [first] + [self._prepare(d) for d in items[1:]], False
        sig = [(k, v.dtype, v.shape, first[k].dtype) for k, v in items[0].items()]
        keys, out, uniform = items[0].keys(), [first], True
        for d in items[1:]:
            if type(d) is dict and d.keys() == keys and all(
                    type(d[k]) is np.ndarray and d[k].dtype == dt and d[k].shape == shape for k, dt, shape, _ in sig):
                out.append({k: d[k].astype(to, copy=False) for k, _, _, to in sig})
            else:
                out.append(self._prepare(d))
                uniform = False
        return out, uniform

    def _finish_rows(self, outputs: dict, count: int) -> list:
        """``[self._finish(row i of outputs) for i in range(count)]``; multiArray outputs of at least
        one axis a sample converted once for the batch, each row a view."""
        specs = self._stage.outputs
        if (self._stage.postprocess is not None or not specs
                or not all(specs[k].kind == "multiArray" and np.ndim(outputs[k]) > 1 for k in specs if k in outputs)):
            return [self._finish({k: v[i] for k, v in outputs.items()}) for i in range(count)]
        columns = [(k, list(convert_output(specs[k], np.asarray(outputs[k]))[:count])) for k in specs if k in outputs]
        return [{k: rows[i] for k, rows in columns} for i in range(count)]

    def _predict_batch(self, items: list, state) -> list:
        if not items:
            return []
        prepared, uniform = self._prepare_many(items)
        same = uniform or all(p.keys() == prepared[0].keys() and
                              all(np.shape(p[k]) == np.shape(prepared[0][k]) for k in p) for p in prepared)
        if not (self._stage.batchable and state is None and same and len(items) > 1):
            return [self.predict(d, state) for d in items]
        if self._eager:
            return [self.predict(d, state) for d in items]
        # at most BATCH_CHUNK rows per vmapped call and device (bounded memory); the last chunk is
        # padded with copies of the first row, so one compiled size serves every chunk
        n, chunk = len(prepared), distribute.chunk_rows(len(prepared), self.BATCH_CHUNK)
        results = []
        # one update a chunk: shown at once (mininterval=0)
        bar = distribute.sample_bar(n, "mljax predict", mininterval=0) if n > self.PROGRESS_ABOVE else None
        for start in range(0, n, chunk):
            rows = prepared[start:start + chunk]
            rows = rows + [prepared[0]] * (chunk - len(rows))
            stacked = {k: _stack([p[k] for p in rows], self._zero_copy, k) for k in prepared[0]}
            try:
                with self._x64_scope():
                    outputs, _ = distribute.run_batched(self._batched_fn, self._batch_weights(chunk), stacked)
                outputs = _raise_failed_checks(outputs)
            except _NEEDS_CONCRETE:
                return [self.predict(d, state) for d in items]
            outputs = _unsqueezed({k: np.asarray(v) for k, v in outputs.items()}, stacked, self._batched_shapes)
            count = min(chunk, n - start)   # the padded rows of the last chunk are dropped
            results += self._finish_rows(outputs, count)
            if bar is not None:
                bar.update(count)
        if bar is not None:
            bar.close()
        return results

    def _run(self, inputs: dict, states: dict):
        """The jitted function; op by op on concrete values when a shape depends on the data."""
        with self._x64_scope():
            if not self._eager:
                if self._zero_copy:
                    inputs = {k: v if k in self._stage.static_inputs else aligned(v, ALIGN_ABOVE)
                              for k, v in inputs.items()}
                try:
                    if self._cached_fn is not None and self._weights is self._loaded_weights:
                        return self._cached_fn(self._call_weights(), inputs, states)
                    return self._predict_fn(self._call_weights(), inputs, states)
                except _NEEDS_CONCRETE:
                    # e.g. non_zero, or a slice whose bounds are model inputs: XLA needs static shapes,
                    # so this model runs un-jitted from now on (each op still a compiled kernel)
                    self._eager = True
            return self._stage.fn(self._weights, {k: jnp.asarray(v) for k, v in inputs.items()}, states)

    def _run_weights(self):
        """The weights a predict passes: with the stage's prepared values (``Stage.prepare``),
        computed once per weight values (a model from ``with_weights`` computes its own)."""
        if self._stage.prepare is None:
            return self._weights
        cached = getattr(self, "_prepared", None)
        if cached is None or cached[0] is not self._weights:
            cached = self._prepared = (self._weights, {**self._weights, PREPARED: self._stage.prepare(self._weights)})
        return cached[1]

    def _batch_weights(self, n: int):
        """:meth:`_run_weights` for a list predict of ``n`` samples: with the prepared values its
        folded batch uses beyond one sample's (``Stage.prepare_batch``), computed once per weight
        values and ``n``."""
        run = self._run_weights()
        if self._stage.prepare_batch is None:
            return run
        cached = getattr(self, "_batch_prepared", None)
        if cached is None or cached[0] is not run:
            cached = self._batch_prepared = (run, {}, {})
        per_n, by_name = cached[1], cached[2]
        if n not in per_n:
            # each transform held once (by name), however many batch sizes use it
            extra = {k: by_name.setdefault(k, v) for k, v in self._stage.prepare_batch(self._weights, n).items()}
            per_n[n] = {**run, PREPARED: {**run.get(PREPARED, {}), **extra}} if extra else run
        return per_n[n]

    def _call_weights(self):
        """:meth:`_run_weights` with the small arrays packed (:mod:`mljax.packing`): what a
        single predict passes (a list predict passes them plain: the chunk plan's loops would
        otherwise copy each slice they read before the loop)."""
        run = self._run_weights()
        cached = getattr(self, "_packed", None)
        if cached is None or cached[0] is not run:
            cached = self._packed = (run, packing.pack(run) if self._zero_copy else run)
        return cached[1]

    # --- state ---------------------------------------------------------------------------
    def make_state(self) -> "MLState":
        """Fresh state buffers (zeros) for a stateful model."""
        if self.skip_model_load:
            raise PredictionError("this MLModel was loaded with skip_model_load=True: it cannot make state")
        if not self._stage.states:
            raise InputError("this model declares no state; make_state() needs a stateful (iOS18) model")
        return MLState({n: jnp.zeros(s.shape, s.dtype) for n, s in self._stage.states.items()})

    def _state_values(self, state) -> dict:
        if not self._stage.states:
            if state is not None:
                raise InputError("state= was given but this model declares no state")
            return {}
        if state is None:
            raise InputError(f"this model is stateful: pass state=model.make_state() "
                             f"(states {list(self._stage.states)})")
        return state._values

    # --- saving --------------------------------------------------------------------------
    def save(self, path) -> "SavedPath":
        """Write the model (atomically) as ``.mlpackage`` or ``.mlmodel``; returns where, as a
        :class:`SavedPath` (a ``str`` that is also ``os.PathLike``, so coremltools takes it too)."""
        from mljax.writer import save_model
        return SavedPath(save_model(self, path))

    def __repr__(self) -> str:
        kind = self._spec.WhichOneof("Type")
        where = f" {self.package_path}" if self.package_path is not None else ""
        head = f"mljax.MLModel ({kind}{where})"
        if self._spec.description.metadata.shortDescription:
            head += f"\n{self._spec.description.metadata.shortDescription}"
        parts = [head, f"inputs: {self.input_description}", f"outputs: {self.output_description}"]
        if self._stage.states:
            parts.append(f"states: {Features(self._stage.states)}")
        return "\n".join(parts)


def _check_weights_like(current, new) -> None:
    """InputError unless ``new`` has ``current``'s names, and arrays of its shapes and dtypes."""
    flat = jax.tree_util.tree_flatten_with_path
    want, want_tree = flat(current)
    found, found_tree = flat(new)
    if want_tree != found_tree:
        names = lambda leaves: {_weight_name(k) for k, _ in leaves}   # noqa: E731
        missing, extra = sorted(names(want) - names(found)), sorted(names(found) - names(want))
        raise InputError(f"weights: expected {len(want)} arrays named like model.weights; missing {missing[:10]}, "
                         f"unexpected {extra[:10]}"
                         + ("" if missing or extra else f" (found a {type(new).__name__} structured otherwise)"))
    for (key, a), (_, b) in zip(want, found):
        dtype = getattr(b, "dtype", None)
        if np.shape(b) != np.shape(a) or dtype is None or np.dtype(dtype) != np.dtype(a.dtype):
            raise InputError(f"weights {_weight_name(key)!r}: expected an array of shape {np.shape(a)} and "
                             f"dtype {np.dtype(a.dtype)}; found {type(b).__name__} of shape {np.shape(b)} and "
                             f"dtype {dtype}")


def _weight_name(path) -> str:
    """A weights pytree path as ``stage/var`` (as ``updatable.pipeline.weight_names`` writes it)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class SavedPath(str):
    """Where :meth:`MLModel.save` wrote a model: a ``str`` (coremltools' ``MLModel`` and other
    APIs that test ``isinstance(path, str)`` take it) that is also ``os.PathLike`` and answers
    ``pathlib.Path``'s attributes (``exists()``, ``name``, ``/`` ...), comparing equal to the path
    however it is spelled (str or Path)."""

    def __fspath__(self) -> str:
        return str.__str__(self)

    @property
    def path(self) -> Path:
        return Path(str.__str__(self))

    def __getattr__(self, name):
        return getattr(self.path, name)

    def __truediv__(self, other) -> Path:
        return self.path / other

    def __eq__(self, other) -> bool:
        if isinstance(other, os.PathLike):
            return self.path == Path(other)
        return str.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self == other

    __hash__ = str.__hash__

    def __repr__(self) -> str:
        return f"SavedPath({str.__repr__(self)})"


# the keywords MLModel takes (coremltools 9's and mljax's own), listed by the TypeError for others
_KEYWORDS = ("weights_dir", "is_temp_package", "mil_program", "skip_model_load", "compute_units",
             "function_name", "optimization_hints", "compute_precision", "optimize")
_COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
_OPTIMIZATION_HINTS = ("allowLowPrecisionAccumulationOnGPU", "reshapeFrequency", "specializationStrategy")


def _unknown_keywords(unknown: dict) -> str:
    import difflib
    names = sorted(unknown)
    hints = [f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, _KEYWORDS, 1)) else ""
             for n in names]
    listed = ", ".join(f"{n!r}{h}" for n, h in zip(names, hints))
    return (f"MLModel() got unexpected keyword argument(s) {listed}; "
            f"it accepts: model, {', '.join(_KEYWORDS)}")


def _compute_unit(value) -> str:
    """A ``ct.ComputeUnit`` (or its name) -> its name; advisory, JAX chooses the device."""
    if value is None:
        return "ALL"
    name = getattr(value, "name", value)
    if not isinstance(name, str) or name.upper() not in _COMPUTE_UNITS:
        raise InputError(f"compute_units must be a coremltools.ComputeUnit or one of {_COMPUTE_UNITS}; "
                         f"found {value!r}")
    return name.upper()


def _optimization_hints(hints) -> dict | None:
    if hints is None:
        return None
    if not isinstance(hints, dict):
        raise InputError(f"optimization_hints must be a dict; found {type(hints).__name__}")
    unknown = sorted(set(hints) - set(_OPTIMIZATION_HINTS))
    if unknown:
        raise InputError(f"optimization_hints: unknown key(s) {unknown}; expected some of {list(_OPTIMIZATION_HINTS)}")
    return dict(hints)


def _remove_path(path: Path) -> None:
    """``is_temp_package``: delete the model's package (or file) at interpreter exit."""
    import shutil
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _description_stage(spec, function_name) -> Stage:
    """A stage that only describes the model (``skip_model_load=True``): no function, no weights."""
    desc = spec.description
    name = function_name or desc.defaultFunctionName
    for f in desc.functions:
        if f.name == name:
            desc = f
            break
    return Stage(fn=None, weights={}, inputs=feature_specs(desc.input), outputs=feature_specs(desc.output),
                 states=feature_specs(desc.state), batchable=False)


def _jit_stage(stage: Stage):
    """``jax.jit(stage.fn)``, which also takes the weights packed (:mod:`mljax.packing`); inputs in
    ``stage.static_inputs`` are passed by value (one trace per value)."""
    options = batched_compiler_options()     # 512-bit vectors on CPUs with AVX-512
    if stage.fn_key is not None and not stage.static_inputs:
        return shared_fn(("packed", stage.fn_key, tuple(sorted(options.items()))),
                         lambda: _jit_packing_scalars(_unpacking(stage.fn), options))
    if not stage.static_inputs:
        return jax.jit(_unpacking(stage.fn), compiler_options=options or None)
    names = frozenset(stage.static_inputs)

    @functools.partial(jax.jit, static_argnums=3, compiler_options=options or None)
    def run(weights, inputs, states, static_key):
        static = {n: np.frombuffer(raw, dt).reshape(shape) for n, dt, shape, raw in static_key}
        return _unpacking(stage.fn)(weights, {**inputs, **static}, states)

    def call(weights, inputs, states):
        key = tuple((n, np.asarray(v).dtype.str, np.shape(v), np.asarray(v).tobytes())
                    for n, v in sorted(inputs.items()) if n in names)
        return run(weights, {n: v for n, v in inputs.items() if n not in names}, states, key)
    return call


def _unpacking(fn):
    """``fn`` taking its weights plain or packed (:func:`mljax.packing.pack`)."""
    @functools.wraps(fn)
    def run(weights, inputs, states):
        return fn(packing.unpack(weights), inputs, states)
    return run


def _jit_packing_scalars(fn, options: dict | None = None):
    """``jax.jit(fn)`` whose 0-d float64 inputs travel as one array: one host-to-device transfer
    instead of one per input (classic models often take a dozen ``double`` features).  ``options``:
    XLA compile options."""
    @functools.partial(jax.jit, static_argnums=4, compiler_options=options or None)
    def run(weights, inputs, packed, states, names):
        return fn(weights, {**inputs, **{n: packed[i] for i, n in enumerate(names)}}, states)

    def call(weights, inputs, states):
        names = tuple(n for n, v in inputs.items()
                      if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype == np.float64)
        packed = np.array([inputs[n] for n in names], np.float64)
        return run(weights, {n: v for n, v in inputs.items() if n not in names}, packed, states, names)
    return call


def _stack(arrays: list, zero_copy: bool, key=None) -> np.ndarray:
    """``np.stack(arrays)``, into a 64-byte aligned array for XLA:CPU (``mljax.cpu.aligned``).

    With ``key`` (an input's name), a batch of at most :data:`_REUSED_STACK_BYTES` goes into the
    calling thread's buffer for that input, shape and dtype, made once: the list predict reads it
    only during its call (the call waits for its outputs).  An executable given a freshly allocated
    input each call took longer than one given the same buffer again (zoo lstm at 32 samples,
    256 KiB of input: 1.35 against 1.40 ms a call, Intel Xeon; the allocation itself takes
    microseconds and no page faults, so the cost is XLA's, measured, not explained)."""
    first = np.asarray(arrays[0])
    if not zero_copy or not is_device_dtype(first.dtype):
        return np.stack(arrays)
    shape = (len(arrays),) + first.shape
    if key is None or math.prod(shape) * first.dtype.itemsize > _REUSED_STACK_BYTES:
        out = aligned_empty(shape, first.dtype)
    else:
        buffers = _STACKS.__dict__.setdefault("buffers", {})
        out = buffers.get((key, shape, first.dtype))
        if out is None:
            out = buffers[(key, shape, first.dtype)] = aligned_empty(shape, first.dtype)
            if len(buffers) > _REUSED_STACKS:
                del buffers[next(iter(buffers))]
    if not first.ndim:
        return np.stack(arrays, out=out)
    # the samples end to end along their first axis, into a view of out (assigning .shape never
    # copies): np.stack's expand_dims per array cost 7 us a call at 32 samples
    flat = out.view()
    flat.shape = (-1,) + first.shape[1:]
    np.concatenate(arrays, axis=0, out=flat)
    return out


# Larger batches get a fresh array each call (the gain is a fixed cost, small beside their
# executables); at most 8 MiB of buffers per thread, which go with their thread.
_REUSED_STACK_BYTES = 1 << 20
_REUSED_STACKS = 8                 # buffers kept per thread (the oldest goes first)
_STACKS = threading.local()


def _jit_batched(stage: Stage):
    """``jax.jit(jax.vmap(stage.fn))`` over inputs (``stage.map_batch``, its schedule of the same,
    where the stage has one), compiled with :func:`mljax.cpu.batched_compiler_options`, its outputs
    without their size-1 axes (:func:`_squeezing`); shared by stages with the same ``fn_key`` and
    options.  Returns the jitted function and its ``{input shapes: {output: per-sample shape}}``."""
    options = batched_compiler_options()     # 512-bit vectors on CPUs with AVX-512
    if stage.map_batch is not None:
        return _squeezing(stage.map_batch, options)
    make = lambda: _squeezing(jax.vmap(stage.fn, in_axes=(None, 0, None)), options)   # noqa: E731
    return make() if stage.fn_key is None else shared_fn(("vmap", stage.fn_key, tuple(sorted(options.items()))), make)


def _squeezing(batched, options: dict):
    """``jax.jit(batched)`` whose array outputs come back without the size-1 axes after the sample
    axis, and the per-sample shapes that restore them (recorded when it traces, keyed by the input
    shapes; :func:`_unsqueezed`).

    Why: a program's outputs carry its batch of 1, ``[1, ...]`` a sample, ``[n, 1, ...]`` a list
    predict.  Where a matrix product computes such an output directly, XLA:CPU gave the product's
    ``[n * ..., D]`` result a layout with the size-1 axis outermost and then copied it into the
    default layout it returns, the same bytes in the same order: Llama's logits at 32 samples, a
    32 MB copy, 0.96x the executable's time without it (Intel Xeon, interleaved rounds)."""
    shapes: dict = {}

    def run(weights, inputs, states):
        outputs, new_states = batched(weights, inputs, states)
        shapes[_shape_key(inputs)] = {k: tuple(v.shape[1:]) for k, v in outputs.items() if _squeezable(v)}
        return {k: v.reshape(v.shape[:1] + tuple(d for d in v.shape[1:] if d != 1)) if _squeezable(v) else v
                for k, v in outputs.items()}, new_states
    return jax.jit(run, compiler_options=options), shapes


def _squeezable(v) -> bool:
    return isinstance(v, jax.Array) and v.ndim >= 2 and 1 in v.shape[1:]


def _shape_key(inputs: dict) -> tuple:
    """``inputs``' names and shapes (traced or NumPy arrays): the key of :func:`_squeezing`'s shapes."""
    return tuple(sorted((k, tuple(np.shape(v))) for k, v in inputs.items()))


def _unsqueezed(outputs: dict, stacked: dict, shapes: dict) -> dict:
    """The list predict's ``outputs`` (NumPy) with the size-1 axes :func:`_squeezing` took off."""
    key = _shape_key(stacked)
    if key not in shapes:      # the executable ran without tracing this signature: a bug of mljax's
        raise PredictionError(f"internal error: no output shapes recorded for list-predict inputs {key}")
    restore = shapes[key]
    return {k: v.reshape(v.shape[:1] + restore[k]) if k in restore else v for k, v in outputs.items()}


# Errors that mean "this needs concrete input values" when raised while tracing.
_NEEDS_CONCRETE = (OpError, jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                   jax.errors.TracerBoolConversionError, jax.errors.TracerArrayConversionError)


# --- what a call needs beyond its inputs -----------------------------------------------------
_CHECKS = "__mljax_checks__"   # the output holding the checkify error of traced run-time checks


def _per_call(stage: Stage) -> Stage:
    """``stage`` with a fresh random key per call (ML programs with ``seed=-1`` random ops, input
    ``CALL_KEY_INPUT``) and run-time checks returned as an output (``validate_indices`` on
    computed indices: ``checkify``), so one jitted function serves every call."""
    lowered = stage.lowered
    if lowered is None or stage.per_call:
        return stage
    from mljax.ops import random, scatter_gather
    keyed, checked = random.uses_call_key(lowered.fn), scatter_gather.has_runtime_checks(lowered.fn)
    if not (keyed or checked):
        return stage
    fn = random.with_call_key(stage.fn) if keyed else stage.fn
    # checkify's error output holds tracebacks, which mljax.cache cannot store: no digest then
    return dataclasses.replace(stage, fn=_with_checks(fn) if checked else fn, map_batch=None,
                               digest=None if checked else stage.digest,
                               per_call=True, call_key=keyed)


def _with_checks(fn):
    """Traced calls of ``fn`` run under ``checkify.checkify``; the error is output ``_CHECKS``.
    Op by op (concrete inputs) the checks raise at once and ``fn`` runs as it is."""
    from jax.experimental import checkify

    def run(weights, inputs, states):
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(inputs)):
            return fn(weights, inputs, states)
        err, (outputs, new_states) = checkify.checkify(fn)(weights, inputs, states)
        return {**outputs, _CHECKS: err}, new_states
    return run


def _raise_failed_checks(outputs: dict) -> dict:
    """``outputs`` without ``_CHECKS``; a failed check raises :class:`PredictionError`."""
    if _CHECKS not in outputs:
        return outputs
    outputs = dict(outputs)
    message = outputs.pop(_CHECKS).get()
    if message:
        raise PredictionError(message.replace(" (`check` failed)", ""))
    return outputs


class _CallKeys:
    """Raw uint32[2] PRNG keys, a new one per call: a random base per model, then a counter."""

    def __init__(self):
        self._base = np.uint32(np.random.SeedSequence().entropy % (2**32))
        self._count = 0

    def next(self) -> np.ndarray:
        self._count += 1
        return np.array([self._base, self._count % (2**32)], np.uint32)


class MLState:
    """Opaque state buffers of a stateful model, updated in place by ``predict``."""

    def __init__(self, values: dict):
        self._values = values

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._values[name])
