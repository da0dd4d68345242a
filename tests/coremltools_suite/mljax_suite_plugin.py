"""pytest plugin: run coremltools' own MIL op tests with mljax as the prediction backend.

Load it with ``-p mljax_suite_plugin`` (this folder on ``PYTHONPATH``), as
``scripts/conformance.py`` does.  At configure time, before any coremltools test module
is imported, it

* makes coremltools believe it runs on macOS 15 (``--mljax-macos-version``; ``_deps._IS_MACOS``,
  ``models.utils._is_macos``, ``models.utils._macos_version``), so the tests call
  ``MLModel.predict`` and compare its outputs with their expected values;
* restricts the backends to ML programs (``PYMIL_TEST_TARGETS=mlprogram``; items
  parametrized with the neuralnetwork backend are deselected as well), unless
  ``--mljax-allow-neuralnetwork`` is given (then ``PYMIL_TEST_TARGETS`` is left as set);
* with ``--mljax-synthetic-boston``, replaces ``coremltools.test.utils.load_boston`` (which
  downloads the Boston housing data) with a seeded synthetic data set of the same shape and
  column character, so the scikit-learn and pipeline tests run offline;
* enables :mod:`mljax.coremltools`, so ``predict`` / ``make_state`` run on mljax.

Every test is recorded as one JSON line (``--mljax-results DIR``): whether it reached
``predict``, its outcome, and for a failure its category, the op concerned and a message.
Only tests that reach ``predict`` test mljax; the others are reported but not counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

_REACHED: dict = {}
_OUT: list = []        # [file handle]
_TIMEOUT = [0.0]


class SuiteTimeout(Exception):
    """A test ran past --mljax-timeout seconds."""


# --- configuration ----------------------------------------------------------------------
def pytest_addoption(parser):
    group = parser.getgroup("mljax", "coremltools suite on mljax")
    group.addoption("--mljax-results", default=None,
                    help="folder for per-process JSON-lines results (one line per test)")
    group.addoption("--mljax-timeout", type=float, default=300.0,
                    help="seconds per test before it is failed as a timeout (0: none)")
    group.addoption("--mljax-fp32-compute", action="store_true",
                    help="run fp16 programs with fp32 compute (Core ML CPU behaviour)")
    group.addoption("--mljax-select", default=None,
                    help="file of node ids (one a line, '#' comments): run only those")
    group.addoption("--mljax-skip", default=None,
                    help="file of node ids already run (one a line): deselect them (resuming a run)")
    group.addoption("--mljax-every", type=int, default=0,
                    help="run a fixed 1-in-K sample (by a stable hash of the node id)")
    group.addoption("--mljax-allow-neuralnetwork", action="store_true",
                    help="keep neuralnetwork-backend tests (PYMIL_TEST_TARGETS is not forced)")
    group.addoption("--mljax-full-gc", action="store_true",
                    help="keep ct.convert's full gc.collect() per conversion (slow; off by default)")
    group.addoption("--mljax-synthetic-boston", action="store_true",
                    help="serve coremltools.test.utils.load_boston from a seeded synthetic data set")
    group.addoption("--mljax-macos-version", default="15.0",
                    help="the macOS version coremltools is told it runs on (10.15 runs the XGBoost tests "
                         "that coremltools skips on macOS >= 10.16 for a Core ML bug, rdar://84898245)")


def _pretend_macos(allow_nn: bool = False, version: tuple = (15, 0)) -> None:
    if not allow_nn:
        os.environ.setdefault("PYMIL_TEST_TARGETS", "mlprogram")
    import coremltools._deps as deps
    import coremltools.models.utils as ct_utils
    deps._IS_MACOS = True
    originals = {"_is_macos": ct_utils._is_macos, "_macos_version": ct_utils._macos_version}
    fakes = {"_is_macos": lambda: True, "_macos_version": lambda: version}
    # also where they were imported by name (e.g. neural_network.quantization_utils)
    for mod in [m for name, m in list(sys.modules.items()) if name.startswith("coremltools") and m]:
        for attr, fn in originals.items():
            if getattr(mod, attr, None) is fn:
                setattr(mod, attr, fakes[attr])
    loaded = [m for m in sys.modules if m.startswith("coremltools.converters.mil.testing_utils")]
    if loaded:
        raise RuntimeError(f"mljax_suite_plugin must load before coremltools' tests; found {loaded} imported")


def synthetic_boston(seed: int = 0) -> dict:
    """A stand-in for the Boston housing data: 506 rows, 13 features with the real columns'
    ranges and kinds (CHAS binary, RAD and TAX integer-valued), a target in [5, 50]."""
    rng = np.random.default_rng(seed)
    n = 506
    cols = [
        rng.exponential(3.6, n),                                       # CRIM
        np.where(rng.random(n) < 0.7, 0.0, rng.choice([12.5, 20.0, 25.0, 80.0], n)),  # ZN
        rng.uniform(0.5, 27.7, n),                                     # INDUS
        (rng.random(n) < 0.07).astype(float),                          # CHAS
        rng.uniform(0.385, 0.871, n),                                  # NOX
        rng.normal(6.28, 0.7, n).clip(3.56, 8.78),                     # RM
        rng.uniform(2.9, 100.0, n),                                    # AGE
        rng.uniform(1.13, 12.1, n),                                    # DIS
        rng.choice([1.0, 2, 3, 4, 5, 6, 7, 8, 24], n),                 # RAD
        rng.integers(187, 712, n).astype(float),                       # TAX
        rng.uniform(12.6, 22.0, n).round(1),                           # PTRATIO
        rng.uniform(0.32, 396.9, n),                                   # B
        rng.uniform(1.73, 37.97, n),                                   # LSTAT
    ]
    data = np.ascontiguousarray(np.stack(cols, axis=1))
    target = (22.5 + 6.0 * (data[:, 5] - 6.28) - 0.5 * (data[:, 12] - 12.6)
              - 0.1 * data[:, 0] + rng.normal(0, 3.0, n)).clip(5.0, 50.0)
    names = np.array(["CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD",
                      "TAX", "PTRATIO", "B", "LSTAT"], dtype="<U7")
    return {"data": data, "target": target, "feature_names": names}


def _patch_boston() -> None:
    import coremltools.test.utils as ct_test_utils
    ct_test_utils.load_boston = synthetic_boston


def pytest_configure(config):
    _pretend_macos(config.getoption("--mljax-allow-neuralnetwork"),
                   tuple(int(v) for v in config.getoption("--mljax-macos-version").split(".")))
    if not config.getoption("--mljax-full-gc"):
        from ct_speed import skip_full_gc_per_convert
        skip_full_gc_per_convert()
    if config.getoption("--mljax-synthetic-boston"):
        _patch_boston()
    import mljax.coremltools as bridge
    # exact declared types: coremltools' fp16 references carry fp16 rounding the tests may depend on
    bridge.enable(compute_precision="float32" if config.getoption("--mljax-fp32-compute") else "declared")
    _wrap_predict()
    _TIMEOUT[0] = config.getoption("--mljax-timeout") or 0.0
    folder = config.getoption("--mljax-results")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        _OUT.append(open(Path(folder) / f"results-{worker}-{os.getpid()}.jsonl", "a"))


def pytest_unconfigure(config):
    for f in _OUT:
        f.close()
    _OUT.clear()


def stable_hash(nodeid: str) -> int:
    """A hash of a node id that is the same in every process and on every machine."""
    return int(hashlib.sha1(nodeid.encode()).hexdigest()[:12], 16)


def in_sample(nodeid: str, every: int) -> bool:
    """The fixed 1-in-``every`` sample of the suite."""
    return every <= 1 or stable_hash(nodeid) % every == 0


def read_nodeids(path) -> list[str]:
    lines = (ln.strip() for ln in Path(path).read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--mljax-select")
    wanted = set(read_nodeids(wanted)) if wanted else None
    skip = config.getoption("--mljax-skip")
    skip = set(read_nodeids(skip)) if skip else set()
    every = config.getoption("--mljax-every")
    allow_nn = config.getoption("--mljax-allow-neuralnetwork")
    keep, drop = [], []
    for item in items:
        ok = ((allow_nn or "neuralnetwork" not in item.nodeid) and in_sample(item.nodeid, every)
              and (wanted is None or item.nodeid in wanted) and item.nodeid not in skip)
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# --- recording predict --------------------------------------------------------------------
def _program_ops(ct_model) -> list[str]:
    """Op types of the model's ML program (all functions, nested blocks), consts left out."""
    try:
        spec = ct_model._spec
    except AttributeError:
        return []
    if spec.WhichOneof("Type") != "mlProgram":
        return [spec.WhichOneof("Type")]
    seen: dict[str, None] = {}

    def walk(block):
        for op in block.operations:
            if op.type != "const":
                seen.setdefault(op.type)
            for b in op.blocks:
                walk(b)
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return list(seen)


def _recording(method):
    """Wrap a bridge method: mark the test as having reached mljax, time it, keep its error."""
    def wrapper(self, *args, **kwargs):
        _REACHED["reached"] = True
        _REACHED.setdefault("ops", _program_ops(self))
        start = time.monotonic()
        try:
            return method(self, *args, **kwargs)
        except BaseException as e:   # noqa: BLE001 - recorded, then re-raised unchanged
            _REACHED.setdefault("predict_error", e)
            raise
        finally:
            _REACHED["predict_seconds"] = _REACHED.get("predict_seconds", 0.0) + time.monotonic() - start
    wrapper._mljax_suite = True
    wrapper.__doc__ = method.__doc__
    return wrapper


def _wrap_predict() -> None:
    """Record every call of ``predict`` and ``make_state`` (both build and run the mljax model)."""
    from coremltools.models import model as ct_model
    for name in ("predict", "make_state"):
        method = getattr(ct_model.MLModel, name)
        if not getattr(method, "_mljax_suite", False):
            setattr(ct_model.MLModel, name, _recording(method))


# --- per-test bookkeeping -------------------------------------------------------------------
def _alarm(signum, frame):
    raise SuiteTimeout(f"test ran past {_TIMEOUT[0]:.0f} s")


def pytest_runtest_logstart(nodeid, location):
    _REACHED.clear()
    _REACHED["start"] = time.monotonic()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _TIMEOUT[0] > 0 and hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, _TIMEOUT[0])


def pytest_runtest_teardown(item, nextitem):
    if _TIMEOUT[0] > 0 and hasattr(signal, "SIGALRM"):
        signal.setitimer(signal.ITIMER_REAL, 0)


_OP_IN_LOWERING = re.compile(r"op '[^']*' \(([A-Za-z0-9_]+), iOS\d+\)")


def _op_from_traceback(exc: BaseException) -> str | None:
    """The MIL op type being lowered when ``exc`` was raised (mljax/lower.py's ``_call``)."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_call" and "mljax" in frame.f_code.co_filename:
            op = frame.f_locals.get("op")
            found = getattr(op, "type", found)
        tb = tb.tb_next
    if found is None:
        m = _OP_IN_LOWERING.search(str(exc))
        found = m.group(1) if m else None
    return found


def _test_op(item) -> str:
    """The op a test class is about: ``TestConvTranspose`` -> ``conv_transpose``."""
    cls = getattr(item, "cls", None)
    name = cls.__name__ if cls is not None else item.name.split("[")[0]
    name = re.sub(r"^Test_?", "", name)
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _first_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _classify(exc: BaseException | None, item) -> dict:
    """Failure category, the op blamed, and a one-line message."""
    from mljax.errors import MLJaxError, UnsupportedOpError
    pred_exc = _REACHED.get("predict_error")
    if exc is None:
        return {"category": "unknown", "op": _test_op(item), "message": ""}
    if isinstance(exc, SuiteTimeout):
        return {"category": "timeout", "op": _test_op(item), "message": str(exc)}
    if pred_exc is not None and exc is pred_exc:
        if isinstance(exc, UnsupportedOpError):
            ops = sorted({op for op, _ in exc.missing})
            return {"category": "unsupported_op", "op": ",".join(ops), "message": _first_line(exc)}
        op = _op_from_traceback(exc) or _test_op(item)
        kind = "mljax_error" if isinstance(exc, MLJaxError) else "crash_in_predict"
        return {"category": kind, "op": op,
                "message": f"{type(exc).__name__}: {_first_line(exc)}"}
    if isinstance(exc, AssertionError):
        text = str(exc)
        kind = "shape_mismatch" if "shape" in text and "Not equal to tolerance" not in text else "value_mismatch"
        return {"category": kind, "op": _test_op(item), "message": _first_line(_assert_summary(text))}
    return {"category": "error_after_predict", "op": _test_op(item),
            "message": f"{type(exc).__name__}: {_first_line(exc)}"}


def _assert_summary(text: str) -> str:
    """numpy's assert_allclose text -> 'Mismatched elements ...; Max absolute difference ...'."""
    parts = [ln.strip() for ln in text.splitlines()
             if ln.strip().startswith(("Mismatched elements", "Max absolute", "Max relative"))]
    return "; ".join(parts) if parts else text


def pytest_runtest_makereport(item, call):
    if call.when != "call" and not (call.when == "setup" and call.excinfo is not None):
        return
    reached = bool(_REACHED.get("reached"))
    exc = call.excinfo.value if call.excinfo is not None else None
    skipped = call.excinfo is not None and call.excinfo.typename in ("Skipped", "XFailed")
    if call.excinfo is None:
        outcome = "passed"
    elif skipped:
        outcome = "skipped"
    else:
        outcome = "failed"
    rec = {"nodeid": item.nodeid, "file": item.nodeid.split("::")[0], "outcome": outcome,
           "reached": reached, "seconds": round(time.monotonic() - _REACHED.get("start", time.monotonic()), 3),
           "predict_seconds": round(_REACHED.get("predict_seconds", 0.0), 3),
           "ops": _REACHED.get("ops", [])}
    if outcome == "failed":
        rec.update(_classify(exc, item))
        if not reached:
            rec["category"] = "before_predict"
    elif outcome == "skipped":
        rec["message"] = _first_line(getattr(exc, "msg", exc) if exc is not None else "")
    if _OUT:
        _OUT[0].write(json.dumps(rec) + "\n")
        _OUT[0].flush()

