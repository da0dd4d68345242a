"""CPU runtime settings, made before JAX starts: threads (latency against CPU time) and the allocator.

**Threads.**
XLA:CPU runs a compiled program on a pool of threads, one per core the process may use:
independent ops run side by side, large ops split, and each op library call (YNNPACK's matrix
products) hands its work to the pool and back.  That is the fastest wall time for one
prediction on an idle machine, but every handoff and idle spin is CPU time: on this project's
2-core benchmark machine, one thread took up to 40% less CPU time per prediction than the default
pool, 18% in the geomean over the zoo and the real architectures (docs/cpu_settings.md), for
20% more wall time.  So a server that runs one
process per core, or many users' predictions at once, wants ``set_cpu_threads(1)``; a single
interactive prediction wants the default.

XLA sizes its pools once, when JAX starts its CPU backend (``PJRT_NPROC``, read then), so the
setting must come before the first model loads or any JAX computation runs.  With one thread,
each call also runs inline on the caller's thread: handing it to the single pool thread and
waiting cost two thread wake-ups, 50-80 us a call on a VM.

**Memory reuse.**  XLA:CPU allocates each execution's temporaries anew and frees them after.
glibc's malloc serves a block above 32 MiB (64 MiB on a thread other than the main one) with
fresh pages from ``mmap`` and unmaps it on ``free``, so every large prediction page-faults its
whole temporary buffer again: ResNet-18 at batch 32 (128x128) took 64,000 page faults (256 MiB
of zeroed pages) per call.  ``retain_freed_memory()`` keeps freed memory in the heap for the
next call -- what ONNX Runtime's arena does.  With ``set_cpu_threads(1)``, ResNet-18 at batch 32
took 0.43x the default's CPU time, against 1.01x for one thread alone (docs/cpu_settings.md).
List predicts with a chunk plan (:mod:`mljax.schedule`) hold fewer temporaries and depend on
it less: the zoo's depthwise CNN 0.84x against 0.88x (0.51x against 0.87x before plans),
EfficientNet-B0 still 0.68x against 0.95x.  The cost: the process keeps its peak heap (its RSS does not
shrink after a large prediction) and all threads share one malloc arena.

**Inputs without a copy.**  XLA:CPU takes a NumPy array as a device buffer without copying it
when its data is 64-byte aligned (and contiguous); otherwise it copies it, through a slower path
than a memcpy: a 196 KB image took 103 us to transfer unaligned and 22 us aligned (AMD EPYC).
NumPy aligns small arrays to 16 bytes only, so predict builds its input arrays 64-byte aligned
(:func:`aligned`, :func:`aligned_empty`).
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

from mljax.errors import ConfigurationError

__all__ = ["set_cpu_threads", "retain_freed_memory", "memory_retained", "aligned", "aligned_empty", "RETAIN_ENV", "EIGEN_SINGLE",
           "LLVM_UNROLL", "DEFAULTS_ENV", "WIDE_VECTORS", "batched_compiler_options", "ALIGN_ABOVE", "ZERO_COPY_ALIGN"]

#: the alignment at which XLA:CPU uses a host array's memory as it is
ZERO_COPY_ALIGN = 64
#: predict copies unaligned inputs of more than this many bytes into aligned memory itself and
#: lets XLA:CPU copy smaller ones.  On an AMD EPYC, XLA's copy of an unaligned 196 KB image took
#: 103 us against 22 us aligned; on an Intel Xeon (jax 0.10.2) XLA copied an unaligned input at
#: memcpy speed and the aligned copy cost more: 8 KB inputs 5.5 us a call against 13.6 us, 196 KB
#: 11 us against 16.5 us, 588 KB 43 us against 36 us.
ALIGN_ABOVE = 64 << 10

EIGEN_SINGLE = "--xla_cpu_multi_thread_eigen=false"
"""The XLA flag that keeps each op on one thread (part of ``set_cpu_threads(1)``)."""
LLVM_UNROLL = "--xla_backend_extra_options=-unroll-full-max-count=8"
"""The XLA flag mljax adds by default (:func:`default_xla_flags`): LLVM fully unrolls no loop of
more than 8 iterations."""
DEFAULTS_ENV = "MLJAX_XLA_DEFAULTS"
"""Set to ``0`` in the environment to keep mljax from adding :data:`LLVM_UNROLL`."""
_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def _backend_started() -> bool:
    if "jax" not in sys.modules:         # JAX not even imported: nothing has started
        return False
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def set_cpu_threads(n: int | None) -> None:
    """Run XLA:CPU on ``n`` threads in this process (``None``: XLA's default, one per usable core).

    ``n == 1`` also keeps each op single-threaded (``--xla_cpu_multi_thread_eigen=false``) and
    runs each call inline, on the calling thread (``jax_cpu_enable_async_dispatch`` off): every
    op runs in sequence on one thread, the least CPU time per prediction.  With asynchronous
    dispatch the caller handed each call to XLA's single pool thread and slept until it was done;
    the two wake-ups cost 50-80 us per call on this project's 2-core VMs (a 1024-element
    multiply 52 us against 5 us inline; a 128x256 by 256x256 product 164 us against 88 us, ONNX
    Runtime 79-89 us; MobileNetV3-Small batch 1, 10th percentile of 1000 predicts, 0.91-0.98 ms
    against 0.66-0.83 ms).  ``PJRT_NPROC=1`` and ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``
    in the environment before starting Python do the rest (JAX reads the dispatch setting from its
    config only: ``jax.config.update("jax_cpu_enable_async_dispatch", False)``).

    Raises:
      ConfigurationError: JAX's CPU backend has already started (a model was loaded or a JAX
        computation ran); ``n`` that is not a positive integer or None.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigurationError(f"set_cpu_threads expects a positive integer or None, found {n!r}")
    if _backend_started():
        current = os.environ.get("PJRT_NPROC", "one per core")
        raise ConfigurationError(
            f"set_cpu_threads({n}) must run before JAX starts its CPU backend (before the first model "
            f"loads or JAX computation runs); this process already started it with {current} thread(s). "
            "Call it first thing, or set PJRT_NPROC in the environment.")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f != EIGEN_SINGLE]
    if n is None:
        os.environ.pop("PJRT_NPROC", None)
    else:
        os.environ["PJRT_NPROC"] = str(n)
        if n == 1:
            # first: XLA stops reading XLA_FLAGS at a token that is not a --flag
            flags.insert(0, EIGEN_SINGLE)
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)
    else:
        os.environ.pop("XLA_FLAGS", None)
    _set_inline(n == 1)


def _set_inline(inline: bool) -> None:
    """Calls run on the calling thread (``inline``) or are dispatched to XLA's pool (JAX's
    default); JAX reads the setting when it starts its CPU backend.  Importing JAX starts nothing."""
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", not inline)


def default_xla_flags() -> bool:
    """Add :data:`LLVM_UNROLL` to ``XLA_FLAGS`` before JAX starts; ``import mljax`` calls it.

    XLA:CPU emits an elementwise fusion as a loop nest over its output shape.  When the minor
    dimension has 9 to 24 elements (a channel-last map of 16 or 24 channels, Winograd's tiles),
    LLVM's default fully unrolls that innermost loop and then vectorizes the loop around it, with a
    gather and a scatter per vector: a hardswish over ``[8192, 64, 16]`` took 0.46 ns per element
    against 0.10 at 32 channels, and 0.09 with the flag.  Whole models, where such loops are a
    small share of the time, moved less: 0.98x in the geomean of the zoo and the real
    architectures in each of two runs of ``bench/xla_flags.py`` (docs/xla_flags.md); single models
    moved within that study's noise (0.94-1.02x in one run, 0.83-1.16x in a busier one).
    Unrolling changes no arithmetic: results are the same bits.

    Changes nothing, returning False, when JAX's backend has already started (XLA has read its
    flags), when ``XLA_FLAGS`` already sets ``--xla_backend_extra_options`` (the user's own LLVM
    options win), when ``MLJAX_XLA_DEFAULTS=0`` is in the environment, and when a JAX GPU plugin
    is installed and ``JAX_PLATFORMS`` is not ``cpu`` (the option is process-wide, LLVM's GPU
    code generation reads it too, and it is measured on CPUs only).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if (os.environ.get(DEFAULTS_ENV) == "0" or "--xla_backend_extra_options" in flags
            or _backend_started() or (os.environ.get("JAX_PLATFORMS", "").strip().lower() != "cpu"
                                      and _gpu_plugin_installed())):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {LLVM_UNROLL}".strip()
    return True


WIDE_VECTORS = {"xla_cpu_prefer_vector_width": 512}
"""The XLA compile option mljax gives executables over a list predict's samples on CPUs with
AVX-512 (:func:`batched_compiler_options`), for every predict executable."""


@functools.lru_cache(maxsize=None)
def _has_avx512() -> bool:
    """The CPU has AVX-512 (``avx512f`` in Linux's ``/proc/cpuinfo``, read once); False where that is
    unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def batched_compiler_options() -> dict:
    """XLA compile options for mljax's predict executables, one sample's and a list predict's
    (the name is historical: list predicts had them first): 512-bit vectors
    (:data:`WIDE_VECTORS`) where the CPU has AVX-512, else none.

    XLA:CPU emits its fused loops (depthwise convolutions, activations, Winograd's transforms)
    with 256-bit vectors by default, on any CPU, and 512-bit vectors halve their instructions.
    One thread, interleaved rounds, Intel Xeon with AVX-512: at 32 samples EfficientNet-B0 0.90x
    the time, MobileNetV3-Small 0.94-0.96x, the zoo's LSTM and GRU 0.97x, BERT, Llama and
    ResNet-18 0.99-1.01x.  At one sample (two processes each, ratios to ONNX Runtime in the same
    process): EfficientNet-B0 0.88-0.93x, the zoo's lstm 0.86-0.95x and gru 0.90-0.92x, its
    depthwise CNN 0.94-0.99x, MobileNetV3-Small 0.97-0.99x, ResNet-18, BERT and Llama 0.98-0.99x,
    its cnn 1.00x and transformer 1.01-1.03x.  (An earlier study, before the per-image global pool
    and the chunk plans' changes, had MobileNetV3-Small at one sample 1.06x, and single predicts
    kept 256-bit vectors until then.)  On an AMD EPYC with AVX-512 (which runs a 512-bit
    instruction as two 256-bit halves), 512-bit vectors for every executable measured neutral.
    The operations are the same; a vectorized reduction may add in another order (BERT at 8
    samples: outputs within 3e-7 relative; EfficientNet-B0 and MobileNetV3-Small the same bits).

    None where mljax's defaults are off (``MLJAX_XLA_DEFAULTS=0``), where ``XLA_FLAGS`` sets the
    vector width itself (the user's choice wins), or off the CPU backend.
    """
    import jax
    if (os.environ.get(DEFAULTS_ENV) == "0" or "--xla_cpu_prefer_vector_width" in os.environ.get("XLA_FLAGS", "")
            or jax.default_backend() != "cpu" or not _has_avx512()):
        return {}
    return dict(WIDE_VECTORS)


def _gpu_plugin_installed() -> bool:
    """A JAX GPU plugin (CUDA or ROCm) is importable: ``jax_plugins.xla_cuda12`` and the like, or
    the ``jax_cuda12_plugin`` family (found without importing them)."""
    import importlib.util
    import pkgutil
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    locations = spec.submodule_search_locations if spec is not None else None
    return any(("cuda" in m.name or "rocm" in m.name) for m in pkgutil.iter_modules(locations or []))


# glibc's mallopt settings: (parameter number in malloc.h, value, the environment variable glibc
# reads at start for the same setting)
_MALLOPT = ((-8, 1, "MALLOC_ARENA_MAX"),                 # M_ARENA_MAX: every thread on the main heap
            (-4, 0, "MALLOC_MMAP_MAX_"),                 # M_MMAP_MAX: no block of its own mapping
            (-1, 2**31 - 1, "MALLOC_TRIM_THRESHOLD_"))   # M_TRIM_THRESHOLD: keep 2 GiB of free heap top
RETAIN_ENV = {env: str(value) for _, value, env in _MALLOPT}
"""The environment that does what ``retain_freed_memory()`` does, for a process about to start."""


def retain_freed_memory() -> bool:
    """Keep the memory XLA frees between predictions for the next one (glibc's malloc only).

    Sets glibc's ``M_ARENA_MAX=1`` (every thread allocates from the main heap, which can grow
    past the 64 MiB a thread arena holds), ``M_MMAP_MAX=0`` (no block of its own mapping) and
    ``M_TRIM_THRESHOLD`` to 2 GiB (free memory stays in the heap).  Same as starting Python with
    the variables of ``RETAIN_ENV`` (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=2147483647``).

    Returns False, changing nothing, where the C library is not glibc (macOS, musl).

    Raises:
      ConfigurationError: JAX's CPU backend has already started (its threads have their arenas).
    """
    if _backend_started():
        env = " ".join(f"{k}={v}" for k, v in RETAIN_ENV.items())
        raise ConfigurationError(
            "retain_freed_memory() must run before JAX starts its CPU backend (before the first model "
            "loads or JAX computation runs): XLA's threads already have their malloc arenas. Call it "
            f"first thing, or start Python with {env}.")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    global _retained
    _retained = all(mallopt(param, value) == 1 for param, value, _ in _MALLOPT)
    return _retained


_retained = False


def memory_retained() -> bool:
    """Whether freed memory stays in this process's heap: :func:`retain_freed_memory` ran, or
    Python started with ``RETAIN_ENV``'s variables (read by glibc at startup)."""
    return _retained or all(os.environ.get(k) == v for k, v in RETAIN_ENV.items())


def aligned_empty(shape, dtype):
    """An uninitialized C-contiguous array whose data is :data:`ZERO_COPY_ALIGN`-byte aligned."""
    import math

    import numpy as np
    dtype = np.dtype(dtype)
    n = math.prod(map(int, shape)) * dtype.itemsize      # math.prod: np.prod took 2 us a call
    buf = np.empty(n + ZERO_COPY_ALIGN, np.uint8)
    start = (-buf.ctypes.data) % ZERO_COPY_ALIGN
    return buf[start:start + n].view(dtype).reshape(shape)


def is_device_dtype(dtype) -> bool:
    """Whether arrays of ``dtype`` become device buffers (not objects, strings or raw bytes)."""
    import numpy as np
    dtype = np.dtype(dtype)
    return dtype != object and dtype.kind not in "USV"


def aligned(a, above: int = 0):
    """``a`` itself when it is a C-contiguous NumPy array with :data:`ZERO_COPY_ALIGN`-byte aligned
    data, or one of at most ``above`` bytes, else an aligned copy (other values as they are): the
    input XLA:CPU takes without a copy."""
    import numpy as np
    if (not isinstance(a, np.ndarray) or not is_device_dtype(a.dtype) or a.nbytes <= above
            or (a.flags.c_contiguous and a.ctypes.data % ZERO_COPY_ALIGN == 0)):
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out
