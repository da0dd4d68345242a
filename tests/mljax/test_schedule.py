"""Chunk plans (mljax.schedule): a list predict runs a program's activation-heavy prefix over
chunks of samples, the rest over the whole batch, with the values of one predict per sample."""
import numpy as np
import pytest

import mljax
from helpers import convert_torch_twins
from mljax import schedule
from mljax.schedule import Step, chunk_plan

KiB = 1 << 10


def _steps(*specs):
    """Steps of a chain ``x -> a0 -> a1 -> ...``: (output KiB per sample, weight KiB[, own chunks])."""
    out, prev = [], "x"
    for i, (kib, w, *own) in enumerate(specs):
        out.append(Step(frozenset({prev}), ((f"a{i}", kib * KiB),), w * KiB, bool(own and own[0])))
        prev = f"a{i}"
    return out


def test_the_prefix_ends_at_the_last_heavy_op_and_chunks_fit_the_target():
    # n=32, heavy from 256 KiB per sample (8 MiB / 32): a0..a2 are, a3 (128 KiB) is not
    steps = _steps((512, 1), (1024, 0), (256, 4), (128, 300), (64, 600), (1, 2000))
    plan = chunk_plan(steps, {"x": 192 * KiB}, ["a5"], 32)
    # the cut may move past the last heavy op (a2) to where the fewest bytes cross: after a5 the
    # live set is the 1 KiB output, but the window reaches it, so the cut is at the end
    assert plan.cut == 6 and plan.live == ("a5",)
    # the largest activation in the prefix is 1024 KiB: 8 MiB / 1 MiB = 8 samples per chunk
    assert plan.chunk == 8
    assert chunk_plan(steps, {"x": 192 * KiB}, ["a5"], 32, target=3 * 1024 * KiB).chunk == 2
    # the batch's divisors only: 12 samples, at most 8 per chunk -> 6
    assert chunk_plan(steps, {"x": 192 * KiB}, ["a5"], 12, heavy=1).chunk == 6


def test_a_prefix_of_light_weights_gets_chunks_of_a_quarter_of_the_target():
    # the same activations as above: with 1 MiB of weights or less in the prefix (a CNN's stem)
    # the largest activation (1024 KiB) fits 2 MiB twice, with more (a transformer) 8 MiB 8 times
    light = _steps((512, 1), (1024, 0), (256, 4), (128, 300), (64, 600), (1, 100))
    heavy = _steps((512, 1), (1024, 0), (256, 4), (128, 300), (64, 600), (1, 2000))
    assert sum(s.weight_bytes for s in light) <= schedule.LIGHT_PREFIX_BYTES
    assert schedule.LIGHT_CHUNK_SHARE == 4
    assert chunk_plan(light, {"x": 192 * KiB}, ["a5"], 32).chunk == 2
    assert chunk_plan(heavy, {"x": 192 * KiB}, ["a5"], 32).chunk == 8
    # an explicit target is taken as it is
    assert chunk_plan(light, {"x": 192 * KiB}, ["a5"], 32, target=8 * 1024 * KiB).chunk == 8


def test_the_cut_takes_the_fewest_bytes_within_the_window(monkeypatch):
    steps = _steps((512, 0), (200, 0), (100, 0), (50, 0), (10, 0))
    plan = chunk_plan(steps, {"x": 10 * KiB}, ["a4"], 32)
    assert (plan.cut, plan.live) == (5, ("a4",))
    # after a0, the one heavy op, a window of 2 more ops sees a0 (512 KiB), a1 (200), a2 (100)
    monkeypatch.setattr(schedule, "_CUT_WINDOW", 2)
    plan = chunk_plan(steps, {"x": 10 * KiB}, ["a4"], 32)
    assert (plan.cut, plan.live) == (3, ("a2",))


def test_a_skip_connection_crosses_the_cut():
    steps = [Step(frozenset({"x"}), (("a", 512 * KiB),)),
             Step(frozenset({"a"}), (("b", 64 * KiB),)),
             Step(frozenset({"a", "b"}), (("c", 64 * KiB),))]
    plan = chunk_plan(steps, {"x": KiB}, ["c"], 32)
    assert plan.cut == 3 and plan.live == ("c",)
    plan = chunk_plan(steps, {"x": KiB}, ["c", "x"], 32)      # an input the rest still reads
    assert set(plan.live) == {"c", "x"}


@pytest.mark.parametrize("steps,why", [
    (_steps((64, 0), (32, 0)), "nothing heavy at 32 samples"),
    (_steps((512, 2000), (32, 0)), "the heavy op is weight-dominated"),
    (_steps((16 * 1024, 0), (32, 0)), "one sample's activation exceeds the target"),
    ([Step(frozenset({"x"}), (("a0", None),))], "a shape that is not static"),
])
def test_no_plan(steps, why):
    assert chunk_plan(steps, {"x": KiB}, [steps[-1].writes[0][0]], 32) is None, why


@pytest.mark.parametrize("retained", [True, False])
def test_dense_convolutions_get_a_plan_only_where_freed_memory_goes_back(retained, monkeypatch):
    """A convolution that runs its own batch chunks needs no plan where freed memory is retained;
    under glibc's default the plan's smaller temporaries spare page faults."""
    monkeypatch.setattr(schedule, "memory_retained", lambda: retained)
    steps = _steps((512, 1, True), (32, 0))
    plan = chunk_plan(steps, {"x": KiB}, ["a1"], 32)
    assert (plan is None) == retained
    if not retained:     # 1 KiB of weights: a light prefix, 2 MiB chunks of 512 KiB samples
        assert plan.cut == 2 and plan.chunk == 4


def test_memory_retained_follows_the_call_and_the_environment(monkeypatch):
    from mljax import cpu
    monkeypatch.setattr(cpu, "_retained", False)
    for k in cpu.RETAIN_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not cpu.memory_retained()
    for k, v in cpu.RETAIN_ENV.items():
        monkeypatch.setenv(k, v)
    assert cpu.memory_retained()
    monkeypatch.delenv(next(iter(cpu.RETAIN_ENV)))
    assert not cpu.memory_retained()
    monkeypatch.setattr(cpu, "_retained", True)
    assert cpu.memory_retained()


def test_one_sample_has_no_plan():
    assert chunk_plan(_steps((1 << 20, 0)), {"x": KiB}, ["a0"], 1) is None


# --- whole models ------------------------------------------------------------------------
ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")


def _net():
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Hardswish(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
        nn.Conv2d(16, 24, 1), nn.SiLU(),
        nn.Conv2d(24, 24, 5, stride=2, padding=2, groups=24), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    net = _net()
    return net, convert_torch_twins(net, torch.randn(1, 3, 32, 32), tmp_path_factory.mktemp("schedule"))


@pytest.mark.parametrize("kind", ["mlprogram", "neuralnetwork"])
def test_a_list_predict_runs_the_plan_with_torchs_values(converted, kind, monkeypatch):
    """Scaled-down thresholds give the small network a plan at 8 samples (its 16x16 activations
    are heavy: 8 x 16 KiB >= 64 KiB); the plan is made and used, and every sample's output equals
    torch's and the single predict's."""
    net, paths = converted
    monkeypatch.setattr(schedule, "HEAVY_BYTES", 64 * KiB)
    monkeypatch.setattr(schedule, "CHUNK_BYTES", 400 * KiB)     # 100 KiB for its light prefix
    plans = []
    real = schedule.chunk_plan

    def spy(*args, **kw):
        plans.append(real(*args, **kw))
        return plans[-1]
    monkeypatch.setattr(schedule, "chunk_plan", spy)
    model = mljax.MLModel(paths[kind])
    xs = np.random.default_rng(0).standard_normal((8, 1, 3, 32, 32)).astype(np.float32)
    outs = model.predict([{"x": x} for x in xs])
    assert plans and plans[-1] is not None
    plan = plans[-1]
    # the prefix's largest activation, 16x16x24 fp32, is 24 KiB per sample: 4 samples fit 100 KiB
    assert plan.chunk == 4 and 0 < plan.cut
    with torch.no_grad():
        ref = net(torch.from_numpy(xs[:, 0])).numpy()
    got = np.stack([o["y"].reshape(-1) for o in outs])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    for x, o in zip(xs[:3], outs):
        np.testing.assert_allclose(o["y"], model.predict({"x": x})["y"], rtol=1e-6, atol=1e-6)


def test_the_plan_changes_no_value(converted, monkeypatch):
    """The same list predict with and without the plan: equal to float32 rounding."""
    _, paths = converted
    xs = np.random.default_rng(1).standard_normal((8, 1, 3, 32, 32)).astype(np.float32)
    plain = mljax.MLModel(paths["mlprogram"]).predict([{"x": x} for x in xs])
    monkeypatch.setattr(schedule, "HEAVY_BYTES", 64 * KiB)
    monkeypatch.setattr(schedule, "CHUNK_BYTES", 128 * KiB)     # 32 KiB for its light prefix
    model = mljax.MLModel(paths["mlprogram"])
    assert model.stage.lowered.chunk_plan(8) is not None
    planned = model.predict([{"x": x} for x in xs])
    for a, b in zip(plain, planned):
        np.testing.assert_allclose(a["y"], b["y"], rtol=1e-6, atol=1e-6)


def test_a_plan_holds_fewer_temporaries(converted, monkeypatch):
    """The executable of a planned list predict allocates less temporary memory (XLA's buffer
    assignment): the heavy activations exist for one chunk at a time, not the whole batch."""
    import jax
    _, paths = converted
    x = np.zeros((16, 1, 3, 32, 32), np.float32)

    def temp_bytes(planned: bool) -> int:
        monkeypatch.setattr(schedule, "chunked_backend", lambda: planned)
        model = mljax.MLModel(paths["mlprogram"])
        lowered = jax.jit(model.stage.map_batch).lower(model._run_weights(), {"x": x}, {})
        return lowered.compile().memory_analysis().temp_size_in_bytes
    monkeypatch.setattr(schedule, "HEAVY_BYTES", 64 * KiB)
    monkeypatch.setattr(schedule, "CHUNK_BYTES", 400 * KiB)     # 100 KiB for its light prefix
    whole, planned = temp_bytes(False), temp_bytes(True)
    # the first activations alone: 16 samples x 16x16x24 fp32 = 384 KiB for the whole batch
    assert planned < whole - 200 * KiB, (planned, whole)
