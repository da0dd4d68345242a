"""A persistent cache of compiled executables, so a warm load skips tracing, lowering and compiling.

JAX's persistent compilation cache removes XLA's compile time, but JAX still traces the
function and lowers it to StableHLO to compute the cache key: about 0.15 s for a small
network, most of a warm ``MLModel(path)`` + first ``predict``.  This cache keys the compiled
executable on what determines it without tracing: a digest of the stage (the MIL program and
every constant baked into the trace; weights are arguments), the abstract signature of the
arguments, the versions of mljax/jax/jaxlib, a digest of mljax's own source code (every
``mljax/**/*.py``, hashed once at import: a changed lowering never serves an old executable),
the backend and ``XLA_FLAGS``; a hit
deserializes the executable (``jax.experimental.serialize_executable``) and calls it.

It is on when a folder is configured: ``mljax.cache.enable(path)``, the ``MLJAX_CACHE_DIR``
environment variable, or JAX's own ``jax_compilation_cache_dir`` (then under
``<dir>/mljax-executables``).  An unreadable or stale entry is logged (logger ``mljax.cache``,
level WARNING), recompiled and replaced; nothing here can change a result, only how fast the
first call comes.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np

__all__ = ["enable", "using", "disable", "cache_dir", "CachedJit", "load", "store", "source_digest",
           "SOURCE_DIGEST"]

_FORMAT = b"mljax-executable-v1"
_log = logging.getLogger("mljax.cache")


def source_digest(root: str | os.PathLike | None = None) -> bytes:
    """sha256 over every ``*.py`` under ``root`` (default: the mljax package), names and bytes."""
    root = Path(root or Path(__file__).parent)
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.digest()


#: mljax's own code, as imported: part of every cache key
SOURCE_DIGEST = source_digest()
_DIR: list = [None]       # [explicit folder | False (disabled) | None (from env / JAX)]


def enable(path: str | os.PathLike | None = None) -> Path:
    """Turn on persistent caching: mljax's executables and JAX's compilation cache, in ``path``.

    ``path`` defaults to ``$MLJAX_CACHE_DIR`` or ``~/.cache/mljax``.  Returns the folder.
    """
    folder = Path(path or os.environ.get("MLJAX_CACHE_DIR") or Path.home() / ".cache" / "mljax")
    folder.mkdir(parents=True, exist_ok=True)
    _DIR[0] = folder / "executables"
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(folder / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


@contextlib.contextmanager
def using(path: str | os.PathLike | None = None):
    """Keep executables in ``path`` (default ``$MLJAX_CACHE_DIR`` or ``~/.cache/mljax``) inside the
    ``with`` block only; JAX's own configuration is left alone.  The ``mljax predict`` command uses it."""
    folder = Path(path or os.environ.get("MLJAX_CACHE_DIR") or Path.home() / ".cache" / "mljax")
    before = _DIR[0]
    _DIR[0] = folder / "executables"
    try:
        yield _DIR[0]
    finally:
        _DIR[0] = before


def disable() -> None:
    """Turn mljax's executable cache off for this process (JAX's own cache is left as it is)."""
    _DIR[0] = False


def cache_dir() -> Path | None:
    """The folder executables are kept in, or None when the cache is off."""
    if _DIR[0] is False:
        return None
    if _DIR[0] is not None:
        return _DIR[0]
    env = os.environ.get("MLJAX_CACHE_DIR")
    if env:
        return Path(env) / "executables"
    jax_dir = jax.config.jax_compilation_cache_dir
    return Path(jax_dir) / "mljax-executables" if jax_dir else None


def _aval_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (str(treedef), tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__)),
                                 bool(getattr(getattr(x, "aval", None), "weak_type", False)))
                                for x in leaves))


def _environment() -> bytes:
    import jaxlib

    import mljax
    dev = jax.devices()[0]
    return repr((mljax.__version__, SOURCE_DIGEST.hex(), jax.__version__, jaxlib.__version__, dev.platform,
                 getattr(dev, "device_kind", ""), os.environ.get("XLA_FLAGS", ""),
                 jax.config.jax_enable_x64)).encode()


class CachedJit:
    """``jax.jit(fn)`` whose compiled executables persist across processes.

    Args:
      jitted: ``jax.jit(fn)`` of the pure function, called as ``fn(weights, *args)`` (the caller's
        own jitted function, so a model holds one trace cache whether the disk cache is on or off).
      digest: bytes that, with the arguments' shapes and dtypes, fully determine ``fn``'s
        computation (None: never persisted, a plain ``jax.jit``).

    Calls are dispatched on the shapes/dtypes of every argument but the first: the weights
    are the model's own, checked once per executable (the caller must not pass weights of
    another structure; ``MLModel`` calls the plain jit for weights replaced by training).
    """

    def __init__(self, jitted: Callable, digest: bytes | None):
        self.jit = jitted
        self._digest = digest
        self._compiled: dict = {}
        self._weights_key = None
        self.loaded_from_disk = 0     # executables deserialized (for tests and benchmarks)

    def __call__(self, weights, *args):
        folder = cache_dir() if self._digest is not None else None
        if folder is None:
            return self.jit(weights, *args)
        sig = tuple(_aval_key(a) for a in args)
        compiled = self._compiled.get(sig)
        if compiled is None:
            compiled = self._compiled[sig] = self._load_or_compile(folder, sig, weights, args)
        return compiled(weights, *args)

    def entry(self, folder: Path, weights, *args) -> Path:
        """The file the executable for these arguments is kept in (it may not exist yet)."""
        if self._weights_key is None:
            self._weights_key = _aval_key(weights)
        sig = tuple(_aval_key(a) for a in args)
        key = hashlib.sha256(b"\0".join([_FORMAT, _environment(), self._digest,
                                         repr((self._weights_key, sig)).encode()])).hexdigest()
        return folder / f"{key}.bin"

    def _load_or_compile(self, folder: Path, sig, weights, args):
        path = self.entry(folder, weights, *args)
        compiled = load(path)
        if compiled is not None:
            self.loaded_from_disk += 1
            return compiled
        compiled = self.jit.lower(weights, *args).compile()
        store(path, compiled)
        return compiled


def load(path: Path):
    """The executable stored in ``path``, or None when it is missing, stale or damaged."""
    if not path.exists():
        return None
    try:
        from jax.experimental.serialize_executable import deserialize_and_load
        payload, in_tree, out_tree = pickle.loads(path.read_bytes())
        return deserialize_and_load(payload, in_tree, out_tree)
    except Exception as e:   # noqa: BLE001 - a stale or damaged entry: the caller compiles and replaces it
        _log.warning("mljax: cannot load the cached executable %s (%s: %s); compiling it again",
                     path, type(e).__name__, e)
        return None


def store(path: Path, compiled) -> None:
    """Serialize ``compiled`` into ``path`` atomically; a failure only costs the next load."""
    try:
        from jax.experimental.serialize_executable import serialize
        blob = pickle.dumps(serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
    except Exception as e:   # noqa: BLE001 - read-only folder, unserializable executable: no cache
        warnings.warn(f"mljax: could not store a compiled executable in {path.parent}: {e}", stacklevel=3)


def program_digest(spec_bytes: bytes, baked_constants, options) -> bytes:
    """A digest of an ML program stage: its spec, the constants baked into its trace, options."""
    h = hashlib.sha256(spec_bytes)
    for name, value in baked_constants:
        arr = np.asarray(value)
        h.update(name.encode() + b"\0" + arr.dtype.str.encode() + repr(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
    h.update(repr(options).encode())
    return h.digest()
