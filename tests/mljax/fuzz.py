"""A fuzzer for mljax's boundaries: mutated models, corrupt files, file-system tricks, bad inputs.

Seeds are real models written by coremltools (ML programs fp32/fp16 with a while_loop, a
NeuralNetwork classifier, scikit-learn classic models, a pipeline).  Each case is one callable;
:func:`run_case` runs it under a timeout and classifies the outcome:

* ``ok``: the model loaded and predicted (or the update ran) — a correct outcome for a bad-but-
  valid model; for inputs the seed's own prediction is checked where it is known,
* ``error:<Class>``: an ``mljax.errors`` exception (the intended outcome of a bad case),
* ``raw:<Class>``: any other exception (a bug), ``timeout`` (a hang: a bug).

``cases(seeds, rng, n)`` yields ``(category, name, fn, must_fail)``; the same rng seed gives
the same cases; ``run_all`` runs them into :class:`Record` s.  ``tests/mljax/test_fuzz.py`` runs a fixed sample; ``MLJAX_FUZZ=full`` runs many more and
``scripts/reliability.py`` writes the tally to docs/reliability.md.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf.descriptor import FieldDescriptor as FD

import mljax
from mljax.errors import MLJaxError
from mljax.proto import Model_pb2

from helpers import tmp_path_for

CORE = Path("Data", "com.apple.CoreML")


# --- seeds -------------------------------------------------------------------------------------
@dataclass
class Seed:
    name: str
    path: Path            # a saved .mlpackage or .mlmodel
    inputs: dict          # a valid input
    updatable: bool = False

    @property
    def is_package(self) -> bool:
        return self.path.is_dir()


def _mlprogram_fp32():
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb, types
    w = np.linspace(-1, 1, 3 * 40, dtype=np.float32).reshape(3, 40)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        y = mb.relu(x=mb.add(x=mb.matmul(x=x, y=w), y=np.float32(0.5)))
        return mb.reduce_sum(x=mb.reshape(x=y, shape=[2, 4, 10]), axes=[2], name="out")
    return prog


def _mlprogram_fp16_loop():
    import coremltools as ct
    from coremltools.converters.mil.mil import Builder as mb, types
    w = np.linspace(-0.5, 0.5, 64 * 4, dtype=np.float32).reshape(4, 64)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def prog(x):
        def cond(i, acc):
            return mb.less(x=i, y=np.int32(3))

        def body(i, acc):
            return mb.add(x=i, y=np.int32(1)), mb.mul(x=acc, y=np.float32(0.9))
        _, acc = mb.while_loop(_cond=cond, _body=body, loop_vars=(np.int32(0), x))
        return mb.softmax(x=mb.matmul(x=acc, y=w), axis=-1, name="out")
    return prog


def build_seeds() -> list[Seed]:
    """Every seed model, converted and saved by coremltools."""
    import coremltools as ct
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, SVR
    from sklearn.tree import DecisionTreeRegressor

    from helpers import convert_mil
    seeds = [Seed("mlprogram-fp32", convert_mil(_mlprogram_fp32()), {"x": np.ones((2, 3), np.float32)}),
             Seed("mlprogram-fp16-while", convert_mil(_mlprogram_fp16_loop(), opset="iOS16", fp16=True),
                  {"x": np.full((1, 4), 0.5, np.float32)})]
    from models import dense_classifier   # tests/updatable (on sys.path via tests/conftest.py)
    seeds.append(Seed("neuralnetwork-classifier", dense_classifier()[0],
                      {"features": np.linspace(-1, 1, 6).astype(np.float32)}, updatable=True))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name, sk in [("svc", SVC(probability=True).fit(X, y)), ("svr", SVR().fit(X, X[:, 0])),
                     ("knn", KNeighborsClassifier(3).fit(X, y)), ("glm", LogisticRegression(multi_class="ovr").fit(X, y)),
                     ("tree", DecisionTreeRegressor(max_depth=3).fit(X, X[:, 0])),
                     ("pipeline", make_pipeline(StandardScaler(), LogisticRegression(multi_class="ovr")).fit(X, y))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ct.converters.sklearn.convert(sk)
        path = tmp_path_for(f"{name}.mlmodel")
        model.save(str(path))
        feat = model.get_spec().description.input[0].name
        seeds.append(Seed(f"sklearn-{name}", path, {feat: X[0]}))
    return seeds


# --- running one case ----------------------------------------------------------------------------
class _Timeout(BaseException):
    pass


def run_case(fn, timeout: float = 20.0) -> str:
    """The outcome of ``fn()``: ``ok``, ``error:<Class>``, ``raw:<Class>: message`` or ``timeout``."""
    def alarm(*_):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        fn()
        return "ok"
    except _Timeout:
        return "timeout"
    except MLJaxError as e:
        return f"error:{type(e).__name__}"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:   # noqa: BLE001 - the point is to catch what leaks
        where = traceback.extract_tb(e.__traceback__)[-1]
        return f"raw:{type(e).__name__}: {str(e)[:200]} [{Path(where.filename).name}:{where.lineno}]"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _load_and_predict(path_or_spec, seed: Seed, inputs=None):
    weights = seed.path / CORE / "weights" if seed.is_package else None
    model = mljax.MLModel(path_or_spec, weights_dir=weights) if not isinstance(path_or_spec, (str, Path)) \
        else mljax.MLModel(path_or_spec)
    model.predict(seed.inputs if inputs is None else inputs)


def _spec_of(seed: Seed) -> Model_pb2.Model:
    from mljax.format.package import load_spec
    return load_spec(seed.path).spec


# --- structured protobuf mutations ---------------------------------------------------------------
_INTS = [0, 1, -1, 2, 3, 7, 64, 255, 2**16, 2**31 - 1, -(2**31), 2**40, 2**63 - 1]
_FLOATS = [0.0, -1.0, 1e30, -1e30, float("nan"), float("inf"), 1e-30]
_STRINGS = ["", "x", "../../etc/passwd", "@model_path/../../x", "@model_path/weights/nope.bin",
            "\u00e9\u00e9", "a" * 300, "main", "CoreML99"]


def _fields(msg, out, depth=0):
    """Every (message, field) pair reachable from ``msg`` (set fields, and unset scalars of set messages)."""
    if depth > 40:
        return out
    for fd in msg.DESCRIPTOR.fields:
        out.append((msg, fd))
        if fd.type != FD.TYPE_MESSAGE:
            continue
        if _is_repeated(fd):
            items = getattr(msg, fd.name)
            # map entries in key order: the same rng seed picks the same fields in every process
            values = [items[k] for k in sorted(items)] if _is_map(fd) else items
            for sub in list(values)[:8]:
                if hasattr(sub, "DESCRIPTOR"):
                    _fields(sub, out, depth + 1)
        elif msg.HasField(fd.name):
            _fields(getattr(msg, fd.name), out, depth + 1)
    return out


def _is_repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == FD.LABEL_REPEATED


def _is_map(fd) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _mutate_field(msg, fd, rng) -> None:
    name = fd.name
    if _is_repeated(fd):
        items = getattr(msg, name)
        if _is_map(fd):
            keys = sorted(items.keys())
            if keys and rng.random() < 0.7:
                del items[keys[rng.integers(len(keys))]]
            return
        n = len(items)
        choice = rng.integers(4)
        if n and choice == 0:
            del items[int(rng.integers(n))]
        elif n and choice == 1 and fd.type == FD.TYPE_MESSAGE:
            items.add().CopyFrom(items[int(rng.integers(n))])
        elif choice == 2:
            del items[:]
        elif fd.type != FD.TYPE_MESSAGE:
            items.append(_scalar(fd, rng))
        elif n:
            del items[int(rng.integers(n)):]
        return
    if fd.type == FD.TYPE_MESSAGE:
        if msg.HasField(name):
            msg.ClearField(name)
        else:
            getattr(msg, name).SetInParent()
        return
    setattr(msg, name, _scalar(fd, rng))


def _scalar(fd, rng):
    t = fd.type
    if t == FD.TYPE_BOOL:
        return bool(rng.integers(2))
    if t in (FD.TYPE_STRING,):
        return _STRINGS[rng.integers(len(_STRINGS))]
    if t == FD.TYPE_BYTES:
        return bytes(rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8))
    if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return _FLOATS[rng.integers(len(_FLOATS))]
    if t == FD.TYPE_ENUM:
        values = [v.number for v in fd.enum_type.values]
        return int(rng.choice(values + [max(values) + 1, 999, -5]))
    value = int(_INTS[rng.integers(len(_INTS))])
    bits = 32 if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32, FD.TYPE_UINT32, FD.TYPE_FIXED32) else 64
    if t in (FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_FIXED32, FD.TYPE_FIXED64):
        return abs(value) % (1 << bits)
    return max(-(1 << (bits - 1)), min(value, (1 << (bits - 1)) - 1))


def mutate_spec(spec, rng, n: int):
    out = Model_pb2.Model()
    out.CopyFrom(spec)
    done = 0
    for _ in range(n * 5):
        fields = _fields(out, [])
        msg, fd = fields[int(rng.integers(len(fields)))]
        try:
            _mutate_field(msg, fd, rng)
            done += 1
        except (ValueError, TypeError, AttributeError, KeyError):
            continue
        if done >= n:
            break
    return out


# --- the case generators ---------------------------------------------------------------------------
def _proto_cases(seed, rng, count):
    spec = _spec_of(seed)
    for i in range(count):
        mutated = mutate_spec(spec, rng, int(rng.integers(1, 4)))
        as_bytes = i % 3 == 0
        data = mutated.SerializeToString() if as_bytes else mutated
        yield "protobuf", f"{seed.name}#{i}", (lambda d=data: _load_and_predict(d, seed)), False


def _copy_package(seed) -> Path:
    dst = tmp_path_for(f"fuzz-{seed.name}" + (".mlpackage" if seed.is_package else ".mlmodel"))
    (shutil.copytree if seed.is_package else shutil.copy)(seed.path, dst)
    return dst


def _blob_cases(seed, rng, count):
    if not seed.is_package:
        return
    blob = seed.path / CORE / "weights" / "weight.bin"
    data = blob.read_bytes()
    for i in range(count):
        raw = bytearray(data)
        kind = i % 4
        if kind == 0:      # a header or record field set to an interesting value
            pos = int(rng.choice([0, 4] + [64 * k + o for k in range(1, min(4, len(raw) // 64)) for o in (0, 4, 8, 16, 24)]))
            raw[pos:pos + 8] = struct.pack("<Q", int(rng.choice([0, 1, 2, 7, 99, 2**31, 2**63 - 1])) & (2**64 - 1))
        elif kind == 1:    # truncated
            raw = raw[: int(rng.integers(0, len(raw)))]
        elif kind == 2:    # random bytes flipped
            for p in rng.integers(0, len(raw), 8):
                raw[p] ^= 0xFF
        else:              # the dtype code of the first record
            raw[68:72] = struct.pack("<I", int(rng.integers(0, 20)))

        def case(raw=bytes(raw)):
            pkg = _copy_package(seed)
            (pkg / CORE / "weights" / "weight.bin").write_bytes(raw)
            _load_and_predict(pkg, seed)
        yield "blob", f"{seed.name}#{i}", case, False


def _manifest_cases(seed, rng, count):
    if not seed.is_package:
        return
    info = json.loads((seed.path / "Manifest.json").read_text())
    root = info["rootModelIdentifier"]
    edits = [
        lambda m: m.pop("rootModelIdentifier"), lambda m: m.update(rootModelIdentifier="nope"),
        lambda m: m.update(itemInfoEntries=[]), lambda m: m["itemInfoEntries"][root].update(path=None),
        lambda m: m["itemInfoEntries"][root].update(path="../Manifest.json"),
        lambda m: m["itemInfoEntries"][root].update(path="/etc/passwd"),
        lambda m: m["itemInfoEntries"][root].update(path="com.apple.CoreML/weights"),
        lambda m: m["itemInfoEntries"][root].update(path="x" * 5000),
        lambda m: m["itemInfoEntries"][root].update(path="a\u0000b"),
        lambda m: m.update(rootModelIdentifier=["list"]),
    ]
    texts = ["", "{", "[]", "null", "[" * 50_000 + "]" * 50_000, '{"a": 1}' + " " * (3 << 20)]
    for i in range(count):
        if i < len(texts):
            text = texts[i]
        else:
            m = json.loads(json.dumps(info))
            edits[int(rng.integers(len(edits)))](m)
            text = json.dumps(m)

        def case(text=text):
            pkg = _copy_package(seed)
            (pkg / "Manifest.json").write_text(text)
            _load_and_predict(pkg, seed)
        yield "manifest", f"{seed.name}#{i}", case, True


def _fs_cases(seed):
    if not seed.is_package:
        return
    outside = seed.path

    def replace(rel, make):
        def case():
            pkg = _copy_package(seed)
            p = pkg / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif os.path.lexists(p):
                p.unlink()
            make(p)
            _load_and_predict(pkg, seed)
        return case

    targets = ["Manifest.json", "Data", str(CORE), str(CORE / "model.mlmodel"), str(CORE / "weights"),
               str(CORE / "weights" / "weight.bin")]
    for rel in targets:
        # the outside target is a complete model: loading it would be "ok", so each must fail
        yield "filesystem", f"{seed.name}:{rel}->outside", replace(rel, lambda p, r=rel: p.symlink_to(outside / r)), True
        yield "filesystem", f"{seed.name}:{rel}->loop", replace(rel, lambda p: p.symlink_to(p)), True
        yield "filesystem", f"{seed.name}:{rel}->/dev/zero", replace(rel, lambda p: p.symlink_to("/dev/zero")), True
        yield "filesystem", f"{seed.name}:{rel}=fifo", replace(rel, os.mkfifo), True
        yield "filesystem", f"{seed.name}:{rel}=folder", replace(rel, os.mkdir), True
        yield "filesystem", f"{seed.name}:{rel}=missing", replace(rel, lambda p: None), True


def _bad_values(value):
    arr = np.asarray(value)
    return [None, "a string", {"a": 1}, [1, [2, 3]], [[1, 2], [3]], b"bytes", object(), np.array([]),
            arr.astype(str), arr[..., None], np.zeros((0,) + arr.shape), arr.ravel()[:1],
            np.zeros(arr.shape, np.complex64)] + ([] if arr.size == 1 else [float("nan"), 3, True])


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (np.array_equal(np.asarray(a[k]), np.asarray(b[k])) if not isinstance(a[k], dict) else a[k] == b[k]) for k in a)


def _check(ok: bool) -> None:
    assert ok


def _input_cases(seed):
    model = []

    def loaded():
        if not model:
            model.append(mljax.MLModel(seed.path))
        return model[0]
    name = next(iter(seed.inputs))
    value = seed.inputs[name]

    def same_as_seed(b):
        got, want = loaded().predict({**seed.inputs, name: b}), loaded().predict(seed.inputs)
        assert _equal(got, want), f"{name}={b!r} predicted {got}, the same input as an array {want}"
    for j, bad in enumerate(_bad_values(value)):
        yield "input", f"{seed.name}:{name}#{j}", (lambda b=bad: loaded().predict({**seed.inputs, name: b})), True
    yield "input", f"{seed.name}:{name}=list", (lambda: same_as_seed(np.asarray(value).tolist())), False
    yield "input", f"{seed.name}:{name}=inf", (lambda: loaded().predict({**seed.inputs, name: np.full(np.shape(value), np.inf)})), False
    for j, data in enumerate([{}, [{}], None, 5, "x", [seed.inputs, {}], [seed.inputs] * 3 + [5],
                              {**seed.inputs, "extra": 1}]):
        yield "input", f"{seed.name}:call#{j}", (lambda d=data: loaded().predict(d)), True
    yield "input", f"{seed.name}:empty-list", (lambda: _check(loaded().predict([]) == [])), False


def _update_cases(seed):
    if not seed.updatable:
        return
    import updatable
    base = [{"features": np.linspace(-1, 1, 6).astype(np.float32), "label": "a"}] * 4
    datas = [None, "data", 5, [], [None], [{"features": "x", "label": "a"}], [{"features": None, "label": "a"}],
             [{"features": np.ones(6), "label": {"a": 1}}], [{"features": np.ones(6), "label": np.ones((2, 2))}],
             [{"features": np.ones(6)}], [{"label": "a"}], [{"features": [[1, 2], [3]], "label": "a"}],
             [{"features": np.ones(6), "label": "zzz"}], {"features": np.ones(6), "label": "a"}]
    params = [[("epochs", 1)], "epochs", {"epochs": 10.5}, {"epochs": "10"}, {"epochs": 0}, {"epochs": -1},
              {"epochs": float("inf")}, {"epochs": 10**9}, {"shuffle": "no"}, {"seed": -1}, {"seed": 2.5},
              {"learningRate": -1}, {"learningRate": "x"}, {"miniBatchSize": 0}, {"nope": 1}, {"epochs": True}]

    def run(data=base, parameters=None, handler=None):
        model = mljax.MLModel(seed.path)
        updatable.UpdateTask(model, data, parameters=parameters, progress_handler=handler).run()
    for j, d in enumerate(datas):
        yield "update", f"{seed.name}:data#{j}", (lambda d=d: run(d)), True
    for j, p in enumerate(params):
        yield "update", f"{seed.name}:params#{j}", (lambda p=p: run(parameters=p)), True

    def boom(ctx):
        raise RuntimeError("handler failed")
    yield "update", f"{seed.name}:handler-raises", (lambda: run(handler=boom)), True
    yield "update", f"{seed.name}:valid", (lambda: run()), False


@dataclass
class Record:
    category: str
    name: str
    outcome: str
    seconds: float
    must_fail: bool

    @property
    def passed(self) -> bool:
        """An mljax error, or a prediction where one is allowed (never a raw exception or a hang)."""
        return self.outcome.startswith("error:") or (self.outcome == "ok" and not self.must_fail)


def run_all(case_list, timeout: float = 20.0) -> list[Record]:
    import time
    records = []
    for category, name, fn, must_fail in case_list:
        start = time.perf_counter()
        outcome = run_case(fn, timeout)
        records.append(Record(category, name, outcome, time.perf_counter() - start, must_fail))
    return records


def cases(seeds: list[Seed], rng: np.random.Generator, n: int):
    """All cases as ``(category, name, fn, must_fail)``: ``n`` protobuf mutations per seed (a
    quarter as many blob and Manifest corruptions), plus every fixed file-system trick, bad
    input and bad update.  ``must_fail``: only an mljax error is a correct outcome."""
    for seed in seeds:
        yield from _proto_cases(seed, rng, n)
        yield from _blob_cases(seed, rng, max(4, n // 4))
        yield from _manifest_cases(seed, rng, max(8, n // 4))
        yield from _fs_cases(seed)
        yield from _input_cases(seed)
        yield from _update_cases(seed)
