"""Lowering: a MIL function becomes one pure JAX function ``f(weights, inputs, states)``.

One interpreter loop over a block (in the spirit of ``jax.core.eval_jaxpr``).  Constant
tensors that could be trained (floating point, more than one element) are *weights*: they
enter as an explicit pytree argument, never as baked-in constants.  Every other value an
op needs before tracing (axes, shapes, modes) comes from a constant or from a value that
is still concrete during tracing (e.g. a ``shape`` op on a static tensor); ops whose
inputs are all concrete run eagerly at trace time, so shape arithmetic never reaches XLA.
"""
from __future__ import annotations

import functools
from collections import ChainMap
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mljax import schedule
from mljax.errors import InputError, OpError, UnsupportedOpError
from mljax.mil.ir import Block, Function, Operation, Var
from mljax.mil.opspec import check_op_inputs
from mljax.mil.types import DTYPES, DType, StateType, TensorType
from mljax.ops._registry import HINTS, OpContext, lookup, opset_number
from mljax.ops.conv import prepared_kind, prepared_weight
from mljax.stage import PREPARED

__all__ = ["COMPUTE_PRECISIONS", "LoweredFunction", "compute_dtype_fn", "is_weight", "jax_dtype",
           "resolve_compute_precision"]

_NON_INPUT_ATTRIBUTES = {"name"}
_SHAPE_ONLY_OPS = {"shape"}   # their outputs depend on static shapes only, never on values

# Ops of the weight prologue: re-layouts and concatenations of constant weights that the graph
# layer adds (mljax.optimize), computed once per weight values instead of once per call.
_PROLOGUE_OPS = frozenset({"transpose", "concat", "reshape"})


# Typed execution.  Core ML treats an ML program's declared types as the *minimum* compute
# precision: a backend may compute fp16 ops in fp32 where fp16 arithmetic is slow.  XLA:CPU has
# no fp16 arithmetic (it converts around every op, and fp16 programs ran up to 2.1x slower than
# their fp32 twins), so on the CPU "auto" computes fp16/bf16 in fp32; on GPUs and TPUs, which run
# fp16 natively, it keeps the declared types.  "declared" asks for the declared types everywhere
# (bit-level fp16 rounding, e.g. to compare with Core ML's GPU or coremltools' fp16 references).
_PRECISION_ALIASES = {None: "auto", "auto": "auto",
                      "declared": "declared", "float16": "declared", "fp16": "declared",
                      "float32": "float32", "fp32": "float32"}
COMPUTE_PRECISIONS = ("auto", "declared", "float16", "float32")


def resolve_compute_precision(compute_precision: str | None, platform: str | None = None) -> str:
    """``"declared"`` or ``"float32"``: what ``compute_precision`` means on ``platform``
    (default: JAX's default backend)."""
    try:
        mode = _PRECISION_ALIASES[compute_precision]
    except (KeyError, TypeError):
        raise InputError(f"compute_precision must be one of {COMPUTE_PRECISIONS} (or None for 'auto'); "
                         f"found {compute_precision!r}") from None
    if mode != "auto":
        return mode
    platform = platform or jax.default_backend()
    return "float32" if platform == "cpu" else "declared"


def compute_dtype_fn(compute_precision: str | None) -> Callable[[DType], DType]:
    """The dtype to compute in for a declared dtype (Core ML's declared type is a minimum)."""
    if resolve_compute_precision(compute_precision) == "declared":
        return lambda dt: dt
    fp32 = DTYPES["fp32"]
    return lambda dt: fp32 if dt.name in ("fp16", "bf16") else dt


def jax_dtype(dt: DType) -> np.dtype:
    """The dtype JAX will hold values of MIL dtype ``dt`` in (int64 -> int32 without x64)."""
    if dt.name in ("uint1", "uint2", "uint3", "uint6"):
        return np.dtype(np.uint8)
    return jax.dtypes.canonicalize_dtype(dt.numpy)


def is_weight(var: Var) -> bool:
    """Trainable constants: floating-point tensors of more than one element."""
    v = var.value
    # bfloat16 (ml_dtypes) is not NumPy kind "f"
    return isinstance(v, np.ndarray) and v.size > 1 and (v.dtype.kind == "f" or v.dtype.name == "bfloat16")


def _is_concrete(x) -> bool:
    if isinstance(x, (jax.Array, np.ndarray, np.generic, str, int, float)) or x is None:
        return not isinstance(x, jax.core.Tracer)
    # containers of arrays (a MIL list value): concrete when none of their leaves is traced
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def _as_static(x):
    """A concrete value as the Python/NumPy value an op's keyword-only input expects."""
    if isinstance(x, (str, bool, int, float, list, tuple, dict)):
        return x
    arr = np.asarray(x)
    if arr.ndim == 0:
        return arr.item()
    return arr


class LoweredFunction:
    """A MIL function lowered to JAX; call it as ``(outputs, states) = f(weights, inputs, states)``."""

    def __init__(self, fn: Function, compute_precision: str | None = None, *, optimize: bool = True):
        self.fn = fn
        self.opset = opset_number(fn.opset)
        self.compute_dtype = compute_dtype_fn(compute_precision)
        self.derived: dict = {}
        self._derived_of: dict = {}
        self._check_supported()
        self._materialize_constexpr(fn.block)
        # graph optimizations on a copy (the program itself stays as loaded: save writes it)
        self.optimizations: dict[str, int] = {}
        if optimize:
            from mljax.optimize import optimize as run_passes
            self.fn, self.optimizations = run_passes(fn, self.compute_dtype)
        self.weights: dict[str, np.ndarray] = {}
        self._collect_weights(self.fn.block)
        self.prologue = self._find_prologue()
        # convs' prepared weights (Winograd transforms, HWIO layouts), computed with the prologue:
        # {name: (weight var name, kind)}
        self.derived, self._derived_of, self._winograd_convs = self._find_winograd()
        self.input_names = [v.name for v in fn.inputs if not isinstance(v.type, StateType)]
        self.state_names = [v.name for v in fn.inputs if isinstance(v.type, StateType)]
        self.output_names = [v.name for v in fn.outputs]
        self.value_inputs = self._find_value_inputs()
        self.trace_count = 0

    # --- load-time passes -------------------------------------------------------------
    def _check_supported(self) -> None:
        missing = {(op.type, self.fn.opset) for op in self.fn.block.walk()
                   if op.type != "const" and lookup(op.type, self.opset) is None}
        if missing:
            raise UnsupportedOpError(missing, where=f"function {self.fn.name!r}")
        for op in self.fn.block.walk():   # input names against the opset's table (never ignored silently)
            check_op_inputs(op.type, self.opset, op.inputs, f"function {self.fn.name!r}, op {op.name!r}",
                            op.attributes)

    def _materialize_constexpr(self, block: Block) -> None:
        """Evaluate constexpr_* ops once, at load, into constants."""
        for op in block.operations:
            if op.type.startswith("constexpr_"):
                values = self._call(op, {}, eager=True)
                for var, val in zip(op.outputs, values):
                    var.value = np.asarray(val)
            for b in op.blocks:
                self._materialize_constexpr(b)

    def _find_value_inputs(self) -> list[str]:
        """Inputs whose *values* an op needs before tracing (a shape, begin or reps fed by the
        model's inputs).  The caller must pass them concrete: ``MLModel`` jits once per value."""
        producer = {v.name: op for op in self.fn.block.walk() for v in op.outputs}
        stack = []
        for op in self.fn.block.walk():
            spec = lookup(op.type, self.opset, internal=True)
            for name in (spec.static_inputs if spec is not None else ()):
                stack.extend(v for v in op.inputs.get(name, ()) if v.value is None)
        found, seen = set(), set()
        while stack:
            var = stack.pop()
            if var.name in seen or var.value is not None:
                continue
            seen.add(var.name)
            op = producer.get(var.name)
            if op is None:
                found.add(var.name)
            elif op.type not in _SHAPE_ONLY_OPS:
                stack.extend(v for bound in op.inputs.values() for v in bound)
        return [n for n in self.input_names if n in found]

    def _collect_weights(self, block: Block) -> None:
        for op in block.walk():
            for var in op.outputs:
                if is_weight(var):
                    val = var.value
                    want = jax_dtype(self.compute_dtype(_declared_dtype(var, val)))
                    self.weights[var.name] = val if val.dtype == want else val.astype(want)
            for name, bound in op.inputs.items():
                for var in bound:
                    if var.name.startswith("_imm") and is_weight(var):
                        self.weights[var.name] = var.value

    def _find_prologue(self) -> tuple:
        """Top-block ops computed from constants and weights alone (``_PROLOGUE_OPS``)."""
        known, found = set(), []
        for op in self.fn.block.operations:
            if op.type in _PROLOGUE_OPS and not op.blocks and op.outputs and all(
                    v.value is not None or id(v) in known for bound in op.inputs.values() for v in bound):
                found.append(op)
                known.update(id(v) for v in op.outputs)
        return tuple(found)

    def _find_winograd(self) -> tuple[dict, dict, list]:
        """Top-level convs with a constant weight that one sample's shapes run by Winograd or, in a
        channel-last region, by XLA's convolution (:func:`mljax.ops.conv.prepared_kind`): their
        weight transform or HWIO layout is prepared once per weight values, as the prologue is.
        Returns that ``{name: (weight name, kind)}``, each conv's ``{kind: name}`` of every kind it
        may take (a list predict's folded batch may pick another one, see :meth:`batch_derived`)
        and the convs' shapes."""
        derived, of_op, convs = {}, {}, []
        for op in self.fn.block.operations:
            if op.type != "conv":
                continue
            w, x = op.input("weight"), op.input("x")
            if w is None or x is None or not is_weight(w) or not isinstance(x.type, TensorType):
                continue
            shape = x.type.shape
            if len(shape) != 4 or not all(isinstance(d, (int, np.integer)) for d in shape):
                continue
            hints = op.attributes.get(HINTS, {})
            region = bool(hints.get("channels_last")) and not hints.get("first_in") and not hints.get("weight_hwio")
            if hints.get("channels_last") and not hints.get("first_in"):
                shape = (shape[0], shape[3], shape[1], shape[2])
            static = {}
            for name in ("strides", "pad_type", "pad", "dilations", "groups"):
                v = op.input(name)
                if v is not None and v.value is None:
                    break
                if v is not None:
                    static[name] = _as_static(v.value)
            else:
                dtype = jax_dtype(self.compute_dtype(w.type.dtype))
                shape = tuple(int(d) for d in shape)
                try:
                    m = prepared_kind(shape, tuple(w.value.shape), dtype, region=region, **static)
                except (OpError, ValueError, TypeError):
                    continue     # attributes the op itself rejects, with its own error, when it runs
                of_op[id(op)] = {v: f"{w.name}__winograd{v}" for v in (2, 4)}
                if region:
                    of_op[id(op)]["hwio"] = f"{w.name}__hwio"
                convs.append((id(op), w.name, shape, tuple(w.value.shape), dtype, {**static, "region": region}))
                if m is not None:
                    derived[of_op[id(op)][m]] = (w.name, m)
        return derived, of_op, convs

    def batch_derived(self, n: int) -> dict:
        """The prepared conv weights a list predict of ``n`` samples uses beyond one sample's
        (:attr:`derived`): each conv's kind at its folded batch (``n`` samples, or the chunk plan's
        chunk for the ops it runs per chunk), where it differs.  ``{name: (weight, kind)}``."""
        plan = self.chunk_plan(n) if n > 1 else None
        ops = self.fn.block.operations
        chunk_of = {id(op): span.chunk for start, span in (plan.spans if plan is not None else ())
                    for op in ops[start:span.cut]}
        out = {}
        for op_id, src, shape, w_shape, dtype, static in self._winograd_convs:
            rows = (chunk_of.get(op_id, n) * shape[0],) + shape[1:]
            m = prepared_kind(rows, w_shape, dtype, **static)
            name = self._derived_of[op_id].get(m)
            if m is not None and name not in self.derived:
                out[name] = (src, m)
        return out

    @property
    def batch_derivable(self) -> bool:
        """A list predict may use prepared conv weights beyond one sample's (:meth:`batch_derived`)."""
        return bool(self._winograd_convs)

    def prepare_batch(self, weights: dict, n: int) -> dict:
        """:meth:`prepare`'s further values for a list predict of ``n`` samples
        (:meth:`batch_derived`), computed once per weight values and batch size (``MLModel``)."""
        return {name: prepared_weight(weights[src], m) for name, (src, m) in self.batch_derived(n).items()}

    def prepare(self, weights: dict) -> dict:
        """The weight prologue's values for these weights: ``{var name: array}``.

        Passed back as ``weights[PREPARED]``, the call skips the prologue (a predict computes it
        once per weight values, see ``MLModel``); without it each call computes it, so training
        differentiates through it to the weights themselves."""
        env = {k: v for k, v in weights.items() if k != PREPARED}
        for op in self.prologue:
            for var, val in zip(op.outputs, self._call(op, env)):
                env[var.name] = self._cast_output(var, val)
        out = {v.name: env[v.name] for op in self.prologue for v in op.outputs}
        out.update({name: prepared_weight(env[src], m) for name, (src, m) in self.derived.items()})
        return out

    # --- the interpreter ----------------------------------------------------------------
    def __call__(self, weights: dict, inputs: dict, states: dict | None = None):
        self.trace_count += 1
        env, state, skip = self._start(weights, inputs, states)
        return self._finish(self._run_block(self.fn.block, env, state, skip=skip), state)

    def _weights_env(self, weights: dict) -> tuple[dict, frozenset]:
        """The environment of the weights (and the prologue's prepared values, whose ops are then
        skipped)."""
        prepared = weights.get(PREPARED) if self.prologue or self.derived or self._winograd_convs else None
        env: dict[str, Any] = {k: v for k, v in weights.items() if k != PREPARED}
        if prepared is not None:
            env.update(prepared)
        return env, (frozenset(id(op) for op in self.prologue) if prepared is not None else frozenset())

    def _start(self, weights: dict, inputs: dict, states: dict | None):
        env, skip = self._weights_env(weights)
        for v in self.fn.inputs:
            if isinstance(v.type, StateType):
                env[v.name] = states[v.name]
            elif v.name in inputs:
                val = inputs[v.name]
                if isinstance(v.type, TensorType):
                    want = jax_dtype(self.compute_dtype(v.type.dtype))
                    # a float32 value of a float16 input: rounded to float16 here (MLModel leaves
                    # it to XLA: Stage.fp16_in_graph), then held in the compute dtype
                    # (concrete values of inputs ops need before tracing stay NumPy)
                    val = np.asarray(val) if v.name in self.value_inputs and _is_concrete(val) else jnp.asarray(val)
                    if v.type.dtype.name == "fp16":
                        val = val.astype(jax_dtype(v.type.dtype))
                    val = val.astype(want)
                env[v.name] = val
        return env, {k: env[k] for k in self.state_names}, skip

    def _finish(self, outs, state: dict):
        # Typed execution computes at *least* the declared precision; what leaves the function
        # (outputs, states) has the declared dtypes, so a pipeline's next stage, a training
        # step's features and predict all see the same values (fp16 outputs rounded once, here).
        outs = [_cast_to(v.type, val) for v, val in zip(self.fn.outputs, outs)]
        declared = {v.name: v.type.wrapped for v in self.fn.inputs if isinstance(v.type, StateType)}
        state.update({k: _cast_to(declared[k], val) for k, val in state.items()})
        return dict(zip(self.output_names, outs)), state

    # --- batches ------------------------------------------------------------------------
    def map_batch(self, weights: dict, inputs: dict, states: dict | None = None):
        """``jax.vmap(self)`` over the leading axis of ``inputs`` (a list predict's samples), run
        by the chunk plan of :mod:`mljax.schedule` where it has one: the activation-heavy prefix
        over chunks of a few samples, the rest over the whole batch.  Same values."""
        plan = self.chunk_plan(schedule.batch_size(inputs)) if not states and schedule.chunked_backend() else None
        if plan is None:
            return jax.vmap(self, in_axes=(None, 0, None))(weights, inputs, states)
        self.trace_count += 1
        if (self.prologue or self.derived) and PREPARED not in weights:     # once, not once per chunk
            weights = {**weights, PREPARED: self.prepare(weights)}
        ops = self.fn.block.operations

        def prefix(sample):
            env, state, skip = self._start(weights, sample, {})
            self._run_ops(ops[:plan.cut], env, state, skip)
            return {name: env[name] for name in plan.live}

        def middle(start, span, live):
            env, skip = self._weights_env(weights)
            env.update(live)
            self._run_ops(ops[start:span.cut], env, {}, skip)
            return {name: env[name] for name in span.live}

        def suffix(live):
            env, skip = self._weights_env(weights)
            env.update(live)
            self._run_ops(ops[plan.end:], env, {}, skip)
            return self._finish([self._value(v, env) for v in self.fn.block.outputs], {})
        return schedule.run_chunked(plan, inputs, prefix, suffix, middle)

    def chunk_plan(self, n: int):
        """:func:`mljax.schedule.chunk_plan` of this function's top-level ops for ``n`` samples."""
        if self.state_names or self.value_inputs:
            return None
        inputs = {v.name: self._bytes(v) for v in self.fn.inputs}
        if any(b is None for b in inputs.values()):
            return None
        return schedule.chunk_plan(self._steps, inputs, [v.name for v in self.fn.block.outputs], n)

    @functools.cached_property
    def _steps(self) -> list:
        """One :class:`mljax.schedule.Step` per top-level op (constants and the weight prologue
        write nothing: their values come with the weights)."""
        prologue = {id(op) for op in self.prologue}
        laid_out = {v.name for op in self.prologue for v in op.outputs}
        steps = []
        for op in self.fn.block.operations:
            if op.type == "const" or op.type.startswith("constexpr_") or id(op) in prologue:
                steps.append(schedule.Step(frozenset(), ()))
                continue
            reads = frozenset(v.name for o in [op, *_nested_ops(op)] for bound in o.inputs.values()
                              for v in bound if v.value is None)
            weights = sum(self._bytes(v) or 0 for bound in op.inputs.values() for v in bound
                          if is_weight(v) or v.name in laid_out)
            writes = tuple((v.name, self._bytes(v)) for v in op.outputs)
            steps.append(schedule.Step(reads, writes, weights, op.type in _POOLS))
        return steps

    def _bytes(self, var: Var):
        """Bytes per sample of ``var`` as computed (None: not a tensor of static shape)."""
        typ = var.type
        if not isinstance(typ, TensorType) or not all(isinstance(d, (int, np.integer)) for d in typ.shape):
            return None
        if typ.dtype.name == "string":
            return None
        return int(np.prod(typ.shape, dtype=np.int64)) * jax_dtype(self.compute_dtype(typ.dtype)).itemsize

    def _value(self, var: Var, env) -> Any:
        if var.name in env:
            return env[var.name]
        if var.value is not None:
            return var.value
        raise OpError(f"variable {var.name!r} has no value (an input that was not provided?)")

    def _run_block(self, block: Block, env, state, args=(), skip=frozenset()) -> tuple:
        for var, val in zip(block.inputs, args):
            env[var.name] = val
        self._run_ops(block.operations, env, state, skip)
        return tuple(self._value(v, env) for v in block.outputs)

    def _run_ops(self, ops, env, state, skip=frozenset()) -> None:
        for op in ops:
            if op.type == "const" or op.type.startswith("constexpr_") or id(op) in skip:
                continue
            values = self._call(op, env, state=state)
            for var, val in zip(op.outputs, values):
                env[var.name] = self._cast_output(var, val)

    def _cast_output(self, var: Var, val):
        return _cast_to(var.type, val, self.compute_dtype)

    def _block_fn(self, block: Block, env, state):
        def run(*args):
            return self._run_block(block, ChainMap({}, env), state, args)
        return run

    def _call(self, op: Operation, env, *, eager: bool = False, state=None) -> tuple:
        spec = lookup(op.type, self.opset, internal=True)
        where = f"op {op.name!r} ({op.type}, iOS{self.opset})"
        args, kwargs, positional = [], {}, spec.variadic is not None
        for name in spec.tensor_inputs:
            bound = op.inputs.get(name)
            if not bound:
                if name not in spec.optional_inputs:
                    raise OpError(f"{where}: required input {name!r} is missing")
                if positional:
                    args.append(None)
                continue
            val = self._value(bound[0], env)
            if positional:
                args.append(val)
            else:
                kwargs[name] = val
        if spec.variadic:
            args.extend(self._value(v, env) for v in op.inputs.get(spec.variadic, ()))
        for name in spec.static_inputs:
            if name in op.inputs:
                bound = op.inputs[name]
                vals = [v.value if v.value is not None else self._value(v, env) for v in bound]
                if not all(_is_concrete(v) for v in vals):
                    raise OpError(
                        f"{where}: input {name!r} must be known before execution (a constant or "
                        f"computed from static shapes), but it depends on the model's inputs")
                kwargs[name] = _as_static(vals[0]) if len(vals) == 1 else [_as_static(v) for v in vals]
            elif name in op.attributes and name not in _NON_INPUT_ATTRIBUTES:
                kwargs[name] = _as_static(op.attributes[name])
            elif name not in spec.static_defaults:
                raise OpError(f"{where}: required input {name!r} is missing")
        if spec.wants_ctx:
            kwargs["ctx"] = OpContext(
                op.type, op.name, self.opset,
                output_types=tuple(v.type for v in op.outputs),
                blocks=tuple(self._block_fn(b, env, state) for b in op.blocks),
                compute_dtype=self.compute_dtype, state=state if state is not None else {},
                input_vars={k: (v[0] if len(v) == 1 else v) for k, v in op.inputs.items()},
                hints=op.attributes.get(HINTS, {}),
                prepared=({"weights": tuple(env[n] for n in self._derived_of[id(op)].values() if n in env)}
                          if id(op) in self._derived_of else {}))
        concrete = eager or all(_is_concrete(a) for a in (*args, *kwargs.values())
                                if not isinstance(a, OpContext))
        try:
            if concrete and not op.blocks:
                with jax.ensure_compile_time_eval():
                    out = spec.fn(*args, **kwargs)
            else:
                out = spec.fn(*args, **kwargs)
        except OpError as e:
            raise OpError(f"{where}: {e}") from None
        except jax.dtypes.TypePromotionError as e:
            raise OpError(f"{where}: its inputs' dtypes do not combine ({e})") from None
        return out if isinstance(out, tuple) else (out,)


def _nested_ops(op: Operation):
    for b in op.blocks:
        for inner in b.operations:
            yield inner
            yield from _nested_ops(inner)


# a chunk plan's span holding one of these reads its chunks prefetched (mljax.schedule.prefetched_map)
_POOLS = ("max_pool", "avg_pool", "l2_pool")


def _cast_to(typ, val, dtype_of: Callable[[DType], DType] = lambda dt: dt):
    """``val`` held in ``dtype_of(typ.dtype)`` for a tensor type (default: the declared dtype; other
    values as they are); concrete values stay concrete."""
    if not isinstance(typ, TensorType) or typ.dtype.name == "string":
        return val
    want = jax_dtype(dtype_of(typ.dtype))
    if getattr(val, "dtype", None) == want:
        return val
    if _is_concrete(val):
        with jax.ensure_compile_time_eval():
            return jnp.asarray(val).astype(want)
    return val.astype(want)


def _declared_dtype(var: Var, val: np.ndarray) -> DType:
    if isinstance(var.type, TensorType):
        return var.type.dtype
    from mljax.mil.types import dtype_from_numpy
    return dtype_from_numpy(val.dtype)
