"""Program passes: dead code elimination, constant folding, fp16 casting."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import converters
from converters._builder import Builder
from converters.passes import cast_to_fp16, eliminate_dead_code, fold_constants
from mljax.mil.ir import Block, Function, Operation, Var
from mljax.mil.types import DTYPES, TensorType

F32 = DTYPES["fp32"]


def _t(*shape, dtype="fp32"):
    return TensorType(DTYPES[dtype], shape)


def _function(b: Builder, inputs, outputs) -> Function:
    return Function("main", inputs, "CoreML7", Block([], b.operations, outputs))


def test_dead_code_is_removed_with_its_constants():
    x = Var("x", _t(2, 3))
    b = Builder(reserved=["x"])
    live = b.op("relu", _t(2, 3), x=x)
    b.op("exp", _t(2, 3), x=b.op("mul", _t(2, 3), x=x, y=np.float32(2)))       # dead, with a const
    out = b.op("add", _t(2, 3), x=live, y=np.float32(1))
    fn = _function(b, [x], [out])
    assert eliminate_dead_code(fn.block) == 3                                   # exp, mul, mul's const
    assert [op.type for op in fn.block.operations] == ["relu", "const", "add"]


def test_dead_code_keeps_values_used_only_inside_nested_blocks():
    x = Var("x", _t(3))
    b = Builder(reserved=["x"])
    used_inside = b.op("exp", _t(3), x=x)
    unused = b.op("log", _t(3), x=x)
    inner_out = Var("inner", _t(3))
    inner = Block([], [Operation("relu", "inner", {"x": (used_inside,)}, [inner_out])], [inner_out])
    pred = b.const(True, name="pred")
    result = Var("result", _t(3))
    b.operations.append(Operation("cond", "result", {"pred": (pred,)}, [result], [inner, inner]))
    fn = _function(b, [x], [result])
    eliminate_dead_code(fn.block)
    kept = {op.outputs[0].name for op in fn.block.operations}
    assert used_inside.name in kept and unused.name not in kept


def test_constant_folding_uses_mljax_ops_and_keeps_weight_names():
    rng = np.random.default_rng(0)
    w_value, v_value = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    x = Var("x", _t(2, 4))
    b = Builder(reserved=["x"])
    w = b.const(w_value, name="dense_kernel", keep_name=True)
    wt = b.op("transpose", _t(4, 3), x=w, perm=[1, 0])                          # only user of w
    v = b.const(v_value, name="shared", keep_name=True)
    vt = b.op("reshape", _t(1, 4), x=v, shape=[1, 4])                           # v has another user
    s = b.op("add", _t(4), x=b.op("exp", _t(4), x=v), y=np.float32(1))          # const subexpression
    y = b.op("matmul", _t(2, 3), x=b.op("mul", _t(2, 4), x=x, y=vt), y=wt)
    out = b.op("add", _t(2, 4), x=b.op("mul", _t(2, 4), x=x, y=s), y=x)
    fn = _function(b, [x], [y, out])
    fold_constants(fn)
    eliminate_dead_code(fn.block)
    consts = {op.outputs[0].name: op.outputs[0].value for op in fn.block.operations if op.type == "const"}
    np.testing.assert_array_equal(consts["dense_kernel"], w_value.T)             # took over the name
    assert consts["dense_kernel"].shape == (4, 3)
    assert vt.name != "shared" and "shared" not in consts        # two users: no takeover; now dead
    np.testing.assert_allclose(consts[vt.name], v_value.reshape(1, 4))
    np.testing.assert_allclose(consts[s.name], np.exp(v_value) + 1, rtol=1e-6)
    assert [op.type for op in fn.block.operations if op.type != "const"] == ["mul", "matmul", "mul", "add"]


def test_fp16_casts_inputs_constants_and_outputs_like_apple():
    w = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)

    def fn(x, n):
        y = jnp.tanh(x @ w) * -1e9                        # -1e9 saturates to the fp16 range
        return y, (n * 2).astype(jnp.float32), jnp.argmax(x, axis=1)

    program = converters.to_program(fn, {"x": np.ones((2, 4), np.float32), "n": np.ones(2, np.int32)},
                                    output_names=["y", "m", "best"], compute_precision="float16")
    main = program.functions["main"]
    ops = main.block.operations
    first_cast = next(op for op in ops if op.type == "cast")
    assert first_cast.input("x").name == "x" and first_cast.outputs[0].name == "x_to_fp16"
    assert all(v.name != "x" for op in ops if op is not first_cast for bound in op.inputs.values()
               for v in bound)
    consts = [op.outputs[0] for op in ops if op.type == "const" and op.outputs[0].type.dtype.is_float]
    assert consts and all(v.type.dtype.name == "fp16" for v in consts)
    assert any(v.name.endswith("_to_fp16") and v.value.shape == (3, 4) for v in consts)
    assert np.isfinite(np.concatenate([np.ravel(v.value) for v in consts])).all()
    # every float op computes in fp16; the outputs are cast back to fp32 under their names
    for op in ops:
        if op.type not in ("const", "cast"):
            assert all(v.type.dtype.name in ("fp16", "int32", "bool") for v in op.outputs), op.type
    outs = {v.name: v for v in main.outputs}
    assert outs["y"].type.dtype == F32 and outs["m"].type.dtype == F32
    assert outs["best"].type.dtype.name == "int32"
    producer = {op.outputs[0].name: op for op in ops}
    assert producer["y"].type == "cast" and producer["y"].input("x").name == "y_cast_fp16"
    assert producer["m"].input("x").type.dtype.name == "fp16"    # int -> fp16 cast, then back to fp32


def test_fp16_model_predicts_close_to_fp32():
    w = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    model = converters.convert(lambda x: jnp.tanh(x @ w) + 1, {"x": x}, compute_precision="float16")
    out = model.predict({"x": x})["output"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.tanh(x @ w) + 1, rtol=1e-2, atol=1e-2)


def test_fp16_pass_leaves_fp16_outputs_alone():
    x = Var("x", _t(3, dtype="fp16"))
    b = Builder(reserved=["x"])
    out = b.op("relu", _t(3, dtype="fp16"), x=x)
    fn = _function(b, [x], [out])
    cast_to_fp16(fn)
    assert [op.type for op in fn.block.operations] == ["relu"]
    assert fn.outputs[0] is out
