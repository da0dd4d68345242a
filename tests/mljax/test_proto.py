"""Our Core ML schema must match the descriptors coremltools ships, field by field."""
import importlib
from pathlib import Path

import pytest

from mljax.proto import Model_pb2

ct_model_pb2 = pytest.importorskip("coremltools.proto.Model_pb2")

PROTO_DIR = Path(__file__).resolve().parents[2] / "mljax" / "proto"


def _messages(file_descriptor):
    """Every message (nested too) of a file, by name relative to its package."""
    out = {}

    def walk(desc, prefix):
        for m in desc.nested_types if hasattr(desc, "nested_types") else desc.message_types_by_name.values():
            name = prefix + m.name
            out[name] = m
            walk(m, name + ".")

    walk(file_descriptor, "")
    return out


def _canonical(full_name: str) -> str:
    """A type name with our package spelled as Apple's, to compare references across schemas."""
    return "CoreML.Specification" + full_name[len("mljax.spec"):] \
        if full_name.startswith("mljax.spec") else full_name


def _label(f):
    """The field's label, as protobuf 4-7 all expose it."""
    return (f.is_repeated, f.is_required, f.has_presence, f.is_packed)


def _our_files():
    return sorted(p.stem for p in PROTO_DIR.glob("*.proto"))


def test_every_proto_has_a_generated_module():
    for stem in _our_files():
        assert (PROTO_DIR / f"{stem}_pb2.py").is_file(), f"{stem}_pb2.py missing; run scripts/gen_proto.py"


@pytest.mark.parametrize("stem", _our_files())
def test_fields_match_coremltools(stem):
    ours = importlib.import_module(f"mljax.proto.{stem}_pb2").DESCRIPTOR
    theirs = importlib.import_module(f"coremltools.proto.{stem}_pb2").DESCRIPTOR
    ours_msgs, their_msgs = _messages(ours), _messages(theirs)
    assert set(ours_msgs) == set(their_msgs), f"{stem}: messages differ"
    checked = 0
    for name, mine in ours_msgs.items():
        ref = their_msgs[name]
        mine_fields = {f.number: f for f in mine.fields}
        ref_fields = {f.number: f for f in ref.fields}
        assert set(mine_fields) == set(ref_fields), f"{name}: field numbers differ"
        for number, f in mine_fields.items():
            g = ref_fields[number]
            where = f"{name}.{g.name} = {number}"
            assert f.name == g.name, where
            assert f.type == g.type, f"{where}: type {f.type} vs {g.type}"
            assert _label(f) == _label(g), f"{where}: label (repeated, required, presence, packed)"
            if f.message_type is not None:
                assert _canonical(f.message_type.full_name) == g.message_type.full_name, where
            if f.enum_type is not None:
                assert [(v.name, v.number) for v in f.enum_type.values] == \
                    [(v.name, v.number) for v in g.enum_type.values], where
            mine_oneof = f.containing_oneof.name if f.containing_oneof else None
            ref_oneof = g.containing_oneof.name if g.containing_oneof else None
            assert mine_oneof == ref_oneof, f"{where}: oneof"
            checked += 1
    for name, e in ours.enum_types_by_name.items():
        ref = theirs.enum_types_by_name[name]
        assert [(v.name, v.number) for v in e.values] == [(v.name, v.number) for v in ref.values]
    assert len(ours_msgs) == len(their_msgs) > 0 or checked == 0


def test_a_coremltools_spec_round_trips_through_our_schema():
    import coremltools as ct
    from coremltools.models.neural_network import NeuralNetworkBuilder
    from coremltools.models import datatypes
    import numpy as np

    b = NeuralNetworkBuilder([("x", datatypes.Array(3))], [("y", datatypes.Array(2))])
    b.add_inner_product("fc", W=np.ones((2, 3), np.float32), b=np.zeros(2, np.float32),
                        input_channels=3, output_channels=2, has_bias=True,
                        input_name="x", output_name="y")
    data = b.spec.SerializeToString()
    ours = Model_pb2.Model.FromString(data)
    assert ours.SerializeToString() == data
    assert ours.neuralNetwork.layers[0].innerProduct.outputChannels == 2
    assert list(ours.neuralNetwork.layers[0].innerProduct.weights.floatValue) == [1.0] * 6
