"""Running over several devices: data-parallel list predicts, streaming predicts, and the
helpers that place host arrays on a device mesh (also for several processes under
``jax.distributed``).

A list predict shards each chunk's rows over every local device (the weights replicated, each
device running the vmapped function on its slice); with one device nothing changes.  The
arrays built by :func:`global_array` work the same in one process and in several: each process
holds the whole host array and contributes the slices its own devices hold.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mljax.errors import InputError

__all__ = ["local_devices", "chunk_rows", "run_batched", "predict_stream", "mesh", "global_array",
           "to_host", "pad_rows", "round_up", "sample_bar"]


def local_devices() -> list:
    """The devices of this process that a list predict shards over."""
    return jax.local_devices()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def chunk_rows(n: int, per_device: int) -> int:
    """Rows of one vmapped call of a list predict of ``n`` rows: at most ``per_device`` rows on
    each local device, and a multiple of the device count (the padded rows are dropped)."""
    count = len(local_devices())
    return round_up(min(n, per_device * count), count)


def mesh(devices: Sequence | None = None, axis: str = "batch") -> Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise InputError("devices: expected at least one device; found none")
    return Mesh(np.array(devices), (axis,))


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with copies of its first row appended up to ``rows`` rows."""
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)])


def global_array(host, sharding: NamedSharding):
    """A jax.Array of ``host`` (NumPy, the whole array, same in every process) laid out as
    ``sharding``; each process places only the slices its devices hold."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The whole value of a (possibly multi-process) jax.Array as NumPy, in every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# --- list predicts -----------------------------------------------------------------------
_REPLICATED: OrderedDict = OrderedDict()    # id(weights) -> (weights, mesh, replicated copy)
_REPLICATED_MAX = 8
_LOCK = threading.Lock()


def _replicated(weights, m: Mesh):
    """``weights`` on every device of ``m`` (cached: a model's weights are copied once)."""
    key = (id(weights), id(m))
    with _LOCK:
        hit = _REPLICATED.get(key)
        if hit is not None and hit[0] is weights:
            _REPLICATED.move_to_end(key)
            return hit[2]
    copy = jax.device_put(weights, NamedSharding(m, P()))
    with _LOCK:
        _REPLICATED[key] = (weights, m, copy)
        if len(_REPLICATED) > _REPLICATED_MAX:
            _REPLICATED.popitem(last=False)
    return copy


_MESHES: dict = {}


def _local_mesh() -> Mesh:
    devices = tuple(local_devices())
    if devices not in _MESHES:
        _MESHES[devices] = mesh(devices, "batch")
    return _MESHES[devices]


def run_batched(batched_fn, weights, stacked: dict):
    """``batched_fn(weights, stacked, {})``, its rows sharded over the local devices when there
    are several (``stacked``'s row count a multiple of theirs, see :func:`chunk_rows`)."""
    if len(local_devices()) == 1:
        return batched_fn(weights, stacked, {})
    m = _local_mesh()
    rows = NamedSharding(m, P("batch"))
    sharded = {k: jax.device_put(np.asarray(v), rows) for k, v in stacked.items()}
    return batched_fn(_replicated(weights, m), sharded, {})


# --- streaming ---------------------------------------------------------------------------
def predict_stream(model, data: Iterable[dict], *, chunk: int = 4096, progress: bool = True) -> Iterator[dict]:
    """Yield ``model.predict`` of each feature dict of ``data`` in order, predicting ``chunk``
    dicts at a time as one list predict (so memory holds one chunk, not the dataset)."""
    if isinstance(data, dict):
        raise InputError("predict_stream: expected an iterable of feature dicts; found a single dict "
                         "(use predict for one sample)")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"predict_stream: chunk must be a positive int; found {chunk!r}")
    total = len(data) if hasattr(data, "__len__") else None
    bar = sample_bar(total, "mljax predict_stream") if progress else None
    it = iter(data)
    try:
        while True:
            items = list(itertools.islice(it, chunk))
            if not items:
                break
            yield from model.predict(items)
            if bar is not None:
                bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()


def sample_bar(total: int | None, desc: str, **options):
    """A transient tqdm bar counting samples, or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="sample", desc=desc, leave=False, **options)
