"""Batch schedules: how a list predict's batch goes through a program.

A list predict runs the per-sample program vmapped over the batch: every op then processes the
whole batch before the next one starts.  Where the batch's activations are large (the first
stages of a CNN, a transformer's FFN and attention scores), each op streams them through
memory; ONNX Runtime does the same, and is limited the same way.  A *chunk plan* runs the
program's activation-heavy prefix over chunks of a few samples instead (``lax.map`` over
chunks, each chunk vmapped), so an op's output is still in the core's caches when the next op
reads it, then the rest of the program over the whole batch, where the activations are small
and the weights large (a chunk loop there would stream the weights once per chunk).

Where the middle of the network still overflows a core's cache at the whole batch (a mobile CNN's
16x16 and 8x8 stages), a *further span* runs it in larger chunks before the rest
(:data:`SPAN_HEAVY_BYTES`).

The plan is decided at trace time from static shapes (:func:`chunk_plan`); it changes no
value (each sample's ops are the same ops).  Measured on one thread against ONNX Runtime
(bench/real.py, in-process interleaved rounds, AMD EPYC; docs/performance.md): batch 32
EfficientNet-B0 1.19-1.25x ONNX Runtime against 1.34-1.42x without, BERT 0.88-0.90x against
0.95-1.02x, the zoo's depthwise CNN 0.89x against 1.17x; MobileNetV3-Small and the Llama-style
decoder unchanged within noise (1.38-1.44x against 1.43-1.44x, 1.04-1.07x against 1.02-1.08x).

A plan also shrinks the executable's temporaries, since the heavy activations exist for one
chunk at a time: EfficientNet-B0 at batch 32 99 MiB -> 28 MiB, BERT 40 -> 22 MiB (XLA's buffer
assignment).  So it helps most where freed memory goes back to the kernel after each call
(glibc's default, without :func:`mljax.cpu.retain_freed_memory`), and every call page-faults its
temporaries in again: EfficientNet-B0 1.05x ONNX Runtime against 1.69x, BERT 0.83x against
1.08x, ResNet-18 1.50x against 1.66x.

A span holding a pool reads each chunk from its loop's carry, sliced out by the iteration before
(:func:`prefetched_map`): with the chunk sliced in place XLA fused the slice into the first
layer's expression, and with the pool's strided windows on top that fusion ran as scalar code
(the zoo's cnn at batch 32: 2.3x ONNX Runtime against 1.12-1.15x; its stem, ReLU and 2x2 pool
alone 19.2 ms against 3.8).  Elsewhere the slice in place is cheaper than the copy
(MobileNetV3-Small at batch 32 1.16x against 1.26x with the copy).  Networks of dense spatial
convolutions get plans like any other, also where freed memory is retained (Intel Xeon, batch
32, in-process ratios to ONNX Runtime, two processes: the zoo's cnn 1.13-1.14x against
1.20-1.22x without a plan, ResNet-18 0.81x against 0.85x; 16 samples 1.17x against 1.16x, 0.91x
against 0.94x); their im2col and Winograd paths run each chunk in cache-sized chunks of their
own (:mod:`mljax.ops.conv`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import functools
from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["Step", "ChunkPlan", "chunk_plan", "run_chunked", "batch_size", "one_sample", "nbytes", "chunked_backend",
           "HEAVY_BYTES", "CHUNK_BYTES", "LIGHT_PREFIX_BYTES", "LIGHT_CHUNK_SHARE", "SPAN_HEAVY_BYTES",
           "SPAN_CHUNK_BYTES", "SPAN_WEIGHT_BYTES", "MERGED_SPANS"]

# An op is activation-heavy when its outputs for the whole batch take at least this many bytes:
# more than a core's share of the caches (the machines measured: 1-2 MiB L2 per core, 32 MiB of
# L3 shared).  Batch 32 of EfficientNet-B0 at 128x128: its 32x32 stage, not its 16x16 one.
HEAVY_BYTES = 8 << 20
# A chunk's largest activation at most this many bytes: the chunk size is the largest divisor of
# the batch that keeps it so.  4 MiB was worse for the Llama-style decoder (1.10x against
# 1.05x: its 1 MiB logits per sample made chunks of 4); 8 MiB chunks BERT by 16 (0.90x), its
# best 8 (0.88x).
CHUNK_BYTES = 8 << 20
# A prefix whose weights take at most this many bytes (a CNN's stem and first stages: 0.01-0.1 MB;
# a transformer's layers: 16-21 MB) rereads them per chunk at no cost, and its chunks' largest
# activation is held to a quarter of CHUNK_BYTES (LIGHT_CHUNK_SHARE).  A half, on an AMD EPYC:
# EfficientNet-B0 at batch 32 1.14x ONNX Runtime in chunks of 2 against 1.18-1.22x in chunks of 4,
# batch 8 unchanged, MobileNetV3-Small within noise (1.21-1.31x in chunks of 8 against 1.26-1.32x
# in chunks of 16).  A quarter against a half, on an Intel Xeon with 512-bit list predicts (three
# processes, in-process ratios to ONNX Runtime): MobileNetV3-Small at batch 32 0.95-0.98x the time
# (chunks of 4 against 8), EfficientNet-B0 0.96-0.98x (1 against 2), the zoo's depthwise CNN 0.92x,
# batch 8 0.97-1.00x.  The transformers keep CHUNK_BYTES (the Llama-style decoder 1.10x in chunks
# of 8 against 1.04x in chunks of 16).
LIGHT_PREFIX_BYTES = 1 << 20
LIGHT_CHUNK_SHARE = 4
# A further span after the first (ChunkPlan.next): where ops after it still write at least
# SPAN_HEAVY_BYTES for the batch (more than a core's L2), they run in chunks whose largest
# activation takes at most SPAN_CHUNK_BYTES, up to where the span's weights would pass
# SPAN_WEIGHT_BYTES (a chunk loop rereads them), and only where its chunks are larger than the
# first span's.  None: no further span.  Intel Xeon, batch 32, in-process ratios to ONNX Runtime,
# three processes: MobileNetV3-Small 0.94-0.95x the time without the span (its 16x16 and 8x8
# stages in chunks of 8), the zoo's depthwise CNN 0.90-0.92x, EfficientNet-B0 0.997-1.01x;
# chunks of 2 MiB instead of 1: MobileNetV3-Small 0.96-0.98x, EfficientNet-B0 1.00-1.02x.  Without
# the weight limit EfficientNet-B0's span reached its 0.9 MiB 1x1 layers: 1.04x (one process).
SPAN_HEAVY_BYTES = 2 << 20
SPAN_CHUNK_BYTES = 1 << 20
SPAN_WEIGHT_BYTES = 1 << 20
# Where the further span's chunks are no larger than the first span's, the first span runs on
# through it, in the further span's chunks (before, the further span was dropped and its ops ran
# over the whole batch: batches whose first heavy ops end early, e.g. the zoo's depthwise CNN at 16
# and 24 samples).  Intel Xeon, in-process ratios to ONNX Runtime, merged / dropped: the zoo's
# depthwise CNN at 16 samples 1.07x / 1.22x, at 24 1.15x / 1.25x; its cnn at 16 0.89x / 0.96x, at
# 24 0.87x / 1.00x; EfficientNet-B0 at 8 1.05x / 1.09x; BERT at 32 (chunks of 8 through its last
# two ops instead of 16 to them) 0.96x / 1.005x; Llama-style at 16 and 32 unchanged within noise.
# Keeping the two spans as two loops instead: 1.09x, 1.15x, 0.95x, 0.93x, 1.06x, 0.995x.
# False: the further span is dropped (the earlier rule).
MERGED_SPANS = True
# How far past the last heavy op the cut may move to find the fewest bytes crossing it.
_CUT_WINDOW = 16


@dataclass(frozen=True)
class Step:
    """One op (or layer) of a program, for planning: the names it reads (its nested blocks'
    too), the names it writes with their bytes per sample (None: not static), the bytes of the
    weights it reads, and whether it is a pool."""
    reads: frozenset
    writes: tuple             # ((name, bytes per sample or None), ...)
    weight_bytes: int = 0
    pools: bool = False       # a max or average pool (windows of strided slices)


@dataclass(frozen=True)
class ChunkPlan:
    cut: int                  # steps[:cut] run per chunk, the rest (after any next span) over the whole batch
    chunk: int                # samples per chunk (divides the batch)
    live: tuple               # names written before the cut (or inputs) that the rest reads
    next: "ChunkPlan | None" = None   # steps[cut:next.cut] run per chunk of next.chunk, and so on
    prefetch: bool = False    # the span's loop reads each chunk from its carry (a pool in the span)

    @property
    def spans(self) -> list:
        """``[(start, plan), ...]``: each chunked span ``steps[start:plan.cut]`` and its plan."""
        out, start, plan = [], 0, self
        while plan is not None:
            out.append((start, plan))
            start, plan = plan.cut, plan.next
        return out

    @property
    def end(self) -> int:
        """Where the last chunked span ends: ``steps[end:]`` run over the whole batch."""
        return self.spans[-1][1].cut


def chunk_plan(steps: list, inputs: dict, outputs, n: int, *, heavy: int | None = None,
               target: int | None = None) -> ChunkPlan | None:
    """The plan for a batch of ``n`` samples, or None (vmap the whole program).

    ``inputs``: {name: bytes per sample}; ``outputs``: the names the program returns; ``heavy``
    and ``target`` default to :data:`HEAVY_BYTES` and :data:`CHUNK_BYTES` (a :data:`LIGHT_CHUNK_SHARE`
    of it for a prefix of at most :data:`LIGHT_PREFIX_BYTES` of weights).  After the first span, a
    further one (:attr:`ChunkPlan.next`) where ops still write :data:`SPAN_HEAVY_BYTES` a batch
    (where its chunks would be no larger, the first span runs on through it: :data:`MERGED_SPANS`);
    where no op is heavy (a smaller batch), such a span from the first op on is the plan."""
    heavy = HEAVY_BYTES if heavy is None else heavy
    if n < 2 or not steps:
        return None
    sizes = dict(inputs)
    for s in steps:
        for name, size in s.writes:
            if size is None:
                return None     # a shape that is not static: no plan
            sizes[name] = size
    # names live after position p: written before p (or inputs) and read at or after p
    needed_after = [set() for _ in range(len(steps) + 1)]
    acc = set(outputs)
    for i in range(len(steps), 0, -1):
        needed_after[i] = set(acc)
        acc |= steps[i - 1].reads
    ctx = (steps, sizes, needed_after, [sum(size for _, size in s.writes) for s in steps], n)
    first = _span(ctx, 0, set(inputs), heavy, target)
    if SPAN_HEAVY_BYTES is None:
        return first
    if first is None:       # a smaller batch: its first layers may still overflow a core's cache
        return _span(ctx, 0, set(inputs), SPAN_HEAVY_BYTES, target, SPAN_WEIGHT_BYTES)
    written = set(inputs) | {name for s in steps[:first.cut] for name, _ in s.writes}
    follow = _span(ctx, first.cut, written, SPAN_HEAVY_BYTES, SPAN_CHUNK_BYTES, SPAN_WEIGHT_BYTES)
    if follow is None:
        return first
    if follow.chunk > first.chunk:
        return dataclasses.replace(first, next=follow)
    if not MERGED_SPANS:
        return first
    # a further span whose chunks are no larger than the first's: one span through both, in the
    # smaller chunks (see MERGED_SPANS)
    return dataclasses.replace(follow, prefetch=first.prefetch or follow.prefetch)


def _span(ctx, start: int, written: set, heavy: int, target: int | None,
          max_weights: int | None = None) -> ChunkPlan | None:
    """The span of ``steps[start:cut]`` to run in chunks: ``cut`` past the last heavy op, where the
    fewest bytes cross it, and before the span's weights would pass ``max_weights``; None where no
    op in that range is heavy or one sample's largest activation exceeds the target."""
    steps, sizes, needed_after, out_bytes, n = ctx
    stop, weights = len(steps), 0
    for i in range(start, len(steps)):
        weights += steps[i].weight_bytes
        if max_weights is not None and weights > max_weights:
            stop = i
            break
    # weight-dominated ops (a transformer's FFN and vocabulary projections) are not heavy: a chunk
    # loop streams their weights once per chunk
    heavy_at = [i for i in range(start, stop)
                if out_bytes[i] * n >= heavy and steps[i].weight_bytes <= out_bytes[i]]
    if not heavy_at:
        return None
    last = heavy_at[-1]
    written, live_at = set(written), {}
    for p in range(start + 1, stop + 1):
        written.update(name for name, _ in steps[p - 1].writes)
        if p > last:
            live_at[p] = tuple(sorted(written & needed_after[p]))
        if p >= last + 1 + _CUT_WINDOW:
            break
    cut = min(live_at, key=lambda p: (sum(sizes[name] for name in live_at[p]), p))
    largest = max(out_bytes[start:cut])
    if target is None:
        light = sum(s.weight_bytes for s in steps[start:cut]) <= LIGHT_PREFIX_BYTES
        target = CHUNK_BYTES // LIGHT_CHUNK_SHARE if light else CHUNK_BYTES
    chunk = max((d for d in range(1, n) if n % d == 0 and d * largest <= target), default=None)
    if chunk is None:
        return None
    return ChunkPlan(cut, chunk, live_at[cut], prefetch=any(s.pools for s in steps[start:cut]))


# --- running a plan --------------------------------------------------------------------------
def chunked_backend() -> bool:
    """Chunk plans are for the CPU's caches, on one device (a sharded batch is split already)."""
    return jax.default_backend() == "cpu" and jax.local_device_count() == 1


def batch_size(inputs) -> int:
    """The leading axis of a batch's arrays (0 for none)."""
    leaves = jax.tree.leaves(inputs)
    return len(leaves[0]) if leaves else 0


def nbytes(aval) -> int:
    """Bytes of an array or ``ShapeDtypeStruct``."""
    import numpy as np
    return int(np.prod(aval.shape, dtype=np.int64)) * np.dtype(aval.dtype).itemsize


def one_sample(inputs):
    """Shapes and dtypes of one sample of a batch (for ``jax.eval_shape``)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), inputs)


def run_chunked(plan: ChunkPlan, inputs, prefix: Callable, suffix: Callable, middle: Callable | None = None):
    """``vmap(suffix)`` over the batch of ``prefix``'s values, ``prefix`` (one sample's inputs ->
    the plan's live values) run over ``lax.map``'d chunks of ``plan.chunk`` samples, vmapped in
    each: the same values as ``vmap(lambda x: suffix(prefix(x)))(inputs)``.  A further span
    (``plan.next``) runs ``middle(start, span, values)`` (the values live at ``start`` -> those
    live at ``span.cut``) over its own chunks in between; ``suffix`` then starts at ``plan.end``."""
    spans = plan.spans
    if len(spans) > 1 and middle is None:
        raise ValueError("run_chunked: a plan of several spans needs `middle`")
    live = _map_chunks(plan.chunk, inputs, prefix, prefetch=plan.prefetch)
    for start, span in spans[1:]:
        live = _map_chunks(span.chunk, live, functools.partial(middle, start, span), prefetch=span.prefetch)
    return jax.vmap(suffix)(live)


def _map_chunks(k: int, values, fn: Callable, prefetch: bool = False):
    """``vmap(fn)(values)`` computed by ``lax.map`` over chunks of ``k`` samples (by
    :func:`prefetched_map` with ``prefetch``)."""
    n = batch_size(values)
    # The chunks go into the loop without their size-1 axes (a list predict's inputs have a leading
    # one).  With them, XLA's layout assignment gave the loop's copy of the input another order of
    # the size-1 axis, the same bytes, and copied the whole batch into it before the loop.
    shapes = jax.tree.map(lambda a: a.shape[1:], values)
    chunks = jax.tree.map(lambda a: a.reshape((n // k, k) + tuple(d for d in a.shape[1:] if d != 1)), values)

    def chunk(c):
        return jax.vmap(fn)(jax.tree.map(lambda a, shape: a.reshape((k,) + shape), c, shapes))

    mapped = (prefetched_map if prefetch else jax.lax.map)(chunk, chunks)
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), mapped)


def prefetched_map(fn: Callable, xs):
    """``lax.map(fn, xs)`` whose iteration ``i`` reads ``xs[i]`` from the loop's carry, sliced out
    by iteration ``i - 1`` (the first before the loop): ``fn`` gets a buffer of its own, which
    XLA cannot fuse a slice at the loop index into."""
    m = len(jax.tree.leaves(xs)[0])
    first = jax.tree.map(lambda a: a[0], xs)
    if m == 1:
        return jax.tree.map(lambda y: y[None], fn(first))
    out = jax.tree.map(lambda s: jnp.zeros((m,) + s.shape, s.dtype), jax.eval_shape(fn, first))

    def body(i, carry):
        out, cur = carry
        out = jax.tree.map(lambda o, y: jax.lax.dynamic_update_index_in_dim(o, y, i, 0), out, fn(cur))
        nxt = jnp.minimum(i + 1, m - 1)
        return out, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, nxt, 0, keepdims=False), xs)

    return jax.lax.fori_loop(0, m, body, (out, first))[0]
