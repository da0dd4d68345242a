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
    """Steps of a chain ``x -> a0 -> a1 -> ...``: (output KiB per sample, weight KiB[, a pool])."""
    out, prev = [], "x"
    for i, (kib, w, *pools) in enumerate(specs):
        out.append(Step(frozenset({prev}), ((f"a{i}", kib * KiB),), w * KiB, bool(pools and pools[0])))
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
    (_steps((48, 0), (32, 0)), "nothing heavy at 32 samples (1.5 MiB)"),
    (_steps((512, 2000), (32, 0)), "the heavy op is weight-dominated"),
    (_steps((16 * 1024, 0), (32, 0)), "one sample's activation exceeds the target"),
    ([Step(frozenset({"x"}), (("a0", None),))], "a shape that is not static"),
])
def test_no_plan(steps, why):
    assert chunk_plan(steps, {"x": KiB}, [steps[-1].writes[0][0]], 32) is None, why


@pytest.mark.parametrize("retained", [True, False])
def test_a_span_holding_a_pool_reads_its_chunks_prefetched(retained, monkeypatch):
    """A span with a pool is prefetched (its loop reads each chunk from the carry), one without
    is not; dense convolutions are planned like any op, whether freed memory is retained or not."""
    monkeypatch.setattr(mljax.cpu, "_retained", retained)
    monkeypatch.setattr(schedule, "_CUT_WINDOW", 0)
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", 2 << 20)
    monkeypatch.setattr(schedule, "SPAN_CHUNK_BYTES", 1 << 20)
    # conv (512 KiB a sample) -> pool (256 KiB: heavy at 32) | conv (128 KiB) -> op (96 KiB), both
    # heavy for a further span | head: the pool in the first span, then in the second
    first = chunk_plan(_steps((512, 1), (256, 0, True), (128, 4), (96, 0), (8, 4), (1, 4)), {"x": KiB}, ["a5"], 32)
    second = chunk_plan(_steps((512, 1), (256, 0), (128, 4), (96, 0, True), (8, 4), (1, 4)), {"x": KiB}, ["a5"], 32)
    for plan in (first, second):
        assert (plan.cut, plan.chunk, plan.next.cut, plan.next.chunk) == (2, 4, 4, 8)
    assert (first.prefetch, first.next.prefetch) == (True, False)
    assert (second.prefetch, second.next.prefetch) == (False, True)


def test_prefetched_map_equals_lax_map():
    """prefetched_map: lax.map's values for a tree of inputs and outputs, one chunk or several,
    as a loop that scans over no input (each chunk comes in its carry)."""
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    xs = {"a": rng.standard_normal((5, 3, 4)).astype(np.float32), "b": rng.standard_normal((5, 2)).astype(np.float32)}

    def fn(c):
        return {"s": jnp.tanh(c["a"]).sum(0) * c["b"][0], "m": jnp.max(c["a"], axis=1) + c["b"][1]}
    for n in (5, 1):
        part = {k: v[:n] for k, v in xs.items()}
        got = jax.jit(lambda t: schedule.prefetched_map(fn, t))(part)
        for k in ("s", "m"):
            want = np.stack([np.asarray(fn({j: v[i] for j, v in part.items()})[k]) for i in range(n)])
            np.testing.assert_allclose(np.asarray(got[k]), want, rtol=1e-6)
    loops = [e for e in jax.make_jaxpr(lambda t: schedule.prefetched_map(fn, t))(xs).eqns
             if e.primitive.name in ("scan", "while")]
    assert len(loops) == 1
    if loops[0].primitive.name == "scan":
        assert len(loops[0].invars) == loops[0].params["num_consts"] + loops[0].params["num_carry"]


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


def test_a_further_span_chunks_the_mid_network_while_its_weights_stay_light(monkeypatch):
    """After the first span, ops whose batch still overflows a core's cache (SPAN_HEAVY_BYTES)
    run in a further span of larger chunks, up to where its weights would exceed
    SPAN_WEIGHT_BYTES; the rest over the whole batch."""
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", 2 << 20)
    monkeypatch.setattr(schedule, "SPAN_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(schedule, "SPAN_WEIGHT_BYTES", 1 << 20)
    monkeypatch.setattr(schedule, "_CUT_WINDOW", 1)
    # a stem of 512 KiB per sample (16 MiB at 32: the first span, chunks of 4 in 2 MiB), then
    # 96 KiB (3 MiB at 32: heavy for a further span, 8 per 1 MiB chunk), 16 KiB, 96 KiB, a layer
    # of 1000 KiB of weights, then another heavy one whose weights cross 1 MiB: the span ends before it
    steps = _steps((512, 1), (16, 1), (96, 8), (16, 8), (96, 8), (8, 1000), (96, 64), (4, 600), (1, 4))
    plan = chunk_plan(steps, {"x": 64 * KiB}, ["a8"], 32)
    assert (plan.cut, plan.chunk, plan.live) == (2, 4, ("a1",))
    span = plan.next
    # its last heavy op a4; the window of one more op cuts after a5 (8 KiB) rather than a4
    assert (span.cut, span.chunk, span.live) == (6, 8, ("a5",))
    assert span.next is None
    assert [(start, p.cut) for start, p in plan.spans] == [(0, 2), (2, 6)] and plan.end == 6
    # heavy a6 lies beyond the weight limit: with a larger limit the span reaches it
    monkeypatch.setattr(schedule, "SPAN_WEIGHT_BYTES", 2 << 20)
    assert chunk_plan(steps, {"x": 64 * KiB}, ["a8"], 32).next.cut == 8
    # a span whose chunks would be no larger than the first's (400 KiB: 4 of 96 KiB, the first
    # span's 4) is merged into it: one span to its cut (a8's, with the 2 MiB weight limit), in
    # its chunks, reading what it reads
    monkeypatch.setattr(schedule, "SPAN_CHUNK_BYTES", 400 * KiB)
    merged = chunk_plan(steps, {"x": 64 * KiB}, ["a8"], 32)
    assert (merged.cut, merged.chunk, merged.live, merged.next) == (8, 4, ("a7",), None)
    monkeypatch.setattr(schedule, "SPAN_CHUNK_BYTES", 200 * KiB)      # 2 of 96 KiB: smaller chunks
    smaller = chunk_plan(steps, {"x": 64 * KiB}, ["a8"], 32)
    assert (smaller.cut, smaller.chunk, smaller.next) == (8, 2, None)
    # the earlier rule dropped it: the rest of the program over the whole batch
    monkeypatch.setattr(schedule, "MERGED_SPANS", False)
    dropped = chunk_plan(steps, {"x": 64 * KiB}, ["a8"], 32)
    assert (dropped.cut, dropped.chunk, dropped.next) == (2, 4, None)
    # and none at all without SPAN_HEAVY_BYTES
    monkeypatch.setattr(schedule, "SPAN_CHUNK_BYTES", 1 << 20)
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", None)
    assert chunk_plan(steps, {"x": 64 * KiB}, ["a8"], 32).next is None


def test_a_smaller_batch_gets_a_span_where_its_first_layers_overflow_the_cache(monkeypatch):
    """Nothing writes HEAVY_BYTES at 8 samples, but a stem of 512 KiB a sample writes 4 MiB: the
    plan is one span over the layers writing SPAN_HEAVY_BYTES, while its weights stay light, in
    chunks of the light prefix's target (2 MiB: 4 samples)."""
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", 2 << 20)
    monkeypatch.setattr(schedule, "SPAN_WEIGHT_BYTES", 1 << 20)
    monkeypatch.setattr(schedule, "_CUT_WINDOW", 1)
    steps = _steps((512, 1), (16, 1), (8, 2000), (1, 4))
    plan = chunk_plan(steps, {"x": 64 * KiB}, ["a3"], 8)
    assert (plan.cut, plan.chunk, plan.live, plan.next) == (2, 4, ("a1",), None)
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", None)
    assert chunk_plan(steps, {"x": 64 * KiB}, ["a3"], 8) is None


def test_run_chunked_runs_each_span_over_its_chunks():
    """run_chunked with two spans: the same values as the plain vmap of the three parts, each
    part seeing the chunk sizes of its span."""
    import jax
    import jax.numpy as jnp
    plan = schedule.ChunkPlan(1, 2, ("a",), schedule.ChunkPlan(2, 4, ("b",)))
    seen = []

    def prefix(s):
        seen.append(("prefix", s["x"].shape))
        return {"a": jnp.sin(s["x"])}

    def middle(start, span, live):
        seen.append(("middle", start, span.cut, live["a"].shape))
        return {"b": live["a"] * 2.0 + 1.0}

    def suffix(live):
        return {"y": live["b"].sum(-1)}
    x = np.random.default_rng(0).standard_normal((8, 1, 5)).astype(np.float32)
    run = jax.jit(lambda x: schedule.run_chunked(plan, {"x": x}, prefix, suffix, middle))
    np.testing.assert_allclose(np.asarray(run(x)["y"]), (np.sin(x) * 2 + 1).sum(-1), rtol=1e-6)
    assert ("middle", 1, 2, (1, 5)) in seen        # one sample's values, inside the vmap
    # two loops: 4 chunks of 2 samples, then 2 chunks of 4
    loops = [e.params["length"] for e in jax.make_jaxpr(run)(x).eqns[0].params["jaxpr"].eqns
             if e.primitive.name == "scan"]
    assert loops == [4, 2]
    with pytest.raises(ValueError, match="middle"):
        schedule.run_chunked(plan, {"x": x}, prefix, suffix)


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


def _record_plans(monkeypatch) -> list:
    """The list that every plan ``schedule.chunk_plan`` makes from now on is appended to."""
    plans = []
    real = schedule.chunk_plan

    def spy(*args, **kw):
        plans.append(real(*args, **kw))
        return plans[-1]
    monkeypatch.setattr(schedule, "chunk_plan", spy)
    return plans


@pytest.mark.parametrize("spans", [1, 2, "merged"])
@pytest.mark.parametrize("kind", ["mlprogram", "neuralnetwork"])
def test_a_list_predict_runs_the_plan_with_torchs_values(converted, kind, spans, monkeypatch):
    """Scaled-down thresholds give the small network a plan at 8 samples (its 16x16 activations
    are heavy: 8 x 16 KiB >= 64 KiB); the plan is made and used, and every sample's output equals
    torch's and the single predict's.  With ``spans=2`` the first span ends after the 16x16x24
    activations (24 KiB a sample, in chunks of 2) and a further span runs the 5x5 depthwise layer
    and its activation (6 KiB a sample) in chunks of 4; with ``spans="merged"`` that further
    span's chunks are 2 (12 KiB), no larger than the first's, and the first span runs on through it."""
    net, paths = converted
    monkeypatch.setattr(schedule, "HEAVY_BYTES", 64 * KiB)
    monkeypatch.setattr(schedule, "CHUNK_BYTES", 400 * KiB)     # 100 KiB for its light prefix
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", None)
    if spans != 1:
        monkeypatch.setattr(schedule, "_CUT_WINDOW", 0)              # cut right after the last heavy op
        monkeypatch.setattr(schedule, "HEAVY_BYTES", 192 * KiB)      # 8 x 24 KiB
        monkeypatch.setattr(schedule, "CHUNK_BYTES", 192 * KiB)      # 48 KiB for its light prefix: 2 x 24
        monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", 48 * KiB)  # 8 x 6 KiB
        monkeypatch.setattr(schedule, "SPAN_CHUNK_BYTES", 24 * KiB if spans == 2 else 12 * KiB)  # 4 (2) x 6 KiB
    plans = _record_plans(monkeypatch)
    model = mljax.MLModel(paths[kind])
    xs = np.random.default_rng(0).standard_normal((8, 1, 3, 32, 32)).astype(np.float32)
    outs = model.predict([{"x": x} for x in xs])
    assert plans and plans[-1] is not None
    plan = plans[-1]
    if spans == 1:
        # the prefix's largest activation, 16x16x24 fp32, is 24 KiB per sample: 4 samples fit 100 KiB
        assert plan.chunk == 4 and 0 < plan.cut and plan.next is None
    elif spans == 2:
        assert len(plan.spans) == 2 and (plan.chunk, plan.next.chunk) == (2, 4) and 0 < plan.cut < plan.end
    else:
        # the earlier rule, on a fresh model of the same kind: the same first span, cut earlier
        with monkeypatch.context() as m:
            m.setattr(schedule, "MERGED_SPANS", False)
            mljax.MLModel(paths[kind]).predict([{"x": x} for x in xs])
        dropped = plans[-1]
        assert len(plan.spans) == 1 and plan.chunk == 2 and plan.next is None
        assert dropped is not plan and dropped.chunk == 2 and dropped.next is None and dropped.cut < plan.cut
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


class _SE(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(c, 8, 1), torch.nn.ReLU(),
                                      torch.nn.Conv2d(8, c, 1), torch.nn.Hardsigmoid())

    def forward(self, x):
        return x * self.fc(x)


def test_a_cut_between_a_scaled_1x1_convolution_and_its_product(tmp_path, monkeypatch):
    """A NeuralNetwork region's 1x1 convolution of ``x * gate`` (a squeeze-excitation block) reads
    ``x`` and ``gate`` itself, not the product: a cut right after the product must still pass
    them to the rest (EfficientNet-B0's NeuralNetwork twin at 32 samples failed with a missing
    blob).  Values against torch."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Hardswish(), _SE(16),
                        nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    paths = convert_torch_twins(net, torch.randn(1, 3, 32, 32), tmp_path)
    # heavy: the 16x16x16 activations (16 KiB a sample, 128 KiB at 8 samples), the product the
    # last of them; no window, so the cut falls right after it
    monkeypatch.setattr(schedule, "_CUT_WINDOW", 0)
    monkeypatch.setattr(schedule, "HEAVY_BYTES", 128 * KiB)
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", None)
    model = mljax.MLModel(paths["neuralnetwork"])
    network = model.stage.network
    scaled = {name: role.scaled_by for name, role in network.channels_last.items() if role.scaled_by}
    assert scaled, "the 1x1 convolution reads the product's operands"
    xs = np.random.default_rng(2).standard_normal((8, 1, 3, 32, 32)).astype(np.float32)
    outs = model.predict([{"x": x} for x in xs])
    with torch.no_grad():
        ref = net(torch.from_numpy(xs[:, 0])).numpy()
    np.testing.assert_allclose(np.stack([o["y"].reshape(-1) for o in outs]), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlprogram", "neuralnetwork"])
def test_a_span_with_a_stem_and_pool_runs_prefetched_with_torchs_values(tmp_path, kind, monkeypatch):
    """The zoo cnn's start: a 3x3 stride-1 first layer, ReLU and a 2x2 max pool, then a dense 3x3
    layer.  Its plan's span holds the pool, so it runs prefetched; every sample equals torch's."""
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(32, 10)).eval()
    paths = convert_torch_twins(net, torch.randn(1, 3, 32, 32), tmp_path)
    monkeypatch.setattr(schedule, "HEAVY_BYTES", 256 * KiB)      # 8 x 64 KiB (32x32x16 fp32)
    monkeypatch.setattr(schedule, "CHUNK_BYTES", 1 << 20)        # 256 KiB for its light prefix: 4 samples
    monkeypatch.setattr(schedule, "SPAN_HEAVY_BYTES", None)
    plans = _record_plans(monkeypatch)
    model = mljax.MLModel(paths[kind])
    xs = np.random.default_rng(2).standard_normal((8, 1, 3, 32, 32)).astype(np.float32)
    outs = model.predict([{"x": x} for x in xs])
    assert plans[-1] is not None and plans[-1].prefetch and plans[-1].chunk == 4
    with torch.no_grad():
        ref = net(torch.from_numpy(xs[:, 0])).numpy()
    np.testing.assert_allclose(np.stack([o["y"].reshape(-1) for o in outs]), ref, rtol=1e-4, atol=1e-5)
