"""``mljax.set_cpu_threads`` / ``mljax predict --threads``: the size of XLA:CPU's thread pools.

Each check runs in a fresh interpreter (XLA sizes its pools once per process) and counts the
pool threads the process really has (``/proc/self/task/*/comm``), independent of the machine's
core count; predictions are checked against NumPy.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mljax
from helpers import convert_mil, tanh_projection_program

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
ENV.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + str(ROOT / "tests"))
pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")

_COUNT = """
def pool_threads():
    import glob
    names = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
    return sum(n.startswith("tf_XLAEigen") for n in names)
"""


def _run(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _COUNT + code, *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd="/")


@pytest.fixture(scope="module")
def model_path():
    proj = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    return convert_mil(tanh_projection_program(proj)), proj


@pytest.mark.parametrize("n", [1, 3])
def test_set_cpu_threads_sizes_xla_pool_and_predicts_exactly(model_path, n, tmp_path):
    path, proj = model_path
    code = f"""
import sys, numpy as np, mljax
mljax.set_cpu_threads({n})
m = mljax.MLModel(sys.argv[1])
x = np.linspace(-2, 2, 4, dtype=np.float32)
out = next(iter(m.predict({{next(iter(m.input_description)): x}}).values()))
import jax
print(pool_threads(), np.abs(out - np.tanh(x @ np.load(sys.argv[2]))).max(), jax.config.read("jax_cpu_enable_async_dispatch"))
"""
    np.save(tmp_path / "proj.npy", proj)
    run = _run(code, path, tmp_path / "proj.npy")
    assert run.returncode == 0, run.stderr
    threads, err, dispatch = run.stdout.split()
    assert int(threads) == n
    assert float(err) < 1e-5
    # one thread: each call runs inline on the caller's thread (no handoff to the pool)
    assert dispatch == ("False" if n == 1 else "True")


def test_after_the_backend_started_it_is_refused_and_changes_nothing():
    code = """
import os, jax, jax.numpy as jnp, mljax
jax.block_until_ready(jnp.ones(3) + 1)          # the CPU backend starts here
before = pool_threads()
try:
    mljax.set_cpu_threads(1)
except mljax.ConfigurationError as e:
    print("refused", "before JAX starts" in str(e), os.environ.get("PJRT_NPROC"), pool_threads() == before)
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["refused", "True", "None", "True"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_counts_are_refused(bad):
    with pytest.raises(mljax.ConfigurationError, match="positive integer"):
        mljax.set_cpu_threads(bad)


def test_single_thread_flag_goes_first_and_none_restores(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    import jax
    import mljax.cpu as cpu
    monkeypatch.setattr(cpu, "_backend_started", lambda: False)
    mljax.set_cpu_threads(1)
    assert os.environ["PJRT_NPROC"] == "1"
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_multi_thread_eigen=false", "--xla_dump_to=/tmp/x"]
    assert jax.config.read("jax_cpu_enable_async_dispatch") is False
    mljax.set_cpu_threads(None)
    assert "PJRT_NPROC" not in os.environ
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    assert jax.config.read("jax_cpu_enable_async_dispatch") is True


def test_cli_threads_option(model_path, tmp_path):
    path, proj = model_path
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    name = next(iter(mljax.MLModel(path).input_description))
    code = f"""
import sys
from mljax.cli import main
rc = main(["predict", sys.argv[1], "--input", "{name}=" + sys.argv[2], "--threads", "1", "--no-cache", "--json"])
print("THREADS", pool_threads(), rc)
"""
    run = _run(code, path, tmp_path / "x.npy")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[-1].split() == ["THREADS", "1", "0"]
    out = np.asarray(next(iter(json.loads(lines[-2]).values())))
    np.testing.assert_allclose(out.reshape(-1), np.tanh(x @ proj).reshape(-1), rtol=1e-5, atol=1e-6)


_BIG_TEMP = """
import ctypes, sys
import mljax
if sys.argv[1] == "retain":
    assert mljax.retain_freed_memory() is True
import jax, jax.numpy as jnp
# Each call returns an 80 MiB array, which XLA allocates and frees when it is dropped.  An output
# buffer and not a temporary inside the computation: which temporaries an executable has depends on
# the library XLA picks for the CPU it runs on (YNNPACK may fuse a product with its neighbours and
# keep its own workspace), an output buffer it always allocates itself.
f = jax.jit(lambda s: jnp.tanh(s * jnp.arange(4096 * 5000, dtype=jnp.float32).reshape(4096, 5000)))
s = jnp.float32(1e-8)
for _ in range(3):
    out = f(s).block_until_ready()
    last = float(out[-1, -1])
    del out

class Info(ctypes.Structure):      # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
print(libc.mallinfo2().fordblks, last)
"""


def _has_mallinfo2() -> bool:
    import ctypes
    import platform
    return platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc's mallopt and mallinfo2")
def test_retain_freed_memory_keeps_the_temporaries_for_the_next_call():
    """glibc's own account of its heap: with retain, the 80 MiB array XLA freed after each call stays
    in the heap as free memory for the next call; by default it was its own mapping, returned to the
    kernel at free (so the next call page-faults fresh pages: bench/ and mljax/cpu.py measure that)."""
    runs = {mode: _run(_BIG_TEMP, mode) for mode in ("default", "retain")}
    for run in runs.values():
        assert run.returncode == 0, run.stderr
    (free_default, out_default), (free_retain, out_retain) = (
        map(float, runs[m].stdout.split()) for m in ("default", "retain"))
    # the last element: tanh(1e-8 * (4096 * 5000 - 1)), the same either way
    assert out_default == out_retain == pytest.approx(np.tanh(np.float32(1e-8) * (4096 * 5000 - 1)), rel=1e-5)
    temp = 4096 * 5000 * 4
    assert free_retain >= temp > free_default, (free_default, free_retain)


def test_retain_freed_memory_refused_after_backend_start_and_off_glibc(monkeypatch):
    code = """
import jax, jax.numpy as jnp, mljax
jax.block_until_ready(jnp.ones(2) * 2)
try:
    mljax.retain_freed_memory()
except mljax.ConfigurationError as e:
    print("refused", "MALLOC_ARENA_MAX=1" in str(e))
"""
    run = _run(code)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["refused", "True"]
    import mljax.cpu as cpu
    monkeypatch.setattr(cpu, "_backend_started", lambda: False)
    monkeypatch.setattr(cpu.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert mljax.retain_freed_memory() is False


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc's mallopt and mallinfo2")
@pytest.mark.parametrize("keep", [False, True])
def test_cli_keep_memory_option(model_path, tmp_path, keep):
    """``mljax predict --keep-memory`` predicts the same values and leaves the process keeping freed
    memory: an 80 MiB array freed after the prediction stays in glibc's heap as free memory (by default
    it is its own mapping, returned to the kernel)."""
    path, proj = model_path
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    name = next(iter(mljax.MLModel(path).input_description))
    code = f"""
import ctypes, sys
import numpy as np
from mljax.cli import main
args = ["predict", sys.argv[1], "--input", "{name}=" + sys.argv[2], "--no-cache", "--json"]
rc = main(args + (["--keep-memory"] if sys.argv[3] == "1" else []))
big = np.ones(80 << 18, np.float32)
del big
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
print("FREE", libc.mallinfo2().fordblks, rc)
"""
    run = _run(code, path, tmp_path / "x.npy", int(keep))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    free, rc = map(int, lines[-1].split()[1:])
    assert rc == 0
    assert (free >= 80 << 20) == keep, free
    out = np.asarray(next(iter(json.loads(lines[-2]).values())))
    np.testing.assert_allclose(out.reshape(-1), np.tanh(x @ proj).reshape(-1), rtol=1e-5, atol=1e-6)


_FLAGS = """
import os, sys
before = os.environ.get("XLA_FLAGS")
if sys.argv[1] == "started":
    import jax, jax.numpy as jnp
    jax.block_until_ready(jnp.ones(3) + 1)      # the CPU backend starts before mljax is imported
import mljax
print(repr(before), repr(os.environ.get("XLA_FLAGS")))
"""


@pytest.mark.parametrize("case, env, added", [
    ("fresh", {}, True),
    ("fresh", {"MLJAX_XLA_DEFAULTS": "0"}, False),                                  # opted out
    ("fresh", {"XLA_FLAGS": "--xla_backend_extra_options=-unroll-threshold=50"}, False),  # the user's own
    ("started", {}, False),                                                         # too late to take effect
])
def test_import_adds_the_unroll_flag_only_where_it_can_and_may(case, env, added):
    from mljax.cpu import LLVM_UNROLL
    run = subprocess.run([sys.executable, "-c", _FLAGS, case], capture_output=True, text=True, cwd="/",
                         env={**ENV, **env})
    assert run.returncode == 0, run.stderr
    before, after = (eval(v) for v in run.stdout.split())
    expected = f"{before or ''} {LLVM_UNROLL}".strip() if added else before
    assert after == expected


_BITS = """
import hashlib, sys, numpy as np, mljax
import jax, jax.numpy as jnp
m = mljax.MLModel(sys.argv[1])
x = np.linspace(-2, 2, 4, dtype=np.float32)
out = next(iter(m.predict({next(iter(m.input_description)): x}).values()))
# channel-last maps of 16 and 24 channels: the loops the flag keeps LLVM from unrolling
a = np.random.default_rng(0).standard_normal((64, 32, 16)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((64, 32, 24)).astype(np.float32)
hsw = jax.jit(lambda v: v * jnp.clip(v + 3, 0, 6) / 6)
ys = [np.asarray(out), np.asarray(hsw(a)), np.asarray(hsw(b))]
np.save(sys.argv[2], ys[1])
print(" ".join(hashlib.sha256(y.tobytes()).hexdigest() for y in ys))
"""


def test_the_unroll_flag_changes_no_bits(model_path, tmp_path):
    """Unrolling reorders no arithmetic: the same bits with and without mljax's default flag,
    and the values NumPy computes."""
    path, _ = model_path
    runs = {}
    for label, env in (("mljax", {}), ("xla", {"MLJAX_XLA_DEFAULTS": "0"})):
        run = subprocess.run([sys.executable, "-c", _BITS, str(path), str(tmp_path / f"{label}.npy")],
                             capture_output=True, text=True, cwd="/", env={**ENV, **env})
        assert run.returncode == 0, run.stderr
        runs[label] = run.stdout.split()
    assert runs["mljax"] == runs["xla"]
    a = np.random.default_rng(0).standard_normal((64, 32, 16)).astype(np.float32)
    np.testing.assert_allclose(np.load(tmp_path / "mljax.npy"), a * np.clip(a + 3, 0, 6) / 6, rtol=1e-6, atol=1e-7)


def _unaligned(x):
    """``x``'s values in an array whose data starts 4 bytes past a 64-byte boundary."""
    buf = np.empty(x.nbytes + 128, np.uint8)
    start = (-buf.ctypes.data) % 64 + 4
    out = buf[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def test_aligned_arrays_reach_xla_without_a_copy():
    """The premise of predict's aligned inputs: XLA:CPU uses a 64-byte aligned array's memory as
    the device buffer, and copies an unaligned one; ``aligned`` keeps values and passes others by."""
    import jax
    x = np.arange(5 * 7 * 9, dtype=np.float32).reshape(5, 7, 9)
    u = _unaligned(x)
    assert u.ctypes.data % 64 == 4
    a = mljax.cpu.aligned(u)
    assert a.ctypes.data % 64 == 0 and a.flags.c_contiguous
    np.testing.assert_array_equal(a, x)
    assert mljax.cpu.aligned(a) is a
    assert mljax.cpu.aligned(u, above=u.nbytes) is u        # small enough: left to XLA's copy
    assert mljax.cpu.aligned(u, above=u.nbytes - 1) is not u
    assert jax.device_put(a).unsafe_buffer_pointer() == a.ctypes.data
    assert jax.device_put(u).unsafe_buffer_pointer() != u.ctypes.data
    strided = mljax.cpu.aligned(x[:, ::2])          # not contiguous: an aligned contiguous copy
    assert strided.flags.c_contiguous and strided.ctypes.data % 64 == 0
    np.testing.assert_array_equal(strided, x[:, ::2])
    labels = np.array(["a", "b"])
    assert mljax.cpu.aligned(labels) is labels and mljax.cpu.aligned(3.0) == 3.0
    e = mljax.cpu.aligned_empty((3, 0, 2), np.float16)
    assert e.shape == (3, 0, 2) and e.dtype == np.float16


@pytest.mark.parametrize("align_above", [None, 0])
def test_predict_passes_aligned_inputs(model_path, monkeypatch, align_above):
    """Single predicts hand XLA 64-byte aligned inputs where they are larger than ALIGN_ABOVE
    (unaligned ones copied once) and smaller ones as they are (XLA copies them faster); list
    predicts stack into aligned memory.  The values NumPy computes either way."""
    path, proj = model_path
    if align_above is not None:
        monkeypatch.setattr(mljax.model, "ALIGN_ABOVE", align_above)
    model = mljax.MLModel(path)
    seen = []
    for attr in ("_cached_fn", "_predict_fn", "_batched_fn"):
        fn = getattr(model, attr)
        if fn is None:
            continue

        def spy(weights, inputs, states, _fn=fn):
            seen.append(inputs["x"].ctypes.data % 64)
            return _fn(weights, inputs, states)
        monkeypatch.setattr(model, attr, spy)
    xs = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    got = model.predict({"x": _unaligned(xs[0])})["emb"]
    np.testing.assert_allclose(got, np.tanh(xs[0] @ proj), rtol=1e-5, atol=1e-6)
    outs = model.predict([{"x": _unaligned(x)} for x in xs])
    np.testing.assert_allclose(np.stack([o["emb"] for o in outs]), np.tanh(xs @ proj), rtol=1e-5, atol=1e-6)
    # the 16-byte input: as it is under the default threshold, aligned above a threshold of 0
    assert seen == [4 if align_above is None else 0, 0]


@pytest.mark.parametrize("avx512, env, wide", [
    (True, {}, True),
    (False, {}, False),                                                  # no AVX-512: XLA's default
    (True, {"MLJAX_XLA_DEFAULTS": "0"}, False),                          # opted out of mljax's defaults
    (True, {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}, False),   # the user's own width wins
])
def test_predicts_compile_wide_vectors_only_where_they_may(model_path, monkeypatch, avx512, env, wide):
    """A list predict's executable and one sample's get 512-bit vectors on a CPU with AVX-512
    unless the user opted out or chose a width.  Either way the list predict equals NumPy's and
    the single predicts."""
    import jax
    import mljax.cpu
    from mljax.cpu import WIDE_VECTORS
    monkeypatch.setattr(mljax.cpu, "_has_avx512", lambda: avx512)
    for k in ("MLJAX_XLA_DEFAULTS", "XLA_FLAGS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert mljax.cpu.batched_compiler_options() == (dict(WIDE_VECTORS) if wide else {})
    path, proj = model_path
    m = mljax.MLModel(path)
    name = next(iter(m.input_description))
    xs = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    lowered = m._batched_fn.lower(m.weights, {name: jax.numpy.asarray(xs)}, {})
    assert dict(lowered._lowering._compiler_options_kvs) == (dict(WIDE_VECTORS) if wide else {})
    single = m._predict_fn.lower(m._call_weights(), {name: jax.numpy.asarray(xs[0])}, {})
    assert dict(single._lowering._compiler_options_kvs) == (dict(WIDE_VECTORS) if wide else {})
    outs = m.predict([{name: x} for x in xs])
    for x, out in zip(xs, outs):
        got = next(iter(out.values()))
        np.testing.assert_allclose(got, np.tanh(x @ proj), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got, next(iter(m.predict({name: x}).values())), rtol=1e-6, atol=1e-7)
