"""The passes: each ``pass(graph) -> rewrites``, pure IR rewrites that keep every result equal.

Rules every pass keeps: a Var that is some block's output keeps its identity (its name is an
output name); a constant input is never aliased to a consumer (consumers of weights and
constants see exactly the Vars they saw before); ops with nested blocks or side effects are
never removed.
"""
from __future__ import annotations

import numpy as np

from mljax.errors import OpError
from mljax.mil.ir import Operation, Var
from mljax.mil.types import DTYPES, TensorType
from mljax.ops._registry import HINTS
from mljax.ops.conv import folds_channel_scale, hwio_perm, is_depthwise_weight, lays_out_weight, reads_channel_first
from mljax.optimize._graph import Graph, seeded_components

__all__ = ["PASSES", "remove_noop_casts", "remove_identity_ops", "merge_transposes", "merge_reshapes",
           "merge_parallel_linears", "lstm_last_step", "fuse_attention", "bias_into_product",
           "mark_convs_after_costly_ops", "channels_last_regions", "dead_code", "COSTLY_OPS"]

# Ops that must run even when nothing reads their outputs.
_SIDE_EFFECTS = {"coreml_update_state", "write_state"}


def _tensor(var):
    return var.type if isinstance(var.type, TensorType) else None


def _static_shape(var):
    t = _tensor(var)
    return tuple(t.shape) if t is not None and t.is_static else None


def _alias(graph: Graph, op, new, protected) -> bool:
    """Let ``op``'s single output be ``new`` for every consumer; False when it must stay."""
    out = op.outputs[0]
    if len(op.outputs) != 1 or id(out) in protected or new.value is not None:
        return False
    graph.replace_uses(out, new)
    return True


def remove_noop_casts(graph: Graph) -> int:
    """``cast`` whose input and output compute in the same dtype (e.g. fp16 <-> fp32 in an fp16
    program computed in fp32: the input/output casts coremltools inserts)."""
    protected, n = graph.protected(), 0
    for block in graph.blocks():
        for op in block.operations:
            if op.type != "cast":
                continue
            if op.input("x") is None or len(op.outputs) != 1:
                continue                    # malformed: the lowering reports it
            x, out = op.input("x"), op.outputs[0]
            tx, to = _tensor(x), _tensor(out)
            if tx is None or to is None:
                continue
            if graph.compute_dtype(tx.dtype).name == graph.compute_dtype(to.dtype).name:
                n += _alias(graph, op, x, protected)
    return n


def remove_identity_ops(graph: Graph) -> int:
    """``identity``; ``reshape`` to the input's own static shape; ``transpose`` by the identity
    permutation."""
    protected, n = graph.protected(), 0
    static = graph.static
    for block in graph.blocks():
        for op in block.operations:
            x = op.input("x")
            if x is None or not op.outputs:
                continue
            if op.type == "identity":
                n += _alias(graph, op, x, protected)
            elif op.type == "reshape" and static:
                shape = _static_shape(x)
                if shape is not None and shape == _static_shape(op.outputs[0]):
                    n += _alias(graph, op, x, protected)
            elif op.type == "transpose":
                perm = op.input("perm")
                if perm is not None and perm.value is not None and \
                        list(np.asarray(perm.value).reshape(-1)) == list(range(np.size(perm.value))):
                    n += _alias(graph, op, x, protected)
    return n


def merge_transposes(graph: Graph) -> int:
    """``transpose(transpose(u, p1), p2)`` -> ``transpose(u, p1[p2])`` (removed when that is the
    identity); the inner transpose goes when nothing else reads it."""
    producers, protected, n = graph.producers(), graph.protected(), 0
    for block in graph.blocks():
        for op in block.operations:
            if op.type != "transpose":
                continue
            inner = producers.get(id(op.input("x")))
            p2 = op.input("perm")
            if inner is None or inner.type != "transpose" or p2 is None or p2.value is None:
                continue
            p1 = inner.input("perm")
            if p1 is None or p1.value is None or inner.input("x") is None or inner.input("x").value is not None:
                continue
            perm = np.asarray(p1.value).reshape(-1)[np.asarray(p2.value).reshape(-1)]
            if list(perm) == list(range(perm.size)) and _alias(graph, op, inner.input("x"), protected):
                n += 1
                continue
            op.inputs["x"] = (inner.input("x"),)
            op.inputs["perm"] = (graph.const(op.name + "_perm", perm),)
            n += 1
    return n


def merge_reshapes(graph: Graph) -> int:
    """``reshape(reshape(u))`` -> ``reshape(u)`` to the outer result's static shape."""
    if not graph.static:
        return 0
    producers, n = graph.producers(), 0
    for block in graph.blocks():
        for op in block.operations:
            if op.type != "reshape":
                continue
            inner = producers.get(id(op.input("x")))
            shape = _static_shape(op.outputs[0])
            if inner is None or inner.type != "reshape" or shape is None or inner.input("x") is None \
                    or inner.input("x").value is not None:
                continue
            op.inputs["x"] = (inner.input("x"),)
            op.inputs["shape"] = (graph.const(op.name + "_shape", np.array(shape)),)
            n += 1
    return n


def dead_code(graph: Graph) -> int:
    """Ops (not constants) none of whose outputs is read, repeated until none is left."""
    removed = 0
    while True:
        uses = graph.use_counts()
        n = 0
        for block in graph.blocks():
            keep = []
            for op in block.operations:
                dead = (op.type != "const" and not op.type.startswith("constexpr_") and not op.blocks
                        and op.type not in _SIDE_EFFECTS and not any(uses.get(id(v)) for v in op.outputs))
                n += dead
                if not dead:
                    keep.append(op)
            block.operations[:] = keep
        removed += n
        if not n:
            return removed


def merge_parallel_linears(graph: Graph) -> int:
    """``linear`` ops reading the same input with constant weights become one ``linear`` over
    the concatenated weights, then a ``split`` back into the original outputs (q/k/v
    projections, the gates of an unrolled recurrent cell): one larger matrix product instead
    of several small ones.  The weights stay separate (trainable) arguments: the concatenation
    is an op of the function's top block, computed once per call, outside any loop."""
    top, n = graph.fn.block, 0
    for block in list(graph.blocks()):
        groups: dict[int, list] = {}
        for op in block.operations:
            if op.type == "linear" and len(op.outputs) == 1 and _mergeable(op):
                groups.setdefault(id(op.input("x")), []).append(op)
        for ops in groups.values():
            ops = _compatible(ops)
            if len(ops) < 2:
                continue
            n += len(ops)
            _merge(graph, block, top, ops)
    return n


def _mergeable(op) -> bool:
    w, b = op.input("weight"), op.input("bias")
    t = _tensor(op.outputs[0])
    return (w is not None and isinstance(w.value, np.ndarray) and w.value.ndim == 2 and t is not None
            and t.rank is not None and t.rank >= 1 and (b is None or isinstance(b.value, np.ndarray)))


def _compatible(ops) -> list:
    """The largest subset sharing weight dtype, bias presence and output dtype/rank."""
    key = lambda op: (op.input("weight").value.dtype.str, op.input("bias") is None,  # noqa: E731
                      _tensor(op.outputs[0]).dtype.name, _tensor(op.outputs[0]).rank)
    by: dict = {}
    for op in ops:
        by.setdefault(key(op), []).append(op)
    return max(by.values(), key=len)


def _merge(graph: Graph, block, top, ops) -> None:
    first = ops[0]
    sizes = [op.input("weight").value.shape[0] for op in ops]
    out0 = _tensor(first.outputs[0])
    axis0 = graph.const(first.name + "_axis0", np.array(0))
    concats = []
    for key in ("weight", "bias"):
        if first.input(key) is None:
            continue
        parts = tuple(op.input(key) for op in ops)
        shape = (sum(sizes),) + tuple(parts[0].value.shape[1:])
        cat = Var(f"{first.name}_{key}__merged", TensorType(parts[0].type.dtype, shape))
        concats.append(Operation("concat", cat.name + "_op", {"values": parts, "axis": (axis0,)}, [cat]))
    y_type = TensorType(out0.dtype, None if out0.shape is None else tuple(out0.shape[:-1]) + (sum(sizes),))
    y = Var(f"{first.name}__merged", y_type)
    inputs = {"x": first.inputs["x"], "weight": (concats[0].outputs[0],)}
    if len(concats) == 2:
        inputs["bias"] = (concats[1].outputs[0],)
    linear = Operation("linear", y.name + "_op", inputs, [y])
    split = Operation("split", y.name + "_split", {
        "x": (y,), "split_sizes": (graph.const(first.name + "_sizes", np.array(sizes)),),
        "axis": (graph.const(first.name + "_axis", np.array(-1)),)}, [op.outputs[0] for op in ops])
    at = block.operations.index(first)
    removed = {id(op) for op in ops}
    block.operations[:] = [op for op in block.operations[:at] if id(op) not in removed] + [linear, split] + \
        [op for op in block.operations[at:] if id(op) not in removed]
    top.operations[0:0] = concats


def loop_weights_in_out(graph: Graph) -> int:
    """A ``linear`` inside a loop body whose weight ``[D_out, D_in]`` comes from the function's
    top block (a constant, or merged constants) reads it laid out ``[D_in, D_out]``: a
    ``transpose`` in the top block (the lowering's weight prologue: once per weight values, still
    a function of the trainable weight) and the hint ``weight_in_out``
    (:func:`mljax.ops.linear.linear`).  XLA:CPU's library packs a product's right operand on
    every call, and ``x @ W^T`` transposed the weight in that packing on every step.  A GRU's
    32-step loop alone (two products a step, 64 -> 384 and 128 -> 384): 0.76x the time at 32
    rows, 0.50x at 8, 0.91x at 1 (Intel Xeon, one thread).  Returns the number of linears
    rewritten."""
    top = graph.fn.block
    defined = {id(v) for op in top.operations for v in op.outputs}
    made: dict[int, Var] = {}
    n = 0
    for block in list(graph.blocks()):
        if block is top:
            continue
        for op in block.operations:
            w = op.input("weight")
            shape = _static_shape(w) if op.type == "linear" and w is not None else None
            if (shape is None or len(shape) != 2 or op.attributes.get(HINTS, {}).get("bias_in_product")
                    or not (isinstance(w.value, np.ndarray) or id(w) in defined)):
                continue
            if id(w) not in made:
                made[id(w)] = _top_transpose(graph, w, [w], shape)
            op.inputs = {**op.inputs, "weight": (made[id(w)],)}
            op.attributes[HINTS] = {**op.attributes.get(HINTS, {}), "weight_in_out": True}
            n += 1
    return n


def _top_transpose(graph: Graph, x: Var, reads: list, shape: tuple) -> Var:
    """``transpose(x)`` of a 2-D ``x`` (``shape``) as an op of the top block, placed after the
    producers of ``reads`` there (the first op for constants): the lowering's weight prologue."""
    top = graph.fn.block
    xt = Var(f"{x.name}__in_out", TensorType(x.type.dtype, (shape[1], shape[0])))
    transpose = Operation("transpose", xt.name + "_op", {
        "x": (x,), "perm": (graph.const(x.name + "_perm", np.array([1, 0])),)}, [xt])
    at = max((i + 1 for i, o in enumerate(top.operations) if any(v is r for v in o.outputs for r in reads)),
             default=0)
    top.operations.insert(at, transpose)
    return xt


def lstm_weights_in_out(graph: Graph) -> int:
    """An ``lstm`` whose weights come from the function's top block (constants) gets
    ``[weight_ih | weight_hh]^T`` (``[I + H, 4H]``) laid out by a ``concat`` and a ``transpose`` in
    the top block (the weight prologue: once per weight values, still a function of the trainable
    weights) and runs as the internal op ``mljax.lstm``, which a recurrence of 2-15 rows multiplies
    ``[x_t, h]`` by (:data:`mljax.ops.recurrent._FEATURE_MAJOR_ROWS`): otherwise it lays the weights
    out on every call (one thread, 32 steps of 64 -> 128, Intel Xeon: 0.72x the time at 2 rows,
    0.84x at 4, 0.88x at 8).  Bidirectional lstms get the backward weights' layout too.  Returns
    the number of lstms rewritten."""
    top = graph.fn.block
    defined = {id(v) for op in top.operations for v in op.outputs}
    n = 0
    for block in list(graph.blocks()):
        for op in block.operations:
            if op.type != "lstm":
                continue
            pairs = [("weight_ih", "weight_hh", "weight_in_out")]
            if op.input("weight_ih_back") is not None:
                pairs.append(("weight_ih_back", "weight_hh_back", "weight_in_out_back"))
            laid = {}
            for ih_key, hh_key, key in pairs:
                w_ih, w_hh = op.input(ih_key), op.input(hh_key)
                shapes = [_static_shape(w) if w is not None else None for w in (w_ih, w_hh)]
                if (any(sh is None or len(sh) != 2 for sh in shapes) or shapes[0][0] != shapes[1][0]
                        or w_ih.type.dtype.name != w_hh.type.dtype.name
                        or not all(isinstance(w.value, np.ndarray) or id(w) in defined for w in (w_ih, w_hh))):
                    break
                rows, cols = shapes[0][0], shapes[0][1] + shapes[1][1]
                cat = Var(f"{op.name}_{key}__cat", TensorType(w_ih.type.dtype, (rows, cols)))
                concat = Operation("concat", cat.name + "_op", {
                    "values": (w_ih, w_hh), "axis": (graph.const(op.name + "_axis1", np.array(1)),)}, [cat])
                at = max((i + 1 for i, o in enumerate(top.operations) if any(v is w_ih or v is w_hh for v in o.outputs)),
                         default=0)
                top.operations.insert(at, concat)
                laid[key] = (_top_transpose(graph, cat, [cat], (rows, cols)),)
            else:
                op.type = "mljax.lstm"
                op.inputs = {**op.inputs, **laid}
                n += 1
    return n


def lstm_last_step(graph: Graph) -> int:
    """A slice of a forward ``lstm``'s output sequence that takes its last step (``out[:, -1]``
    after a batch-first transpose: how torch code reads an LSTM's result) reads the ``lstm``'s
    final hidden state instead, the same values.  With the sequence unread, XLA drops it from the
    loop (a ``dynamic_update_slice`` per step, and the sequence's transposes).  Returns the number
    of slices rewritten."""
    producers, protected, n = graph.producers(), graph.protected(), 0
    for block in list(graph.blocks()):
        for op in block.operations:
            if op.type == "slice_by_index" and len(op.outputs) == 1:
                lstm = _last_step_of(op, producers)
                if lstm is not None and _alias(graph, op, lstm.outputs[1], protected):
                    n += 1
    return n


def _last_step_of(op, producers):
    """The forward ``lstm`` whose last output step ``op`` (a ``slice_by_index``) takes, or None."""
    from mljax.ops.tensor_transformation import _index_slices
    keys = ("begin", "end", "stride", "begin_mask", "end_mask", "squeeze_mask")
    params = {k: op.input(k) for k in keys}
    if any(v is not None and v.value is None for v in params.values()):
        return None
    x = op.input("x")
    src, time_axis, seq = producers.get(id(x)), 0, x
    if src is not None and src.type == "transpose":
        perm = src.input("perm")
        if perm is None or perm.value is None or [int(p) for p in np.asarray(perm.value)] != [1, 0, 2]:
            return None
        src, time_axis, seq = producers.get(id(src.input("x"))), 1, src.input("x")
    direction, sequence = (src.input(k) if src is not None else None for k in ("direction", "output_sequence"))
    if (src is None or src.type != "lstm" or len(src.outputs) < 2 or seq is not src.outputs[0]
            or (direction is not None and str(direction.value) != "forward")
            or sequence is None or sequence.value is None or not bool(np.asarray(sequence.value))):
        return None
    shape = _static_shape(x)
    if shape is None or len(shape) != 3 or _static_shape(src.outputs[1]) is None:
        return None
    try:
        slices, squeezed = _index_slices(shape, *(None if params[k] is None else params[k].value for k in keys),
                                         "slice_by_index")
    except OpError:         # malformed slices are the op's to report when it runs
        return None
    picks = [list(range(d))[s] for d, s in zip(shape, slices)]
    if (picks[time_axis] != [shape[time_axis] - 1] or list(squeezed) != [time_axis]
            or any(p != list(range(d)) for a, (p, d) in enumerate(zip(picks, shape)) if a != time_axis)):
        return None
    if _static_shape(op.outputs[0]) != _static_shape(src.outputs[1]):
        return None
    return src


def fuse_attention(graph: Graph) -> int:
    """Attention as one op: ``matmul(softmax(matmul(q, k) * c + mask, axis=-1), v)`` (the scale
    ``c`` a scalar constant by ``mul`` or ``real_div``, both it and the mask optional; MIL's
    transpose flags on both products) becomes the internal op ``mljax.attention``
    (:func:`mljax.ops.transformers.attention`).  The chain is what coremltools writes for a
    ``torch`` attention before iOS18's ``scaled_dot_product_attention``.  Only where every
    intermediate (scores, scaled and masked scores, weights) is read by the next op alone and is
    no block output.  Returns the number of attentions fused."""
    uses, protected, producers = graph.use_counts(), graph.protected(), graph.producers()
    fused = 0
    for block in list(graph.blocks()):
        readers: dict[int, list] = {}
        for op in block.operations:
            for bound in op.inputs.values():
                for v in bound:
                    readers.setdefault(id(v), []).append(op)
        replace, drop = {}, set()
        for op in block.operations:
            found = _attention_chain(op, readers, uses, protected, producers) if op.type == "softmax" else None
            if found is None or any(id(o) in drop for o in found[0]):
                continue
            chain = found[0]
            new = _attention_op(graph, chain[-1], *found[1:])
            replace[id(chain[-1])] = new
            drop.update(id(o) for o in chain[:-1])
            fused += 1
        if replace:
            block.operations[:] = [replace.get(id(op), op) for op in block.operations if id(op) not in drop]
    return fused


def _single_use(var, uses, protected) -> bool:
    return uses.get(id(var), 0) == 1 and id(var) not in protected


def _const_bool(op, key):
    v = op.input(key)
    if v is None:
        return False
    return None if v.value is None else bool(np.asarray(v.value))


def _float_tensor(var):
    t = _tensor(var)
    return t is not None and t.rank is not None and t.rank >= 2 and t.dtype.name in ("fp16", "fp32")


def _attention_chain(softmax, readers, uses, protected, producers):
    """``(ops of the chain, q, k, v, mask, transpose flags, scale)`` of the attention whose softmax
    is ``softmax``, or None (see :func:`fuse_attention`)."""
    w = softmax.outputs[0]
    axis, x = softmax.input("axis"), softmax.input("x")
    rank = _tensor(w).rank if _tensor(w) is not None else None
    if (rank is None or rank < 2 or axis is None or axis.value is None or int(axis.value) % rank != rank - 1
            or not _single_use(w, uses, protected) or len(readers.get(id(w), ())) != 1):
        return None
    pv = readers[id(w)][0]
    if pv.type != "matmul" or pv.input("x") is not w or pv.input("y") is w or _const_bool(pv, "transpose_x") is not False:
        return None
    t_v = _const_bool(pv, "transpose_y")
    chain, mask, scale = [softmax, pv], None, 1.0
    cur = x
    prod = producers.get(id(cur))
    if prod is not None and prod.type == "add" and _single_use(cur, uses, protected):
        a, b = prod.input("x"), prod.input("y")
        pa, pb = producers.get(id(a)), producers.get(id(b))
        scores_side = [v for v, p in ((a, pa), (b, pb)) if p is not None and p.type in ("mul", "real_div", "matmul")]
        if len(scores_side) != 1:
            return None
        cur = scores_side[0]
        mask = b if cur is a else a
        chain.insert(0, prod)
        prod = producers.get(id(cur))
    if prod is not None and prod.type in ("mul", "real_div") and _single_use(cur, uses, protected):
        a, b = prod.input("x"), prod.input("y")
        const = b if b.value is not None else (a if a.value is not None and prod.type == "mul" else None)
        if const is None or np.size(const.value) != 1 or not np.isfinite(np.asarray(const.value, np.float64)).all():
            return None
        c = float(np.asarray(const.value, np.float64).reshape(()))
        if prod.type == "real_div" and c == 0.0:
            return None
        scale = c if prod.type == "mul" else 1.0 / c
        cur = a if const is b else b
        chain.insert(0, prod)
        prod = producers.get(id(cur))
    if prod is None or prod.type != "matmul" or not _single_use(cur, uses, protected):
        return None
    t_x, t_y = _const_bool(prod, "transpose_x"), _const_bool(prod, "transpose_y")
    q, k, v = prod.input("x"), prod.input("y"), pv.input("y")
    if None in (t_x, t_y, t_v) or not all(_float_tensor(u) for u in (q, k, v, cur, w)):
        return None
    if len({_tensor(u).dtype.name for u in (q, k, v, cur, w)}) != 1:
        return None
    if mask is not None and (_tensor(mask) is None or _tensor(mask).dtype.name not in ("fp16", "fp32")):
        return None
    chain.insert(0, prod)
    if any(op.blocks for op in chain):
        return None
    return chain, q, k, v, mask, (t_x, t_y, t_v), scale


def _attention_op(graph: Graph, pv, q, k, v, mask, flags, scale) -> Operation:
    """The ``mljax.attention`` op computing ``pv``'s output (the chain's last product)."""
    out = pv.outputs[0]
    inputs = {"x": (q,), "y": (k,), "value": (v,)}
    if mask is not None:
        inputs["mask"] = (mask,)
    for tag, flag in zip(("transpose_x", "transpose_y", "transpose_value"), flags):
        inputs[tag] = (graph.const(f"{out.name}_{tag}", np.array(flag), "bool"),)
    inputs["scale"] = (graph.const(f"{out.name}_scale", np.array(scale), "fp32"),)
    return Operation("mljax.attention", pv.name + "__attention", inputs, [out])


def bias_into_product(graph: Graph) -> int:
    """A ``linear`` whose result is a function output and has at least twice as many features as
    its input (a language model's vocabulary projection, a classifier's wide head) takes its
    constant bias into the product: the weight ``[D_out, D_in]`` and bias become one ``[D_out,
    D_in + 1]`` weight (a ``reshape`` and a ``concat`` of constants: the lowering's weight prologue,
    once per weight values) and the op gets the hint ``bias_in_product`` (``x`` gets a column of
    ones, :func:`mljax.ops.linear.linear`).  XLA:CPU adds a bias after its library's product as a
    pass over the whole output, which no later op absorbs at a function output (Llama-style decoder
    at batch 32: 2-2.8 ms a call over its 32 MB of logits; the product with one more input
    feature: 0.94x the product and the pass, alone).  Returns the number of linears rewritten."""
    block, protected = graph.fn.block, graph.protected()
    rewritten, n = [], 0
    for op in block.operations:
        w, b = op.input("weight"), op.input("bias")
        shape_w = _static_shape(w) if w is not None else None
        if (op.type != "linear" or len(op.outputs) != 1 or id(op.outputs[0]) not in protected or b is None
                or not isinstance(w.value, np.ndarray) or not isinstance(b.value, np.ndarray)
                or shape_w is None or len(shape_w) != 2 or tuple(b.value.shape) != shape_w[:1]
                or shape_w[0] < 2 * shape_w[1] or w.type.dtype.name != b.type.dtype.name):
            rewritten.append(op)
            continue
        column = Var(f"{op.name}__bias_column", TensorType(b.type.dtype, (shape_w[0], 1)))
        merged = Var(f"{op.name}__weight_bias", TensorType(w.type.dtype, (shape_w[0], shape_w[1] + 1)))
        rewritten += [
            Operation("reshape", column.name + "_op", {
                "x": (b,), "shape": (graph.const(op.name + "_column", np.array([shape_w[0], 1])),)}, [column]),
            Operation("concat", merged.name + "_op", {
                "values": (w, column), "axis": (graph.const(op.name + "_axis", np.array(1)),)}, [merged])]
        op.inputs = {"x": op.inputs["x"], "weight": (merged,)}
        op.attributes[HINTS] = {**op.attributes.get(HINTS, {}), "bias_in_product": True}
        rewritten.append(op)
        n += 1
    block.operations[:] = rewritten
    return n


# Elementwise ops with a transcendental function per element (XLA:CPU vectorizes them only in
# simple loops).
COSTLY_OPS = frozenset({"sigmoid", "silu", "tanh", "gelu", "elu", "softplus", "softplus_parametric",
                        "scaled_tanh", "exp", "exp2", "erf", "log", "sin", "cos", "pow"})


def _is_costly(op, producers) -> bool:
    """A costly op, or ``mul`` of a tensor by a costly op of the same shape (``x * sigmoid(x)``)."""
    if op.type in COSTLY_OPS:
        return True
    if op.type != "mul" or not op.outputs:
        return False
    shape = _static_shape(op.outputs[0])
    for key in ("x", "y"):
        v = op.input(key)
        p = producers.get(id(v)) if v is not None else None
        if p is not None and p.type in COSTLY_OPS and shape is not None and _static_shape(v) == shape:
            return True
    return False


def mark_convs_after_costly_ops(graph: Graph) -> int:
    """A hint, no rewrite: ``conv`` ops whose input comes from a costly activation (SiLU, sigmoid,
    GELU...) get the hint ``after_costly_op`` (``OpContext.hints``, read by :func:`mljax.ops.conv.conv`;
    never saved: the optimized copy is only lowered).  XLA fuses the activation into the
    convolution's zero padding, and the padding then takes the form that keeps that loop
    vectorized (EfficientNet-B0 at batch 32: 0.90-0.93x the predict time)."""
    producers, n = graph.producers(), 0
    for block in graph.blocks():
        for op in block.operations:
            x = op.input("x") if op.type == "conv" else None
            p = producers.get(id(x)) if x is not None else None
            if p is not None and _is_costly(p, producers):
                op.attributes[HINTS] = {**op.attributes.get(HINTS, {}), "after_costly_op": True}
                n += 1
    return n


# --- channel-last regions ------------------------------------------------------------------
# Ops that compute the same thing whatever the order of their rank-4 operands' axes (every
# other input a scalar constant).
_LAYOUT_FREE_UNARY = frozenset({
    "relu", "relu6", "sigmoid", "sigmoid_hard", "silu", "tanh", "thresholded_relu", "clip", "leaky_relu",
    "elu", "softplus", "scaled_tanh", "linear_activation", "erf", "exp", "abs", "sqrt", "square", "gelu",
    "cast", "identity"})
_LAYOUT_FREE_BINARY = frozenset({"add", "sub", "mul", "real_div", "maximum", "minimum"})
_REDUCTIONS = frozenset({"reduce_mean", "reduce_sum", "reduce_max", "reduce_min"})
_POOLS = frozenset({"max_pool", "avg_pool"})      # run channel-last by the hint ``channels_last``
_TO_LAST, _TO_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)


def _rank4(var) -> bool:
    shape = _static_shape(var)
    return var.value is None and shape is not None and len(shape) == 4


def _scalar_const(var) -> bool:
    return var.value is not None and np.size(var.value) == 1


def _layout_free(op) -> bool:
    """``op`` computes alike on channel-last operands, given remapped axes (see ``_remap``)."""
    if len(op.outputs) != 1 or not _rank4(op.outputs[0]) or op.blocks:
        return False
    if op.type == "conv":
        x, w = op.input("x"), op.input("weight")
        return x is not None and _rank4(x) and w is not None and len(_static_shape(w) or ()) == 4
    if op.type in _LAYOUT_FREE_UNARY:
        return op.input("x") is not None and _rank4(op.input("x")) and all(
            all(_scalar_const(v) or isinstance(v.value, str) for v in bound) for k, bound in op.inputs.items() if k != "x")
    if op.type in _LAYOUT_FREE_BINARY:
        vs = [op.input("x"), op.input("y")]
        return all(v is not None and (_rank4(v) or _scalar_const(v)) for v in vs)
    if op.type in _REDUCTIONS:
        axes, keep = op.input("axes"), op.input("keep_dims")
        return (_rank4(op.input("x")) and axes is not None and axes.value is not None
                and keep is not None and keep.value is not None and bool(keep.value))
    if op.type in _POOLS:
        return _rank4(op.input("x")) and all(
            v.value is not None for k, bound in op.inputs.items() if k != "x" for v in bound)
    if op.type == "concat":
        inter, axis = op.input("interleave"), op.input("axis")
        return (all(_rank4(v) for v in op.inputs.get("values", ())) and axis is not None
                and axis.value is not None and (inter is None or not bool(inter.value)))
    return False


def _seeds(op) -> bool:
    """A conv that seeds a channel-last region: depthwise, or dense with a spatial kernel (3x3
    Winograd and XLA's convolution run channel-last natively, and a region's values then cross
    no transposes between its convs; a network of 1x1 convs alone stays channel-first)."""
    if op.type != "conv":
        return False
    shape = _static_shape(op.input("weight"))
    return is_depthwise_weight(shape, _groups(op)) or any(k != 1 for k in shape[2:])


def _read_once(op, readers, by_id) -> bool:
    """``op``'s result is read by one pool whose windows do not overlap (kernel = strides), directly
    or through one elementwise activation: XLA fuses the computation into that pool's loop, where
    each value is read once (a first layer then runs as one expression, see
    :func:`mljax.ops.conv._direct_last`)."""
    for _ in range(2):
        users = readers.get(id(op.outputs[0]), ())
        if len(users) != 1 or next(iter(users)) not in by_id:
            return False
        op = by_id[next(iter(users))]
        if op.type in _POOLS:
            k, st = op.input("kernel_sizes"), op.input("strides")
            return (k is not None and st is not None and k.value is not None and st.value is not None
                    and np.array_equal(np.asarray(k.value).reshape(-1), np.asarray(st.value).reshape(-1)))
        if op.type not in _LAYOUT_FREE_UNARY:
            return False
    return False


def _groups(op) -> int:
    groups = op.input("groups")
    return int(groups.value) if groups is not None and groups.value is not None else 1


def channels_last_regions(graph: Graph) -> int:
    """Runs convolutional networks channel-last: the role of ONNX Runtime's NCHWc layout transformer.

    A depthwise convolution in MIL's channel-first layout slides its taps along the minor axis,
    a few pixels wide in a network's late layers: XLA:CPU vectorizes such loops poorly.
    Channel-last, every tap is a contiguous channel vector and a 1x1 convolution one GEMM; dense
    layers (Winograd, XLA's convolution) run channel-last without the transposes around each
    one.  A *region* is a connected set of ops that compute alike in either layout (conv, max
    and average pools, elementwise activations and arithmetic on rank-4 tensors and scalars,
    reductions keeping their axes, concat), holding at least one depthwise or dense spatial
    convolution (:func:`_seeds`); its values are held ``[N, H, W, C]``, one ``transpose``
    converts each value that enters or leaves it, reduction axes and concat axes are
    renumbered, and its convs and pools get the hint ``channels_last``.  Vars read outside the
    region keep their identity (and channel-first layout).  Returns the number of ops moved."""
    if not graph.static:     # a flexible input: declared shapes (the global pool's) are just one case
        return 0
    block = graph.fn.block
    ops = [op for op in block.operations if op.type != "const"]
    free = {id(op) for op in ops if _layout_free(op)}
    producers = graph.producers()
    readers: dict[int, set] = {}
    for b in graph.blocks():
        for op in b.operations:
            for bound in op.inputs.values():
                for v in bound:
                    readers.setdefault(id(v), set()).add(id(op))
    edges = []
    for op in ops:
        for v in (v for bound in op.inputs.values() for v in bound) if id(op) in free else ():
            p = producers.get(id(v))
            if p is not None and id(p) in free:
                edges.append((id(p), id(op)))
    region = seeded_components(free, edges, {id(op) for op in ops if id(op) in free and _seeds(op)})
    if not region:
        return 0
    protected = graph.protected()
    by_id = {id(op): op for op in ops}
    moved: dict[int, Var] = {}        # id(channel-first Var) -> its channel-last twin
    entering: dict[int, Var] = {}
    rewritten = []
    for op in block.operations:
        if id(op) not in region:
            rewritten.append(op)
            continue
        before = []
        # a region's first layer reads its channel-first input as it is
        first_in = (op.type == "conv" and id(op.input("x")) not in moved
                    and reads_channel_first(_static_shape(op.input("weight")), _groups(op)))
        for key, bound in op.inputs.items():
            new = []
            for v in bound:
                if first_in and key == "x":
                    pass
                elif id(v) in moved:
                    v = moved[id(v)]
                elif _rank4(v):
                    if id(v) not in entering:
                        entering[id(v)] = _transposed(graph, v, _TO_LAST, before)
                    v = entering[id(v)]
                new.append(v)
            op.inputs[key] = tuple(new)
        # a reduction read only outside (a network's global pool before its classifier)
        pool = op.type in ("reduce_mean", "reduce_sum") and not any(
            r in region for r in readers.get(id(op.outputs[0]), ()))
        _remap(graph, op, before, first_in, pool)
        if first_in and _read_once(op, readers, by_id):
            op.attributes[HINTS]["read_once"] = True
        after = []
        for i, v in enumerate(op.outputs):
            twin = Var(f"{v.name}__last", TensorType(v.type.dtype, tuple(v.type.shape[j] for j in _TO_LAST)))
            op.outputs[i] = twin
            moved[id(v)] = twin
            if id(v) in protected or any(r not in region for r in readers.get(id(v), ())):
                after.append(Operation("transpose", v.name + "__first", {
                    "x": (twin,), "perm": (graph.const(v.name + "_perm", np.array(_TO_FIRST)),)}, [v]))
        rewritten += before + [op] + after
    block.operations[:] = rewritten
    return len(region)


def _transposed(graph: Graph, v: Var, perm, out: list) -> Var:
    t = Var(f"{v.name}__" + "".join(map(str, perm)), TensorType(v.type.dtype, tuple(v.type.shape[j] for j in perm)))
    out.append(Operation("transpose", t.name + "_op", {
        "x": (v,), "perm": (graph.const(v.name + "_perm", np.array(perm)),)}, [t]))
    return t


def _axes(op) -> list:
    return [int(a) % 4 for a in np.asarray(op.input("axes").value).reshape(-1)]


def _remap(graph: Graph, op, before: list, first_in=False, pool=False) -> None:
    """Axis inputs renumbered for channel-last operands; convs get the hint, a depthwise, 1x1 or
    first-layer (``first_in``) conv's constant weight a ``transpose`` to HWIO ``[*K, C_in/groups, C_out]`` (the lowering's weight prologue
    computes it once per weight values, see :mod:`mljax.lower`), a global pool (``pool``: read
    only outside the region) the hint ``pool_by_product``."""
    new_axis = {a: _TO_LAST.index(a) for a in range(4)}
    if op.type in _POOLS:
        op.attributes[HINTS] = {**op.attributes.get(HINTS, {}), "channels_last": True}
    if op.type == "conv":
        hints = {**op.attributes.get(HINTS, {}), "channels_last": True}
        w = op.input("weight")
        if (first_in or lays_out_weight(_static_shape(w), _groups(op))) and w.value is not None:
            op.inputs["weight"] = (_transposed(graph, w, hwio_perm(4), before),)
            hints["weight_hwio"] = True
        if first_in:
            hints["first_in"] = True
        op.attributes[HINTS] = hints
    elif pool and sorted(new_axis[a] for a in _axes(op)) == [1, 2]:
        # a global pool read outside the region: as a product (mljax.ops.reduction.spatial_pool_by_product)
        op.attributes[HINTS] = {**op.attributes.get(HINTS, {}), "pool_by_product": True}
    if op.type in _REDUCTIONS:
        axes = _axes(op)
        op.inputs["axes"] = (graph.const(op.name + "_axes", np.array([new_axis[a] for a in axes])),)
    elif op.type == "concat":
        op.inputs["axis"] = (graph.const(op.name + "_axis", np.array(new_axis[int(op.input("axis").value) % 4])),)


def fold_channel_scales(graph: Graph) -> int:
    """A channel-last 1x1 conv reading ``x * s``, ``s`` one scale per image and channel (a
    squeeze-and-excitation gate), becomes one batched product of ``x`` by the per-image weights
    ``s * W``: the multiply no longer makes a pass over ``x``, the largest tensor of the block.
    Where :func:`mljax.ops.conv.folds_channel_scale` (an image has at least ``2 * C_in``
    positions), and only where the block computes in fp32 (the fold changes where a product
    rounds).  The NeuralNetwork translator does the same (``LayerContext.scaled_by``).  Returns
    the number of convs folded."""
    block = graph.fn.block
    uses, protected, producers = graph.use_counts(), graph.protected(), graph.producers()
    fp32 = graph.compute_dtype(DTYPES["fp32"]).name
    folded, drop, rewritten = 0, set(), []
    for op in block.operations:
        new = _fold_scale(graph, op, producers, uses, protected, fp32)
        if new is None:
            rewritten.append(op)
            continue
        drop.add(id(producers[id(op.input("x"))]))
        rewritten += new
        folded += 1
    block.operations[:] = [op for op in rewritten if id(op) not in drop]
    return folded


def _fold_scale(graph: Graph, op, producers, uses, protected, fp32):
    hints = op.attributes.get(HINTS, {})
    if op.type != "conv" or not hints.get("weight_hwio") or hints.get("first_in") or _groups(op) != 1:
        return None
    w, x, bias = op.input("weight"), op.input("x"), op.input("bias")
    strides, pad = op.input("strides"), op.input("pad")
    shape_w = _static_shape(w)
    if (shape_w is None or tuple(shape_w[:2]) != (1, 1)
            or (strides is not None and (strides.value is None or np.any(np.asarray(strides.value) != 1)))
            or (pad is not None and (pad.value is None or np.any(np.asarray(pad.value) != 0)))
            or (bias is not None and bias.value is None)):
        return None
    mul = producers.get(id(x))
    if mul is None or mul.type != "mul" or uses.get(id(x), 0) != 1 or id(x) in protected or mul.blocks:
        return None
    a, b = mul.input("x"), mul.input("y")
    shapes = [_static_shape(v) for v in (a, b)]
    if any(v is None or v.value is not None or s is None or len(s) != 4 for v, s in zip((a, b), shapes)):
        return None
    if shapes[0][1:3] == (1, 1) and shapes[1][1:3] != (1, 1):
        a, b = b, a
        shapes = shapes[::-1]
    (n, h, wd, c), sshape = shapes
    if not folds_channel_scale(shapes[0], sshape) or graph.compute_dtype(a.type.dtype).name != fp32:
        return None
    k, dt, name = shape_w[3], a.type.dtype, op.name
    out = op.outputs[0]

    def var(tag, shape):
        return Var(f"{name}__fold_{tag}", TensorType(dt, tuple(shape)))

    def reshape(tag, v, shape, r=None):
        r = r if r is not None else var(tag, shape)
        return r, Operation("reshape", r.name + "_op", {
            "x": (v,), "shape": (graph.const(r.name + "_shape", np.array(shape)),)}, [r])

    s3, op_s = reshape("scale", b, (n, c, 1))
    w2, op_w = reshape("weight", w, (c, k))
    wn = var("weights", (n, c, k))
    op_wn = Operation("mul", wn.name + "_op", {"x": (s3,), "y": (w2,)}, [wn])
    xr, op_x = reshape("x", a, (n, h * wd, c))
    y = var("y", (n, h * wd, k))
    op_y = Operation("matmul", y.name + "_op", {"x": (xr,), "y": (wn,)}, [y])
    y4, op_y4 = reshape("y4", y, (n, h, wd, k), out if bias is None else None)
    ops = [op_s, op_w, op_wn, op_x, op_y, op_y4]
    return ops if bias is None else ops + [Operation("add", name + "__fold_op", {"x": (y4,), "y": (bias,)}, [out])]


PASSES = (remove_noop_casts, remove_identity_ops, merge_transposes, merge_reshapes, merge_parallel_linears,
          loop_weights_in_out, lstm_last_step, lstm_weights_in_out, fuse_attention, bias_into_product,
          dead_code, mark_convs_after_costly_ops, channels_last_regions, fold_channel_scales)
