"""JAX functions and Flax NNX modules -> Core ML ML programs.

``convert`` traces the function with :func:`jax.make_jaxpr`, translates each primitive
into MIL ops (rules in :mod:`converters._jax_rules`), runs the passes (dead code,
constant folding, optional fp16 casts) and writes an ``.mlpackage`` that
:class:`mljax.MLModel` (and Core ML) loads.  Nested ``jit``/``pjit``, ``custom_jvp_call``
and ``custom_vjp_call`` are inlined; equations whose inputs are all known are evaluated
with JAX at conversion time.
"""
from __future__ import annotations

import atexit
import shutil
from contextlib import contextmanager
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal

import mljax
from converters._builder import Builder, mil_dtype, tensor_type
from converters import _jax_attention, _jax_control, _jax_indexing, _jax_nn, _jax_rules, _verify
from converters._jax_rules import Unsupported
from converters.passes import run_passes
from mljax.errors import ConversionError
from mljax.mil.ir import Block, Function, Program, Var
from mljax.mil.to_proto import SPEC_VERSION_OF_OPSET, write_mlprogram_package
from mljax.mil.types import DTYPES, TensorType
from mljax.proto import FeatureTypes_pb2, Model_pb2

__all__ = ["convert", "to_program", "TARGETS"]

#: minimum_deployment_target -> opset of the written program.
TARGETS = {"iOS15": "CoreML5", "iOS16": "CoreML6", "iOS17": "CoreML7", "iOS18": "CoreML8"}
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
# Primitives that only call their sub-jaxpr once (inlined); scan/while/cond also carry jaxprs
# but have rules of their own.
_CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "named_call",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
_NO_FOLD = {"broadcast_in_dim"}          # folding would materialize the broadcast
# Layout changes of a weight are left to the MIL constant folding, which keeps the weight's name.
_LAYOUT = {"reshape", "transpose", "squeeze", "expand_dims", "convert_element_type"}
_FOLD_LIMIT = 1 << 22                    # largest folded result (elements)
_ARRAY_TYPES = {"fp32": FeatureTypes_pb2.ArrayFeatureType.FLOAT32,
                "fp16": FeatureTypes_pb2.ArrayFeatureType.FLOAT16,
                "int32": FeatureTypes_pb2.ArrayFeatureType.INT32}


def _merge(*tables) -> dict:
    merged: dict = {}
    for table in tables:
        twice = set(merged) & set(table)
        if twice:
            raise RuntimeError(f"translation rules registered twice: {sorted(twice)}")
        merged.update(table)
    return merged


#: JAX primitive name -> translation rule (the table docs/converters.md is generated from).
RULES = _merge(_jax_rules.RULES, _jax_control.RULES, _jax_indexing.RULES, _jax_nn.RULES)
#: JAX primitive -> the forms its rule does not translate (the rest of RULES translate every form).
PARTIAL = _merge(_jax_rules.PARTIAL, _jax_control.PARTIAL, _jax_indexing.PARTIAL, _jax_nn.PARTIAL)
#: call primitives whose body is inlined.
INLINED = frozenset(_CALLS)


class Translator:
    """Walks a jaxpr, filling a :class:`Builder`; ``env`` maps jaxpr vars to MIL Vars.

    A MIL Var may hold a *lazily broadcast* value: a ``broadcast_in_dim`` is emitted as a
    rank-expanding reshape, and only materialized (``tile``) when a consumer needs the
    full shape; elementwise ops broadcast on their own.
    """

    def __init__(self, builder: Builder, *, fuse_attention: bool = False, ios: int = 17):
        self.b = builder
        self.ios = ios                            # the deployment target's iOS version
        self.fuse_attention = fuse_attention      # iOS18: marked attention calls -> one MIL op
        self.env: dict = {}
        self.origins: dict[int, frozenset] = {}     # placeholder Var id -> {(primitive, why)}
        self._literals: dict = {}

    # --- values -----------------------------------------------------------------------
    def known(self, atom):
        """The NumPy value of a literal or constant atom, else None."""
        if isinstance(atom, Literal):
            return np.asarray(atom.val, dtype=atom.aval.dtype)
        var = self.env.get(atom)
        if var is not None and var.value is not None and isinstance(var.value, np.ndarray) \
                and tuple(var.value.shape) == tuple(atom.aval.shape):
            return var.value
        return None

    def lazy(self, atom) -> Var:
        """The MIL Var of an atom, possibly smaller than its aval (to be broadcast)."""
        if isinstance(atom, Literal):
            val = np.asarray(atom.val, dtype=atom.aval.dtype)
            key = (val.dtype.str, val.shape, val.tobytes())
            if key not in self._literals:
                self._literals[key] = self.b.const(val, name="literal", dtype=mil_dtype(val.dtype))
            return self._literals[key]
        return self.env[atom]

    def read(self, atom) -> Var:
        """The MIL Var of an atom with exactly its aval's shape."""
        return self.materialize(self.lazy(atom), tuple(atom.aval.shape))

    def materialize(self, var: Var, shape: tuple) -> Var:
        have = var.type.shape
        if have == shape:
            return var
        if len(have) < len(shape):
            have = (1,) * (len(shape) - len(have)) + tuple(have)
            var = self.b.op("reshape", TensorType(var.type.dtype, have), x=var, shape=list(have))
        reps = [s // h if h else 1 for s, h in zip(shape, have)]
        return self.b.op("tile", TensorType(var.type.dtype, shape), x=var, reps=reps)

    def fit(self, vars_: list[Var], shape: tuple) -> list[Var]:
        """Lazily broadcast inputs of an elementwise op, materialized when broadcasting alone
        would not reach the op's output shape."""
        try:
            ok = np.broadcast_shapes(*(v.type.shape for v in vars_)) == tuple(shape)
        except ValueError:
            ok = False
        return vars_ if ok else [self.materialize(v, tuple(shape)) for v in vars_]

    @staticmethod
    def out_type_of(atom) -> TensorType:
        return tensor_type(atom.aval.shape, atom.aval.dtype)

    @staticmethod
    def out_type(eqn, i: int = 0) -> TensorType:
        aval = eqn.outvars[i].aval
        return tensor_type(aval.shape, aval.dtype)

    # --- walking ------------------------------------------------------------------------
    def run(self, jaxpr, consts, args) -> list[Var]:
        for v, c in zip(jaxpr.constvars, consts):
            if isinstance(c, Var):
                self.env[v] = c
            elif _is_key(v.aval.dtype):
                self.env[v] = self.opaque("PRNG key constant", "random keys are not exported")
            else:
                self.env[v] = self.b.const(np.asarray(c), name="const")
        for v, a in zip(jaxpr.invars, args):
            self.env[v] = a
        for eqn in jaxpr.eqns:
            self.equation(eqn)
        return [self.lazy(v) for v in jaxpr.outvars]

    def equation(self, eqn) -> None:
        prim = eqn.primitive.name
        sub = _inlined_body(eqn)
        upstream = [self.origins[id(v)] for v in (self.env.get(a) for a in _data_inputs(eqn)
                                                  if not isinstance(a, Literal))
                    if v is not None and id(v) in self.origins]
        fused = None
        if sub is not None and self.fuse_attention and not upstream and _jax_attention.is_marked(eqn):
            try:
                fused = _jax_attention.fused_attention(self, eqn)
            except Unsupported:
                fused = None
        if fused is not None:
            outs = fused
        elif upstream and sub is None:        # fed by something untranslatable: untranslatable too
            outs = [self._placeholder(frozenset().union(*upstream)) for _ in eqn.outvars]
        elif sub is not None:
            args = [self.lazy(a) for a in eqn.invars[len(eqn.invars) - len(sub.jaxpr.invars):]]
            outs = self.run(sub.jaxpr, list(sub.consts), args)
        elif self._foldable(eqn):
            vals = eqn.primitive.bind(*(self.known(a) for a in eqn.invars), **eqn.params)
            vals = vals if eqn.primitive.multiple_results else [vals]
            outs = [self.b.const(np.asarray(v), name=prim, dtype=mil_dtype(np.asarray(v).dtype))
                    for v in vals]
        elif prim not in RULES:
            outs = [self._placeholder(frozenset({(prim, "no translation rule")})) for _ in eqn.outvars]
        else:
            try:
                outs = RULES[prim](self, eqn)
            except Unsupported as e:
                outs = [self._placeholder(frozenset({(prim, str(e))})) for _ in eqn.outvars]
        for v, out in zip(eqn.outvars, outs):
            self.env[v] = out

    @contextmanager
    def scope(self):
        """Collect the ops of a nested block; literals made inside stay inside."""
        saved = dict(self._literals)
        try:
            with self.b.block() as ops:
                yield ops
        finally:
            self._literals = saved

    def block_outputs(self, ops, outs) -> list[Var]:
        """``outs`` as values produced inside the block (an identity for outer values)."""
        mine = {id(v) for op in ops if op.type != "const" for v in op.outputs}
        return [o if id(o) in mine else self.b.op("identity", o.type, x=o) for o in outs]

    def block(self, closed, args, inputs=()) -> Block:
        """A nested MIL block computing the closed jaxpr ``closed`` of ``args`` (outer Vars or
        the block's own ``inputs``); its outputs have exactly the jaxpr's output shapes."""
        with self.scope() as ops:
            outs = self.run(closed.jaxpr, list(closed.consts), list(args))
            self.require(outs)
            outs = [self.materialize(o, tuple(v.aval.shape)) for o, v in zip(outs, closed.jaxpr.outvars)]
            outs = self.block_outputs(ops, outs)
        return Block(list(inputs), ops, outs)

    def block_input(self, name: str, typ: TensorType) -> Var:
        return Var(self.b.fresh(name), typ)

    def _foldable(self, eqn) -> bool:
        if eqn.primitive.name in _NO_FOLD or eqn.effects or any(_is_key(v.aval.dtype) for v in eqn.outvars):
            return False
        if any(self.known(a) is None for a in eqn.invars):
            return False
        if eqn.primitive.name in _LAYOUT and is_weight_value(self.known(eqn.invars[0])):
            return False
        return all(np.prod(v.aval.shape, dtype=np.int64) <= _FOLD_LIMIT for v in eqn.outvars)

    def _placeholder(self, origin: frozenset) -> Var:
        """A stand-in for a value with no translation; an error only if an output depends on it."""
        var = Var(self.b.fresh("unsupported"), None)
        self.origins[id(var)] = origin
        return var

    def opaque(self, name: str, why: str) -> Var:
        return self._placeholder(frozenset({(name, why)}))

    def unsupported(self, values) -> dict[str, str]:
        """primitive -> why, for the untranslatable values among ``values``."""
        found: dict[str, str] = {}
        for v in values:
            for prim, why in sorted(self.origins.get(id(v), ())):
                found.setdefault(prim, why)
        return found

    def require(self, values) -> None:
        """Raise Unsupported when a nested jaxpr's results depend on untranslatable values."""
        bad = self.unsupported(values)
        if bad:
            raise Unsupported("its body uses " + "; ".join(f"{p} ({why})" for p, why in bad.items()))


def _inlined_body(eqn):
    """The closed jaxpr of a call primitive the translator inlines, else None."""
    if eqn.primitive.name not in _CALLS:
        return None
    sub = next((eqn.params[k] for k in _CALL_PARAMS if k in eqn.params), None)
    if sub is None:
        return None
    return sub if isinstance(sub, ClosedJaxpr) else ClosedJaxpr(sub, ())


def _data_inputs(eqn) -> list:
    """The inputs whose untranslatable values make the equation untranslatable.  A loop's or
    branch's closed-over values only matter if its body uses them (its rule checks that), so
    e.g. a PRNG key an eval-mode cell carries into a scan does not block the scan."""
    p, name = eqn.params, eqn.primitive.name
    if name == "scan":
        return eqn.invars[int(p["num_consts"]):]
    if name == "while":
        return eqn.invars[int(p["cond_nconsts"]) + int(p["body_nconsts"]):]
    if name == "cond":
        return eqn.invars[:1]
    return eqn.invars


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def is_weight_value(value) -> bool:
    """A float constant of more than one element (what mljax treats as a trainable weight)."""
    return isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size > 1


# --- tracing --------------------------------------------------------------------------
def _path_name(path) -> str:
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if part is not None and str(part) != "value":
            parts.append(str(part))
    return "_".join(parts) or "param"


def _trace(fn, example_inputs: dict):
    """(closed jaxpr, output pytree, parameter names, parameter values).

    An NNX module is split into its graph and state; the state leaves become leading
    arguments of the traced function, bound later to named constants.
    """
    args = [np.asarray(v) for v in example_inputs.values()]
    try:
        from flax import nnx
        is_module = isinstance(fn, nnx.Module)
    except ImportError:
        is_module = False
    if not is_module:
        closed, out_tree = jax.make_jaxpr(fn, return_shape=True)(*args)
        return closed, out_tree, [], []
    graphdef, state = nnx.split(fn)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    closed, out_tree = jax.make_jaxpr(lambda st, *xs: nnx.merge(graphdef, st)(*xs),
                                      return_shape=True)(state, *args)
    return closed, out_tree, [_path_name(p) for p, _ in leaves], [v for _, v in leaves]


def _output_names(closed, out_tree, output_names) -> list[str]:
    """``output_names``, else a dict result's keys, else ``output`` / ``output_i``."""
    n = len(closed.jaxpr.outvars)
    if output_names is None:
        if isinstance(out_tree, dict) and all(isinstance(k, str) for k in out_tree) and \
                all(not isinstance(v, (dict, list, tuple)) for v in out_tree.values()):
            output_names = sorted(out_tree)        # the order jax flattens a dict in
        else:
            output_names = ["output"] if n == 1 else [f"output_{i}" for i in range(n)]
    output_names = list(output_names)
    if len(output_names) != n:
        raise ConversionError(f"output_names has {len(output_names)} names; the function returns {n} arrays")
    return output_names


def _param_var(translator, name: str, value) -> Var:
    """A module state leaf as a named constant; PRNG keys (unused at inference) stay opaque."""
    if jax.dtypes.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key):
        return translator.opaque(f"PRNG key {name!r}", "random keys in module state are not exported; "
                                 "use the module in eval mode (deterministic=True)")
    return translator.b.const(np.asarray(value), name=name, keep_name=True)


def _check_names(names, what: str) -> None:
    for n in names:
        if not (isinstance(n, str) and n.isidentifier()):
            raise ConversionError(f"{what} name {n!r} is not a valid identifier (letters, digits, '_')")
    if len(set(names)) != len(names):
        raise ConversionError(f"{what} names repeat: {list(names)}")


def _bind_outputs(b: Builder, translator: Translator, outvars, results, names) -> list[Var]:
    """Name the function outputs; bool and narrow integer outputs become int32 (the integer type
    Core ML arrays have)."""
    outs, seen = [], set()
    for atom, var, name in zip(outvars, results, names):
        var = translator.materialize(var, tuple(atom.aval.shape))
        if var.type.dtype.name not in _ARRAY_TYPES:
            var = b.op("cast", TensorType(DTYPES["int32"], var.type.shape), x=var, dtype="int32")
        produced = any(var is o for op in b.operations if op.type != "const" for o in op.outputs)
        if produced and id(var) not in seen:
            var.name = name
            for op in b.operations:
                if op.outputs and op.outputs[0] is var:
                    op.name = name
        else:
            var = b.op("identity", var.type, name="identity", x=var)
            var.name = b.operations[-1].name = name
        seen.add(id(var))
        outs.append(var)
    return outs


def to_program(fn, example_inputs: dict, *, output_names=None, compute_precision: str = "float32",
               minimum_deployment_target: str = "iOS17") -> Program:
    """Trace ``fn`` on ``example_inputs`` and translate it into a MIL :class:`Program`."""
    return _translate(fn, example_inputs, output_names, compute_precision, minimum_deployment_target)[0]


def _translate(fn, example_inputs, output_names, compute_precision, minimum_deployment_target):
    """(program, closed jaxpr, translator, jaxpr arguments: parameter values then inputs)."""
    if minimum_deployment_target not in TARGETS:
        raise ConversionError(f"minimum_deployment_target must be one of {sorted(TARGETS)}; "
                              f"found {minimum_deployment_target!r}")
    if compute_precision not in ("float32", "float16"):
        raise ConversionError(f"compute_precision must be 'float32' or 'float16'; found {compute_precision!r}")
    if not isinstance(example_inputs, dict) or not example_inputs:
        raise ConversionError("example_inputs must be a non-empty dict of input name -> example array")
    _check_names(list(example_inputs), "input")
    with _jax_attention.marked_attention(minimum_deployment_target == "iOS18"):
        closed, out_tree, param_names, param_values = _trace(fn, example_inputs)
    output_names = _output_names(closed, out_tree, output_names)
    _check_names(output_names, "output")
    b = Builder(reserved=[*example_inputs, *output_names])
    inputs = []
    for name, value in example_inputs.items():
        arr = np.asarray(value)
        t = tensor_type(arr.shape, arr.dtype)
        if t.dtype.name not in _ARRAY_TYPES:
            raise ConversionError(f"input {name!r} has dtype {arr.dtype}; Core ML inputs must be "
                                  f"float32, float16 or int32")
        inputs.append(Var(name, t))
    translator = Translator(b, fuse_attention=minimum_deployment_target == "iOS18",
                            ios=int(minimum_deployment_target[3:]))
    params = [_param_var(translator, n, v) for n, v in zip(param_names, param_values)]
    jaxpr = closed.jaxpr
    results = translator.run(jaxpr, list(closed.consts), [*params, *inputs])
    unsupported = translator.unsupported(results)
    if unsupported:
        listed = "; ".join(f"{p} ({why})" for p, why in sorted(unsupported.items()))
        raise ConversionError(f"cannot convert {len(unsupported)} JAX primitive(s): {listed}")
    outputs = _bind_outputs(b, translator, jaxpr.outvars, results, output_names)
    opset = TARGETS[minimum_deployment_target]
    function = Function("main", inputs, opset, Block([], b.operations, outputs))
    program = Program(1, {"main": function},
                      {"buildInfo": {"mljax-version": mljax.__version__, "mljax-source": "jax"}})
    run_passes(program, compute_precision=compute_precision)
    args = [*param_values, *(np.asarray(v) for v in example_inputs.values())]
    return program, closed, translator, args


def _description(function: Function) -> Model_pb2.ModelDescription:
    desc = Model_pb2.ModelDescription()
    for src, dst in ((function.inputs, desc.input), (function.outputs, desc.output)):
        for v in src:
            f = dst.add(name=v.name)
            f.type.multiArrayType.shape.extend(int(d) for d in v.type.shape)
            f.type.multiArrayType.dataType = _ARRAY_TYPES[v.type.dtype.name]
    desc.metadata.userDefined["com.github.mljax.version"] = mljax.__version__
    desc.metadata.userDefined["com.github.mljax.source"] = "jax"
    return desc


_TEMP_DIRS: list[str] = []


@atexit.register
def _cleanup() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def convert(fn, example_inputs: dict, *, output_names=None, compute_precision: str = "float32",
            minimum_deployment_target: str = "iOS17", verify: bool = True) -> "mljax.MLModel":
    """Convert a JAX function or Flax NNX module into a Core ML ML program.

    Args:
      fn: a JAX-traceable function, or an ``nnx.Module`` (called; its state becomes constants).
      example_inputs: input name -> example array; ``fn`` is called positionally with the
        values in order; shapes and dtypes are fixed from them.
      output_names: names of the flattened outputs (default ``output`` / ``output_i``).
      compute_precision: ``"float16"`` casts fp32 inputs to fp16 at the start and the
        outputs back (as Apple's converter does); ``"float32"`` keeps fp32.
      minimum_deployment_target: ``"iOS15"`` .. ``"iOS18"`` (opset and spec version).
      verify: run the exported program with mljax on ``example_inputs`` and compare with the
        JAX function (tolerance by precision, :data:`converters._verify.TOLERANCE`); ``False``
        skips it (very large models: it costs one compile and one prediction).
    Returns:
      an :class:`mljax.MLModel` backed by a temporary ``.mlpackage``; ``.save(path)`` copies it.
    Raises:
      ConversionError: naming every primitive that has no translation; or, when the exported
        program predicts differently from JAX, naming the first equation that diverges.
    """
    program, closed, translator, args = _translate(fn, example_inputs, output_names, compute_precision,
                                                   minimum_deployment_target)
    spec = Model_pb2.Model()
    spec.specificationVersion = SPEC_VERSION_OF_OPSET[program.functions["main"].opset]
    spec.description.CopyFrom(_description(program.functions["main"]))
    folder = tempfile.mkdtemp(prefix="mljax-convert-")
    _TEMP_DIRS.append(folder)
    path = write_mlprogram_package(spec, program, Path(folder) / "model.mlpackage")
    model = mljax.MLModel(path)
    if verify:
        main = program.functions["main"]
        _verify.verify(model, closed, translator.env.get, _inlined_body, main, args,
                       {k: np.asarray(v) for k, v in example_inputs.items()},
                       [v.name for v in main.outputs], compute_precision)
    return model
