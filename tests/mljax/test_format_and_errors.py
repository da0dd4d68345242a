"""Reading packages and blobs, and the clear errors bad input gets."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mljax
from mljax.errors import InputError, ModelFormatError, UnsupportedOpError
from mljax.format.blob import BlobReader, BlobWriter
from mljax.mil.types import DTYPES

from helpers import accumulator_program, convert_mil, tmp_path_for

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil.mil import Builder as mb, types  # noqa: E402

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0


@mb.program(input_specs=[mb.TensorSpec(shape=(2, 3), dtype=types.fp32)], opset_version=ct.target.iOS17)
def _matmul_prog(x):
    return mb.add(x=mb.matmul(x=x, y=W), y=np.float32(1.5))


@pytest.fixture(scope="module")
def package():
    return convert_mil(_matmul_prog)


def _copy(package):
    dst = tmp_path_for("copy.mlpackage")
    shutil.copytree(package, dst)
    return dst


def test_predict_matches_numpy_and_weights_are_arguments(package):
    model = mljax.MLModel(package)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
    (out,) = model.predict({"x": x}).values()
    np.testing.assert_allclose(out, x @ W + 1.5, rtol=1e-6)
    # the weight is a pytree argument, not a baked-in constant
    assert any(np.array_equal(np.asarray(w), W) for w in model.weights.values())


def test_no_retrace_on_repeated_predict(package):
    model = mljax.MLModel(package)
    lowered = model.stage.lowered
    x = np.ones((2, 3), np.float32)
    for _ in range(3):
        model.predict({"x": x})
    assert lowered.trace_count == 1


def test_batch_predict_is_one_vmapped_call(package):
    model = mljax.MLModel(package)
    xs = [np.full((2, 3), i, np.float32) for i in range(4)]
    outs = model.predict([{"x": x} for x in xs])
    for x, o in zip(xs, outs):
        np.testing.assert_allclose(next(iter(o.values())), x @ W + 1.5, rtol=1e-6)
    assert model.stage.lowered.trace_count == 1  # one trace for the whole batch


def test_in_memory_spec_and_bytes(package):
    ct_model = ct.models.MLModel(str(package), skip_model_load=True)
    x = np.ones((2, 3), np.float32)
    expect = x @ W + 1.5
    for source in (ct_model.get_spec(), ct_model.get_spec().SerializeToString()):
        m = mljax.MLModel(source, weights_dir=package / "Data" / "com.apple.CoreML" / "weights")
        np.testing.assert_allclose(next(iter(m.predict({"x": x}).values())), expect, rtol=1e-6)
    m = mljax.MLModel(ct_model)
    np.testing.assert_allclose(next(iter(m.predict({"x": x}).values())), expect, rtol=1e-6)


def test_blob_is_memory_mapped(package):
    reader = BlobReader(package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin")
    model = mljax.MLModel(package)
    program = model.stage.program
    blob_vars = [v for op in program.functions["main"].block.walk() for v in op.outputs if v.blob]
    assert blob_vars
    offset = blob_vars[0].blob[1]
    arr = reader.read(offset, DTYPES["fp32"], (3, 4))
    assert isinstance(arr.base, np.memmap) or isinstance(arr, np.memmap) or arr.base is not None
    np.testing.assert_array_equal(arr, W)


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "int8", "uint8", "int4", "uint4", "uint2", "uint1", "uint3", "uint6"])
def test_blob_write_read_round_trip(dtype):
    dt = DTYPES[dtype]
    rng = np.random.default_rng(1)
    if dt.is_float:
        values = rng.normal(size=(5, 7)).astype(dt.numpy)
    else:
        lo, hi = (-(1 << (dt.bits - 1)), 1 << (dt.bits - 1)) if dtype.startswith("int") else (0, 1 << dt.bits)
        values = rng.integers(lo, hi, size=(5, 7)).astype(dt.numpy)
    path = tmp_path_for("w.bin")
    with BlobWriter(path) as w:
        off1 = w.write(np.zeros(3, np.float32))
        off2 = w.write(values, dt)
    assert off1 % 64 == 0 and off2 % 64 == 0
    got = BlobReader(path).read(off2, dt, values.shape)
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(values, np.float64))


# --- bad input ------------------------------------------------------------------------
def test_input_name_errors(package):
    model = mljax.MLModel(package)
    with pytest.raises(InputError, match=r"missing \['x'\]"):
        model.predict({})
    with pytest.raises(InputError, match=r"unknown \['y'\]"):
        model.predict({"x": np.ones((2, 3)), "y": 1})


def test_input_shape_and_dtype_errors(package):
    model = mljax.MLModel(package)
    with pytest.raises(InputError, match=r"expected shape \(2, 3\); found shape \(3, 2\)"):
        model.predict({"x": np.ones((3, 2), np.float32)})
    with pytest.raises(InputError, match="found shape \\(6,\\)"):
        model.predict({"x": np.ones(6, np.float32)})
    with pytest.raises(InputError, match="numeric"):
        model.predict({"x": np.array([["a"] * 3] * 2)})
    with pytest.raises(InputError, match="dict"):
        model.predict(np.ones((2, 3)))


def test_corrupt_and_truncated_protobuf(package):
    bad = _copy(package)
    spec_file = bad / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec_file.write_bytes(spec_file.read_bytes()[: len(spec_file.read_bytes()) // 2])
    with pytest.raises(ModelFormatError, match="model.mlmodel"):
        mljax.MLModel(bad)
    spec_file.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(ModelFormatError):
        mljax.MLModel(bad)
    with pytest.raises(ModelFormatError, match="does not exist"):
        mljax.MLModel(tmp_path_for("missing.mlmodel"))


def test_truncated_blob(package):
    bad = _copy(package)
    blob = bad / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = blob.read_bytes()
    blob.write_bytes(data[:140])
    with pytest.raises(ModelFormatError, match="weight"):
        mljax.MLModel(bad)
    blob.write_bytes(data[:10])
    with pytest.raises(ModelFormatError, match="header"):
        mljax.MLModel(bad)


def test_weight_offset_outside_blob(package):
    bad = _copy(package)
    spec_file = bad / "Data" / "com.apple.CoreML" / "model.mlmodel"
    from mljax.proto import Model_pb2
    spec = Model_pb2.Model.FromString(spec_file.read_bytes())
    for op in spec.mlProgram.functions["main"].block_specializations["CoreML7"].operations:
        if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
            op.attributes["val"].blobFileValue.offset = 10_000_000
    spec_file.write_bytes(spec.SerializeToString())
    with pytest.raises(ModelFormatError, match="outside"):
        mljax.MLModel(bad)


def test_paths_escaping_the_package_are_refused(package):
    bad = _copy(package)
    manifest = json.loads((bad / "Manifest.json").read_text())
    root = manifest["rootModelIdentifier"]
    manifest["itemInfoEntries"][root]["path"] = "../../etc/passwd"
    (bad / "Manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="escapes"):
        mljax.MLModel(bad)

    bad2 = _copy(package)
    spec_file = bad2 / "Data" / "com.apple.CoreML" / "model.mlmodel"
    from mljax.proto import Model_pb2
    spec = Model_pb2.Model.FromString(spec_file.read_bytes())
    for op in spec.mlProgram.functions["main"].block_specializations["CoreML7"].operations:
        if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
            op.attributes["val"].blobFileValue.fileName = "@model_path/../../../weight.bin"
    spec_file.write_bytes(spec.SerializeToString())
    with pytest.raises(ModelFormatError, match="escapes"):
        mljax.MLModel(bad2)


def test_unsupported_ops_listed_at_load(package):
    bad = _copy(package)
    spec_file = bad / "Data" / "com.apple.CoreML" / "model.mlmodel"
    from mljax.proto import Model_pb2
    spec = Model_pb2.Model.FromString(spec_file.read_bytes())
    ops = spec.mlProgram.functions["main"].block_specializations["CoreML7"].operations
    for op in ops:
        if op.type == "matmul":
            op.type = "frobnicate"
        elif op.type == "add":
            op.type = "quux"
    spec_file.write_bytes(spec.SerializeToString())
    with pytest.raises(UnsupportedOpError) as info:
        mljax.MLModel(bad)
    assert info.value.missing == [("frobnicate", "CoreML7"), ("quux", "CoreML7")]
    assert "frobnicate (CoreML7)" in str(info.value) and "quux (CoreML7)" in str(info.value)


def test_cli_info_and_predict(package):
    out = subprocess.run([sys.executable, "-m", "mljax", "info", str(package)],
                         capture_output=True, text=True, check=True).stdout
    assert "mlProgram" in out and "matmul" in out and "unsupported ops: none" in out
    x = np.ones((2, 3), np.float32)
    xin = tmp_path_for("x.npy")
    np.save(xin, x)
    npz = tmp_path_for("out.npz")
    subprocess.run([sys.executable, "-m", "mljax", "predict", str(package), "--input", f"x={xin}",
                    "--output", str(npz)], capture_output=True, text=True, check=True)
    (got,) = np.load(npz).values()
    np.testing.assert_allclose(got, x @ W + 1.5, rtol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "mljax", "predict", str(package), "--input", "x=nope.npy"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_stateful_model_accumulates_with_mljax_state():
    model = mljax.MLModel(convert_mil(accumulator_program(), opset="iOS18", fp16=True))
    state = model.make_state()
    x = np.array([1, 2, 3], np.float32)
    for i in range(1, 4):
        np.testing.assert_allclose(model.predict({"x": x}, state=state)["out"], i * x)
    np.testing.assert_allclose(state.read("acc"), 3 * x)
    with pytest.raises(InputError, match="stateful"):
        model.predict({"x": x})


def test_data_dependent_output_shape_runs_op_by_op():
    @mb.program(input_specs=[mb.TensorSpec(shape=(6,), dtype=types.fp32)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.non_zero(x=x, name="nz")

    model = mljax.MLModel(convert_mil(prog))
    for x in (np.array([0, 1, 0, 2, 3, 0], np.float32), np.array([5, 0, 0, 0, 0, 1], np.float32)):
        np.testing.assert_array_equal(model.predict({"x": x})["nz"], np.argwhere(x))
    outs = model.predict([{"x": np.eye(6, dtype=np.float32)[i]} for i in range(3)])
    assert [o["nz"].tolist() for o in outs] == [[[0]], [[1]], [[2]]]
