"""Planner schedules and cost model; the checker on every schedule and on deliberately broken ones."""
import dataclasses
import re

import pytest
from dataclasses import replace

from tilegen import cli
from tilegen.collective.check import check_cover, check_layout, check_schedule
from tilegen.collective.ir import Seg, Step
from tilegen.collective.layout import MIN_TILE_BYTES, layout, tile_bytes_for, tile_ranges
from tilegen.collective.plan import format_plan, plan
from tilegen.collective.ops import OPS, make_schedule
from tilegen.core.spec import DynamicDim, KernelSpec, ShardedDim

ALL = [(op, alg) for op, d in OPS.items() if d.gemm is None for alg in d.schedules]

# 8 ranks: every case checks as 2-4 do, at several times the cost; they run in CI, out of the fast loop
W8 = pytest.param(8, marks=pytest.mark.slow)


def spec(**kw):
    base = dict(name="ag", op="allgather", dtype="bf16", world_sizes=[2, 4, 8],
                shape=[DynamicDim(name="m", max=4096), 8192])
    base.update(kw)
    return KernelSpec(**base)


def spec_problems(**kw) -> list[str]:
    """What a user reads of an allgather spec with these fields (located problems, less the place)."""
    from pydantic import ValidationError

    from tilegen.core.spec_files import _validation_problems
    try:
        spec(**kw)
    except ValidationError as e:
        return [msg for _, msg in _validation_problems(e, "s", lambda loc, t: (0, 0))]
    return []


@pytest.mark.parametrize("op, alg", ALL)
@pytest.mark.parametrize("world", [2, 3, 4, W8])
@pytest.mark.parametrize("sync", ["per_tile", "barrier"])
def test_every_schedule_passes_the_checker(op, alg, world, sync):
    v = check_schedule(make_schedule(op, alg, world, sync), seeds=1 if world == 8 else 3)
    assert v.ok, str(v)
    assert v.ops > 0 and len(v.configs) == 5


def test_direct_allgather_shape():
    s = make_schedule("allgather", "direct", 4, "per_tile")
    r1 = s.ranks[1]
    assert [st.kind for st in r1] == ["entry", "move", "wait", "wait", "wait"]
    assert r1[0].notify == r1[0].await_ranks == (0, 2, 3)
    assert r1[1].srcs == (Seg(1, "in", 0),) and {d.rank for d in r1[1].dests} == {0, 1, 2, 3}
    assert [st.waits[0].slot for st in r1[2:]] == [2, 3, 0]  # peers in the order 1 + 1, 1 + 2, ...: no incast


def test_ring_reduce_scatter_accumulates_round_the_ring():
    s = make_schedule("reduce_scatter", "ring", 4, "per_tile")
    r0 = s.ranks[0]
    assert r0[0].notify == (3,) and r0[0].await_ranks == (1,)
    assert [(st.unit, [str(g) for g in st.srcs], [str(d) for d in st.dests]) for st in r0[1:]] == [
        (3, ["in@0[3]"], ["scr@1[1]"]),
        (2, ["in@0[2]", "scr@0[1]"], ["scr@1[2]"]),
        (1, ["in@0[1]", "scr@0[2]"], ["scr@1[3]"]),
        (0, ["in@0[0]", "scr@0[3]"], ["out@0[0]"]),
    ]


def test_bidirectional_ring_sends_halves_both_ways():
    s = make_schedule("allreduce", "bidir_ring", 4, "per_tile")
    assert s.parts == 2
    assert set(s.ranks[0][0].await_ranks) == {1, 3}
    dests = {d.rank for st in s.ranks[0] for d in st.dests} - {0}
    assert dests == {1, 3}


def _broken(sched, fn):
    return dataclasses.replace(sched, algorithm="broken", ranks=tuple(tuple(fn(list(r))) for r in sched.ranks))


def test_checker_rejects_missing_entry_barrier_as_write_after_read():
    b = _broken(make_schedule("allgather", "direct", 2, "per_tile"), lambda r: [Step("entry")] + r[1:])
    v = check_schedule(b)
    assert not v.ok and any("write-after-read" in p for p in v.problems), v.problems


def test_checker_rejects_missing_waits_as_unsynchronised_reads():
    b = _broken(make_schedule("allreduce", "two_shot", 2, "barrier"), lambda r: [s for s in r if s.kind != "wait"])
    v = check_schedule(b)
    assert not v.ok and any("unsynchronised read" in p for p in v.problems), v.problems


def test_checker_reports_deadlock_with_rank_cta_and_signal():
    b = _broken(make_schedule("allgather", "direct", 2, "per_tile"),
                lambda r: r + [Step("wait", unit=0, waits=(Seg(r[1].srcs[0].rank, "out", 0),))])
    v = check_schedule(b)
    assert any(
        p.startswith("deadlock: call 1: rank 0 CTA 0 waits flag[out][0][0]@0 >= 1, sees 0") for p in v.problems
    ), v.problems


def test_checker_rejects_reduction_that_reads_before_arrival():
    def no_wait(r):
        return [dataclasses.replace(s, waits=()) if s.kind == "move" and len(s.srcs) > 1 else s for s in r]

    v = check_schedule(_broken(make_schedule("reduce_scatter", "ring", 4, "per_tile"), no_wait))
    assert not v.ok and any("unsynchronised read" in p and "scr@" in p for p in v.problems)


def test_checker_counts_contributions_exactly_once():
    def twice(r):  # rank adds its own input twice in the final reduction
        last = r[-1]
        return r[:-1] + [dataclasses.replace(last, srcs=last.srcs + last.srcs[:1])]

    v = check_schedule(_broken(make_schedule("reduce_scatter", "direct", 2, "per_tile"), twice))
    assert any("holds 2x in@" in p for p in v.problems), v.problems


def test_checker_rejects_scratch_slot_reuse_within_a_call():
    def reuse(r):  # every push lands in scratch slot 0
        return [
            dataclasses.replace(
                s,
                dests=tuple(dataclasses.replace(d, slot=0) if d.buf == "scr" else d for d in s.dests),
                srcs=tuple(dataclasses.replace(g, slot=0) if g.buf == "scr" else g for g in s.srcs),
                waits=tuple(dataclasses.replace(g, slot=0) for g in s.waits),
            )
            for s in r
        ]

    v = check_schedule(_broken(make_schedule("reduce_scatter", "direct", 3, "per_tile"), reuse))
    assert any("written 2 times in one call" in p for p in v.problems), v.problems


def test_checker_rejects_wrong_sources():
    def wrong_chunk(r):  # all-to-all that sends block q to rank q's slot q instead of slot r
        return [
            dataclasses.replace(s, dests=tuple(dataclasses.replace(d, slot=d.rank) for d in s.dests))
            if s.kind == "move"
            else s
            for s in r
        ]

    v = check_schedule(_broken(make_schedule("all_to_all", "direct", 3, "per_tile"), wrong_chunk))
    assert not v.ok and any("expected in@" in p or "never written" in p or "write-write race" in p for p in v.problems)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("world", [2, 3, W8])
@pytest.mark.parametrize("parts", [1, 2])
def test_layout_tiles_every_byte_exactly_once(op, world, parts):
    k = OPS[op].in_rows(world)
    sizes = [k * 2 * n for n in (1, 7, 8, 1000, 4096 * 3 + 1, 65536 * 8 + 7)]
    assert check_layout(op, world, 2, parts, sizes, 4096) == []


def test_tile_sizes():
    for n in [1, 15, 16, 17, 4095, 4096, 262144 + 18, 10**7 + 3]:
        for ctas in [1, 7, 264]:
            t = tile_bytes_for(n, 262144, ctas)
            assert t % 16 == 0 and MIN_TILE_BYTES <= t <= 262144
            assert check_cover(n, tile_ranges(n, t)) is None
    assert check_cover(10, [(0, 4), (5, 10)]) is not None
    assert layout("allreduce", 4, 1000, 2, 1) == (256, 256)  # 16 B-aligned chunks, the last one short
    assert layout("allreduce", 2, 64, 2, 2) == (32, 16)


def test_planner_picks_by_size_and_topology():
    ar = spec(name="ar", op="allreduce", shape=[DynamicDim(name="m", max=16384), 4096])
    p = plan(ar, 8)
    algs = [v.schedule.algorithm for v in p.variants]
    assert algs[0] == "ll_one_shot" and algs[-1] not in ("one_shot", "ll_one_shot") and len(algs) <= 3
    assert p.variants[-1].max_bytes == ar.max_in_bytes(8)
    assert [v.max_bytes for v in p.variants] == sorted(v.max_bytes for v in p.variants)
    assert plan(spec(), 8).schedule.algorithm == "direct"
    ring = plan(spec(topology="ring_links"), 8)
    assert ring.schedule.algorithm in ("ring", "bidir_ring")


def test_calibration_changes_the_choice():
    ar = spec(name="ar", op="allreduce", shape=[DynamicDim(name="m", max=16384), 4096])
    default = plan(ar, 4).variants[0].max_bytes
    slow_hops = plan(ar, 4, calibration={"hop_us": 50.0}).variants[0].max_bytes
    assert slow_hops > default  # dear signals favour the one-hop schedule for longer


def test_fixed_schedule_is_respected_and_world_checked():
    assert plan(spec(schedule="ring"), 4).schedule.algorithm == "ring"
    with pytest.raises(ValueError, match="world size 3"):
        plan(spec(), 3)
    with pytest.raises(Exception, match="allgather has schedules direct, ring, bidir_ring"):
        spec(schedule="two_shot")


def test_format_plan_lists_candidates_and_every_rank():
    text = format_plan(plan(spec(), 4))
    assert "predicted time" in text and "direct" in text and "bidir_ring" in text
    for r in range(4):
        assert f"rank {r}:" in text


def test_cli_plan_prints_schedule_and_verdict(root, capsys):
    assert cli.main(["plan", str(root / "specs/allreduce_bf16.yaml"), "--world", "4"]) == 0
    out = capsys.readouterr().out
    assert "variant 0" in out and "rank 3:" in out and "checker: OK" in out and "reduce" in out
    assert cli.main(["plan", str(root / "specs/allgather_bf16.yaml"), "--world", "3"]) == 1


def gemm_spec(**kw):
    base = dict(
        name="agg",
        op="ag_gemm",
        dtype="bf16",
        world_sizes=[2, 4, 8],
        shape=[DynamicDim(name="m", max=4096), 8192],
        n=4096,
    )
    base.update(kw)
    return KernelSpec(**base)


def test_ag_gemm_spec_rules():
    assert gemm_spec().max_in_bytes(4) == 4096 * 8192 * 2
    with pytest.raises(Exception, match="n\n  Field required"):
        KernelSpec(**{k: v for k, v in gemm_spec().model_dump().items() if k != "n"})
    assert gemm_spec(overlap="fused").fused and not gemm_spec().fused  # auto: decomposed (measured faster)
    assert not gemm_spec(overlap="decomposed").fused
    with pytest.raises(Exception, match="overlap: fused needs a Hopper target"):
        gemm_spec(overlap="fused", arch="sm_80")
    with pytest.raises(Exception, match="overlap: fused needs bf16 or f16"):
        gemm_spec(overlap="fused", dtype="f32")
    with pytest.raises(Exception, match="overlap: fused needs n and k multiples of 8"):
        gemm_spec(overlap="fused", n=4100)
    with pytest.raises(Exception, match=r"gemm_tile: expected \[m, n, k\]"):
        gemm_spec(gemm_tile=[64, 256, 64])
    with pytest.raises(Exception, match="stages: only the fused overlap"):
        gemm_spec(overlap="decomposed", stages=4)
    assert gemm_spec(overlap="fused", gemm_tile=[256, 128, 64], stages=4).gemm_tile_shape == (256, 128, 64)
    assert gemm_spec(overlap="fused").gemm_cluster_shape == (1, 1)
    assert gemm_spec(overlap="fused", gemm_cluster=[2, 1]).gemm_cluster_shape == (2, 1)
    with pytest.raises(Exception, match=r"gemm_cluster: expected \[m, n\] with each 1 or 2, got \[4, 1\]"):
        gemm_spec(overlap="fused", gemm_cluster=[4, 1])
    with pytest.raises(Exception, match="gemm_cluster: only the fused overlap"):
        gemm_spec(overlap="decomposed", gemm_cluster=[2, 1])
    assert spec_problems(gemm_cluster=[2, 1]) == [
        "gemm_cluster: op allgather takes no gemm_cluster (only ag_gemm, gemm_rs take it)"]
    assert spec_problems(gemm_tile=[128, 256, 64]) == [
        "gemm_tile: op allgather takes no gemm_tile (only ag_gemm, gemm_rs take it)"]
    assert gemm_spec(overlap="fused", gemm_tile=[128, 128, 64], gemm_schedule="pingpong").gemm_schedule == "pingpong"
    with pytest.raises(Exception, match="gemm_schedule: a pingpong warp group holds a whole tile's accumulators"):
        gemm_spec(overlap="fused", gemm_schedule="pingpong")  # the default tile, 128 x 256
    with pytest.raises(Exception, match="gemm_schedule: pingpong is for ag_gemm"):
        gemm_spec(op="gemm_rs", shape=[DynamicDim(name="m", max=4096), ShardedDim(full=8192)], n=4096,
                  overlap="fused", gemm_tile=[128, 128, 64], gemm_schedule="pingpong")
    with pytest.raises(Exception, match="gemm_schedule: only the fused overlap"):
        gemm_spec(overlap="decomposed", gemm_schedule="pingpong")
    assert spec_problems(gemm_schedule="pingpong") == [
        "gemm_schedule: op allgather takes no gemm_schedule (only ag_gemm, gemm_rs take it)"]
    with pytest.raises(Exception, match=r"shape: ag_gemm takes A's shard as \[m, k\]"):
        gemm_spec(shape=[4, 4, 4])
    assert spec_problems(n=5) == [
        "n: op allgather takes no n (only ag_gemm, gemm_rs take it)"]


@pytest.mark.parametrize("sync", ["per_tile", "barrier"])
@pytest.mark.parametrize("alg", ["direct", "ring", "bidir_ring"])
@pytest.mark.parametrize("world", [2, 3, 4, W8])
def test_fused_ag_gemm_protocol_passes_the_checker(alg, world, sync):
    """The fused GEMM reads its own chunk from the gathered buffer too: the moves that fill this
    rank's own chunk signal it, and the GEMM waits per piece before reading it."""
    from tilegen.collective.schedules import arrival_order

    s = make_schedule("ag_gemm", alg, world, sync, fused=True)
    assert any(st.signal_self for st in s.ranks[0])
    orders = tuple(arrival_order(s, r) for r in range(world))
    v = check_schedule(s, compute_orders=orders)
    assert v.ok, v


def test_fused_ag_gemm_without_own_signals_is_caught():
    """Planted bug: the GEMM waits on flags of its own chunk that nobody sets (the decomposed
    schedule never signals itself) -> the checker reports the deadlock."""
    from tilegen.collective.schedules import arrival_order

    fused = make_schedule("ag_gemm", "direct", 2, "per_tile", fused=True)
    # rank 1's moves forget to signal its own chunk (rank 0 keeps them, so the model stays fused)
    broken = replace(fused, ranks=(fused.ranks[0], tuple(replace(st, signal_self=False) for st in fused.ranks[1])))
    orders = tuple(arrival_order(fused, r) for r in range(2))
    v = check_schedule(broken, compute_orders=orders)
    assert not v.ok and any("deadlock" in p or "never" in p for p in v.problems), v


@pytest.mark.parametrize("alg", ["direct", "ring", "bidir_ring"])
@pytest.mark.parametrize("world", [2, 4, W8])
def test_compute_stream_order_passes_the_checker(alg, world):
    from tilegen.collective.schedules import arrival_order

    s = make_schedule("ag_gemm", alg, world, "per_tile")
    orders = tuple(arrival_order(s, r) for r in range(world))
    for r, o in enumerate(orders):
        assert o[0] == r and sorted(o) == list(range(world))  # own chunk first, every chunk once
    v = check_schedule(s, compute_orders=orders, seeds=1)
    assert v.ok, str(v)


def test_ring_compute_order_follows_arrival():
    from tilegen.collective.schedules import arrival_order

    s = make_schedule("ag_gemm", "ring", 4, "per_tile")
    assert arrival_order(s, 0) == (0, 3, 2, 1)


def test_checker_catches_a_compute_stream_that_does_not_wait(monkeypatch):
    import tilegen.collective.check as ck

    real = ck.expand_compute
    monkeypatch.setattr(ck, "expand_compute", lambda *a: [o for o in real(*a) if o.kind != "wait"])
    s = make_schedule("ag_gemm", "direct", 2, "per_tile")
    v = check_schedule(s, compute_orders=((0, 1), (1, 0)))
    assert not v.ok
    assert any("compute stream" in p for p in v.problems) and any("C@" in p for p in v.problems)


def test_ag_gemm_plan_prints_the_compute_stream(root, capsys):
    assert cli.main(["plan", str(root / "specs/ag_gemm_bf16.yaml"), "--world", "4"]) == 0
    out = capsys.readouterr().out
    assert "compute stream: C[0] = A @ B; wait chunk" in out and "allgather+gemm/direct" in out


@pytest.mark.parametrize("alg", ["direct", "ring", "bidir_ring"])
@pytest.mark.parametrize("world", [2, 4, W8])
@pytest.mark.parametrize("sync", ["per_tile", "barrier"])
def test_gemm_rs_producer_stream_passes_the_checker(alg, world, sync):
    from tilegen.collective.schedules import production_order

    s = make_schedule("gemm_rs", alg, world, sync)
    orders = tuple(production_order(s, r) for r in range(world))
    for r, o in enumerate(orders):
        assert sorted(o) == list(range(world)) and o[-1] == r  # others' chunks first, own chunk last
    v = check_schedule(s, compute_orders=orders, produces=True, seeds=1)
    assert v.ok, str(v)


def test_checker_catches_reduce_scatter_reading_unproduced_partials():
    s = make_schedule("reduce_scatter", "direct", 2, "per_tile")  # no waits on the GEMMs' signals
    v = check_schedule(s, compute_orders=((1, 0), (0, 1)), produces=True)
    assert any("before the signal of its write by rank 0 compute stream" in p for p in v.problems), v.problems


def test_gemm_rs_spec_and_plan(root, capsys):
    s = gemm_spec(name="grs", op="gemm_rs", shape=[DynamicDim(name="m", max=1024), 4096], n=8192)
    assert s.comm_inner == (8192,) and s.max_in_bytes(2) == 2 * 1024 * 8192 * 2
    assert cli.main(["plan", str(root / "specs/gemm_rs_bf16.yaml"), "--world", "2"]) == 0
    out = capsys.readouterr().out
    assert "compute stream: P[1] = A[1] @ B, signal flag[in][1]" in out and "gemm+reduce_scatter/direct" in out


# ---------------------------------------------------------------- residency (issue: gemm_rs hang at Llama shapes)
LLAMA8B_DOWN = """name: down
op: gemm_rs
dtype: bf16
world_sizes: [2, 4]
shape: [{name: m, max: 8192}, 7168]
n: 4096
b_layout: nk
overlap: auto
"""


def test_the_llama_down_projection_spec_leaves_the_gemms_their_sms():
    """The spec that hung on 2 and 4 x H100 (gemm_rs, k 7168, n 4096, no ctas given): 264 CTAs spun on
    every SM while waiting for GEMMs that then could not start. GEMM ops now default to the planner's
    small CTA counts, every variant leaves SMs free, and the checker passes with that model."""
    from tilegen.collective.plan import max_gemm_comm_ctas, spare_sms
    from tilegen.core.pipeline import checked_lowering
    from tilegen.core.spec_files import parse_yaml_spec

    s = parse_yaml_spec(LLAMA8B_DOWN, "down.yaml").spec
    assert s.ctas == "auto"
    for g in checked_lowering(s):  # raises if the checker rejects a variant
        for v in g.plan.variants:
            assert v.ctas <= max_gemm_comm_ctas(s.sm) and spare_sms(s, v.ctas) == 1


def test_checker_catches_a_communication_kernel_that_starves_its_gemm():
    """Planted bug, the class of the hang: a gemm_rs communication kernel with as many CTAs as SMs.
    Each CTA spins on an SM of its own waiting for a GEMM that can find no SM: a deadlock."""
    from tilegen.core.render import CodegenError
    from tilegen.collective.plan import spare_sms
    from tilegen.collective.schedules import production_order
    from tilegen.core.pipeline import checked_lowering
    from tilegen.overlap.spec import GemmSpec

    for alg, world in (("direct", 2), ("ring", 4)):
        s = make_schedule("gemm_rs", alg, world, "per_tile")
        orders = tuple(production_order(s, r) for r in range(world))
        v = check_schedule(s, compute_orders=orders, produces=True, spare_sms=0)
        assert not v.ok and "compute stream cannot be scheduled" in v.problems[0], v
        assert check_schedule(s, compute_orders=orders, produces=True, spare_sms=1).ok
    # the pipeline's view: a spec that slipped past validation with 264 CTAs is refused at codegen
    bad = GemmSpec.model_construct(
        **{
            **gemm_spec(op="gemm_rs").model_dump(),
            "ctas": 264,
            "shape": [DynamicDim(name="m", max=8192), 7168],
            "n": 4096,
        }
    )
    assert spare_sms(bad, 264) == 0
    with pytest.raises(CodegenError, match="compute stream cannot be scheduled"):
        checked_lowering(bad)


def test_checker_catches_a_fused_gemm_that_leaves_the_gather_no_sm():
    """A persistent ag_gemm GEMM waits for the gather beside it: if it takes every SM, the gather's
    CTAs never run."""
    from tilegen.collective.schedules import arrival_order

    s = make_schedule("ag_gemm", "ring", 4, "per_tile", fused=True)
    orders = tuple(arrival_order(s, r) for r in range(4))
    assert not check_schedule(s, compute_orders=orders, spare_sms=0).ok
    assert check_schedule(s, compute_orders=orders, spare_sms=1).ok


def test_barrier_schedules_need_every_cta_resident():
    """Why the runtime launches no more CTAs than fit at once: in barrier mode the last CTA of a step
    signals, so resident CTAs that wait for the next step's signal block the ones waiting for an SM."""
    s = make_schedule("allgather", "ring", 4, "barrier")
    v = check_schedule(s, configs=[(3, 2, False)], spare_sms=-1)  # 2 SMs for 3 CTAs
    assert not v.ok and any("cannot be scheduled" in p for p in v.problems), v
    assert check_schedule(s, configs=[(3, 2, False)], spare_sms=0).ok


def test_gemm_op_ctas_are_bounded_and_default_to_auto():
    assert gemm_spec().ctas == "auto" and spec().ctas == "auto"
    with pytest.raises(
        Exception,
        match=r"ctas: a gemm_rs communication kernel runs beside the GEMMs .* at most 39 CTAs "
        r"on sm_90 \(or auto\), got 264",
    ):
        gemm_spec(op="gemm_rs", ctas=264)
    assert gemm_spec(ctas=32).ctas == 32


def test_rooted_reduce_leaves_other_outputs_alone():
    """reduce writes only the root's output: a schedule that also writes another rank's is refused."""
    s = make_schedule("reduce", "direct", 4, "per_tile")
    assert check_schedule(s).ok
    extra = Step("move", unit=0, srcs=(Seg(2, "in", 0),), dests=(Seg(2, "out", 0),))
    broken = replace(s, ranks=tuple(steps + ((extra,) if r == 2 else ()) for r, steps in enumerate(s.ranks)))
    v = check_schedule(broken)
    assert any("written, but the op writes no output on rank 2" in p for p in v.problems), v


# ------------------------------------------------------------------ copy-engine overlap protocol
from tilegen.overlap import ce_program  # noqa: E402
from tilegen.overlap.check import check_copy_engine  # noqa: E402


@pytest.mark.parametrize("kind", ["ag_gemm", "gemm_rs"])
@pytest.mark.parametrize("world", [2, 3, 4, W8])
def test_copy_engine_programs_pass_the_checker(kind, world):
    v = check_copy_engine(kind, world, seeds=8)
    assert v.ok, str(v)
    assert v.ops > 0 and len(v.configs) == 3 * len(ce_program.STYLES[kind])


def _mutated(kind, change, style=None):
    """program_fn whose programs are the real ones with `change(steps, rank)` applied."""
    return lambda w, r, s: tuple(change(list(ce_program.program(kind, w, r, s, style)), r))


def _drop(kind_of_step, stream=None, last=False):
    def change(steps, r):
        idx = [i for i, st in enumerate(steps) if st.kind == kind_of_step and (stream is None or st.stream == stream)]
        del steps[idx[-1] if last else idx[0]]
        return steps
    return change


@pytest.mark.parametrize("kind, style, change, symptom", [
    # no entry handshake: a fast rank pushes into / reads from buffers its peer's previous call still uses
    ("ag_gemm", "chunks", _drop("begin"), "write-after-read|expected|set again|deadlock"),
    ("ag_gemm", "merged", _drop("begin"), "write-after-read|expected|set again|deadlock"),
    ("gemm_rs", "direct", _drop("begin"), "write-after-read|expected|set again|deadlock"),
    ("gemm_rs", "ring", _drop("begin"), "write-after-read|expected|set again|deadlock"),
    # the caller's stream returns before the copies finish: the user's next A is read mid-copy
    ("ag_gemm", "chunks", _drop("join", last=True), "write-after-read|expected"),
    ("ag_gemm", "merged", _drop("join", last=True), "write-after-read|expected"),
    # a consumer that does not wait for the flag reads another call's data (or none)
    ("ag_gemm", "chunks", _drop("wait"), "expected|set again|deadlock"),
    ("ag_gemm", "merged", _drop("wait", last=True), "expected|set again|deadlock"),
    # a copy stream that does not wait for the caller's stream pushes the previous call's A
    ("ag_gemm", "merged_spread", _drop("fork", last=True), "write-after-read|expected|set again|deadlock"),
    ("ag_gemm", "merged_spread", _drop("join", last=True), "write-after-read|expected"),
    ("gemm_rs", "direct", _drop("wait"), "expected|set again|deadlock"),
    ("gemm_rs", "ring", _drop("wait"), "expected|set again|deadlock"),
    # a push before the GEMM it sends finished: the peer adds stale (or no) data
    ("gemm_rs", "direct", _drop("fork", last=True), "expected|write-after-read|set again|deadlock"),
    ("gemm_rs", "ring", _drop("fork"), "expected|write-after-read|set again|deadlock"),
    ("gemm_rs", "ring", _drop("fork", last=True), "expected|write-after-read|set again|deadlock"),
    # the own rows without the others' sums: C misses their products
    ("gemm_rs", "direct", _drop("wait", last=True), "expected|set again|deadlock"),
    ("gemm_rs", "ring", _drop("wait", last=True), "expected|set again|deadlock"),
    # (gemm_rs's final join is kept for CUDA-graph capture, which needs the copy stream joined back:
    # the handshake alone already orders a push before the next call's writes of what it reads)
])
@pytest.mark.parametrize("world", [2, 4])
def test_copy_engine_checker_catches_broken_protocols(kind, style, change, symptom, world):
    v = check_copy_engine(kind, world, splits_options=(1, 2), seeds=30, program_fn=_mutated(kind, change, style))
    assert not v.ok
    assert any(re.search(symptom, p) for p in v.problems), v.problems[:5]


def test_copy_engine_checker_catches_a_missing_reduction():
    """gemm_rs direct at 4 ranks without its reduction of the later arrivals: C lacks two products."""
    v = check_copy_engine("gemm_rs", 4, splits_options=(1,), seeds=4,
                          program_fn=_mutated("gemm_rs", _drop("reduce"), "direct"))
    assert not v.ok and any("expected" in p for p in v.problems)


def test_copy_engine_checker_reports_a_split_mismatch_as_deadlock():
    """Ranks that split their chunks differently (e.g. TILEGEN_CE_SPLITS set on one rank only) wait
    for flags nobody sets: the checker names the blocked wait."""
    def fn(w, r, s):
        return ce_program.program("gemm_rs", w, r, s + (r == 1))
    v = check_copy_engine("gemm_rs", 2, splits_options=(1,), seeds=3, program_fn=fn)
    assert not v.ok and any("deadlock" in p and "wait for flag" in p for p in v.problems)


def test_copy_engine_program_shape():
    """Rank r sends to r+1 first and hears from r-1 first; every split of every peer is flagged once."""
    assert ce_program.peers(1, 4) == ((2, 3, 0), (0, 3, 2))
    steps = ce_program.program("ag_gemm", 4, 1, 2)
    puts = [(st.peer, st.flag) for st in steps if st.kind == "put"]
    assert puts == [(q, ce_program.flag(1, s)) for q in (2, 3, 0) for s in (0, 1)]
    waits = [st.flag for st in steps if st.kind == "wait"]
    assert waits == [ce_program.flag(q, s) for q in (0, 3, 2) for s in (0, 1)]
    # gemm_rs ring: step t computes chunk me - 1 - t onto what rank me - 1 pushed, own rows last
    rs = ce_program.program("gemm_rs", 4, 1, 1, "ring")
    gemms = [(st.src[1], st.addend) for st in rs if st.kind == "gemm"]
    assert gemms == [(0, None), (3, ("recv", 0, 0)), (2, ("recv", 1, 0)), (1, ("recv", 2, 0))]
    assert {st.peer for st in rs if st.kind == "put"} == {2}
    assert [st.flag for st in rs if st.kind == "wait"] == [ce_program.flag(t, 0) for t in range(3)]
    # gemm_rs direct: peers' rows pushed to recv slot (peer - 1 - me) % world, own rows + slot 0, reduce the rest
    rs = ce_program.program("gemm_rs", 4, 1, 1)
    assert [(st.peer, st.dst) for st in rs if st.kind == "put"] == [(2, ("recv", 0, 0)), (3, ("recv", 1, 0)),
                                                                     (0, ("recv", 2, 0))]
    assert [(st.src, st.count) for st in rs if st.kind == "reduce"] == [(("recv", 1, 0), 2)]
    # ag_gemm merged: rank 2 of 4 waits for ranks 1, 0 then GEMMs rows of chunks 0-1, then chunk 3
    ag = ce_program.program("ag_gemm", 4, 2, 1, "merged")
    assert [(st.src, st.count) for st in ag if st.kind == "gemm"][1:] == [(("gathered", 0, None), 2),
                                                                          (("gathered", 3, None), 1)]
    with pytest.raises(ValueError, match="splits"):
        ce_program.program("gemm_rs", 2, 0, 9)
    with pytest.raises(ValueError, match="style must be one of direct, ring"):
        ce_program.program("gemm_rs", 2, 0, 1, "tree")


# ------------------------------------------------------------------------------ PreMulSum (reduce: avg, premul_sum)
@pytest.mark.parametrize("op", ["reduce_scatter", "allreduce", "reduce"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_reduction_scales_each_contribution_exactly_once(op, world):
    """with_premul marks the sources a reduce step multiplies by the call's scale; the checker's data
    carry a mark per multiplication, so the outputs prove every contribution was scaled once."""
    for alg in OPS[op].schedules:
        for sync in ("per_tile", "barrier"):
            s = make_schedule(op, alg, world, sync, premul=True)
            assert s.scaled and any(any(st.scaled) for r in s.ranks for st in r)
            v = check_schedule(s, seeds=1)
            assert v.ok, (alg, sync, str(v))


@pytest.mark.parametrize("op, alg", [("allreduce", "ring"), ("reduce_scatter", "bidir_ring"),
                                     ("reduce_scatter", "direct"), ("allreduce", "ll_two_shot")])
def test_the_checker_catches_a_contribution_scaled_twice_or_never(op, alg):
    import dataclasses
    s = make_schedule(op, alg, 4, "per_tile", premul=True)

    def marked(mark):
        return dataclasses.replace(s, ranks=tuple(
            tuple(dataclasses.replace(st, scaled=mark(st)) if len(st.srcs) > 1 else st for st in r) for r in s.ranks))
    never = check_schedule(marked(lambda st: ()), seeds=1)
    twice = check_schedule(marked(lambda st: (True,) * len(st.srcs)), seeds=1)
    assert not never.ok and "expected s*in@" in never.problems[0]
    if "ring" in alg:  # (direct and two-shot sum raw copies only: every source is raw, none to scale twice)
        assert not twice.ok and "s*s*in@" in twice.problems[0]


def test_avg_and_premul_sum_are_reductions_of_floating_types():
    assert spec(op="allreduce", reduce="avg").premul and not spec(op="allreduce").premul
    assert spec(op="reduce_scatter", reduce="premul_sum", dtype="f32").premul
    assert spec_problems(op="allgather", reduce="avg") == [
        "reduce: avg scales the contributions of a reduction (reduce_scatter, allreduce, reduce), not allgather's"]
    assert spec_problems(op="allreduce", reduce="avg", dtype="i32") == [
        "reduce: avg multiplies by a fractional scale: use bf16, f16 or f32, not i32"]
    with pytest.raises(Exception, match="reduce: avg scales the contributions of a reduction"):
        gemm_spec(op="gemm_rs", shape=[DynamicDim(name="m", max=4096), ShardedDim(full=8192)], n=4096,
                  reduce="avg")
    p = plan(spec(op="allreduce", reduce="avg"), 4)
    assert all(v.schedule.scaled for v in p.variants)
    assert "s*in[" in format_plan(p) or "s*scr[" in format_plan(p)


# ------------------------------------------------------------------------------ deterministic reductions
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_reductions_of_raw_inputs_add_them_in_rank_order_on_every_rank(world):
    """in_canonical_order: a reduce step's raw contributions are read in ascending rank order whichever
    rank runs it, so one_shot gives every rank the same bits and two_shot the one_shot's."""
    from tilegen.collective.ops import order_problems
    from tilegen.collective.schedules import contributor, writers_of
    for op in ("reduce_scatter", "allreduce", "reduce"):
        for alg in OPS[op].schedules:
            s = make_schedule(op, alg, world, "per_tile")
            w = writers_of(s)
            for steps in s.ranks:
                for st in steps:
                    ranks = [contributor(w, g) for g in st.srcs]
                    if len(st.srcs) > 1 and None not in ranks:
                        assert ranks == sorted(ranks), (op, alg, st)
            canonical = not order_problems(op, s)
            assert canonical == ("ring" not in alg or world == 2), (op, alg, world, order_problems(op, s))


def test_the_order_check_catches_a_reduction_out_of_rank_order():
    from tilegen.collective import schedules as S
    from tilegen.collective.ops import order_problems
    raw = S.ar_one_shot(3, "per_tile")  # as written: rank r adds its own input first
    assert order_problems("allreduce", raw)[0] == (
        "out@1[0] adds the ranks' contributions in the order [1, 2, 0], not [0, 1, 2]")
    assert order_problems("allreduce", make_schedule("allreduce", "one_shot", 3, "per_tile")) == []
    ring = order_problems("allreduce", make_schedule("allreduce", "ring", 4, "per_tile"))
    assert ring and "adds partial sums" in ring[0]


def test_a_deterministic_spec_plans_only_schedules_in_rank_order():
    from tilegen.collective.ops import order_problems
    free = plan(spec(op="allreduce", topology="ring_links"), 4)
    assert any("ring" in v.schedule.algorithm for v in free.variants)  # the filter has something to remove
    for world in (2, 4, 8):
        for kw in (dict(op="allreduce", topology="ring_links"), dict(op="reduce_scatter", topology="ring_links"),
                   dict(op="allreduce", reduce="avg"), dict(op="reduce", dtypes=["f32", "bf16"])):
            p = plan(spec(deterministic=True, **kw), world)
            for v in p.variants:
                assert order_problems(kw["op"], v.schedule) == [], (kw, world, v.schedule.algorithm)
    # exact reductions (max, integer sums) keep every schedule
    exact = plan(spec(op="allreduce", topology="ring_links", reduce="max", deterministic=True), 4)
    assert [v.schedule.algorithm for v in exact.variants] == [
        v.schedule.algorithm for v in plan(spec(op="allreduce", topology="ring_links", reduce="max"), 4).variants]


def test_deterministic_spec_errors_are_located_and_name_what_serves():
    assert spec_problems(op="allreduce", deterministic=True, schedule="ring") == [
        "schedule: ring adds partial sums at world 4, so its bits differ from the other schedules'; "
        "deterministic takes one_shot, two_shot, ll_one_shot, ll_two_shot (or auto)"]
    assert spec_problems(op="allreduce", deterministic=True, schedule="ring", reduce="max") == []
    rs = dict(op="gemm_rs", shape=[DynamicDim(name="m", max=4096), ShardedDim(full=8192)], n=4096, deterministic=True)
    assert gemm_spec(**rs, overlap="decomposed").deterministic  # (its chunk GEMMs: the pinned cuBLASLt algorithm)
    with pytest.raises(Exception, match="deterministic: ag_gemm adds nothing across ranks"):
        gemm_spec(deterministic=True)
    assert gemm_spec(**rs).overlap_style == "copy_engine" and gemm_spec(**rs, overlap="fused").fused


def _gemm_rs_lowered(deterministic, overlap="copy_engine"):
    from tilegen.core.pipeline import checked_lowering
    return checked_lowering(gemm_spec(op="gemm_rs", shape=[DynamicDim(name="m", max=4096), ShardedDim(full=8192)],
                                      n=8192, overlap=overlap, deterministic=deterministic))


def test_a_deterministic_copy_engine_gemm_rs_runs_the_direct_style_at_every_size():
    """The 2-rank calibration chooses the ring below 2896 rows: a deterministic op keeps its splits but
    runs direct everywhere (two styles add in two orders), and the check stage refuses a plan that does not."""
    from dataclasses import replace as dc_replace

    from tilegen.overlap.family import FAMILY
    free = {g.world: g for g in _gemm_rs_lowered(False)}
    assert any(st == "ring" for _, st, _ in free[2].ce_choices)  # the rule has something to change
    for g in _gemm_rs_lowered(True):
        assert {st for _, st, _ in g.ce_choices} <= {"direct"} and g.ce_default[0] == "direct"
        assert [(top, sp) for top, _, sp in g.ce_choices] == [(top, sp) for top, _, sp in free[g.world].ce_choices]
    s = gemm_spec(op="gemm_rs", shape=[DynamicDim(name="m", max=4096), ShardedDim(full=8192)], n=8192,
                  overlap="copy_engine", deterministic=True)
    lowered = _gemm_rs_lowered(True)
    bad = [dc_replace(lowered[0], ce_choices=((100, "ring", 1),) + lowered[0].ce_choices), *lowered[1:]]
    assert FAMILY.check(s, lowered, lambda q, compute: compute()) == []
    assert FAMILY.check(s, bad, lambda q, compute: compute()) == [
        "world 2: copy-engine style ring is not deterministic (it takes direct only)"]


def test_a_deterministic_copy_engine_op_refuses_another_style_at_run_time(monkeypatch):
    from tilegen.overlap.runtime import ce_config
    assert ce_config("gemm_rs", 2, 100, ((2896, "direct", 2),), deterministic=True) == ("direct", 2)
    monkeypatch.setenv("TILEGEN_CE_STYLE", "ring")
    assert ce_config("gemm_rs", 2, 100, ())[0] == "ring"
    with pytest.raises(ValueError, match="TILEGEN_CE_STYLE=ring: a deterministic gemm_rs runs direct only"):
        ce_config("gemm_rs", 2, 100, (), deterministic=True)


def test_deterministic_gemm_rs_renders_the_pinned_gemm_and_tells_its_runtime():
    from tilegen.core.pipeline import generate_op
    det = gemm_spec(name="rsd", op="gemm_rs", shape=[DynamicDim(name="m", max=4096), ShardedDim(full=8192)],
                    n=8192, overlap="copy_engine", deterministic=True)
    files = generate_op(det, None, check=False)
    assert "static constexpr bool kDeterministic = true;" in files["rsd.cu"]
    assert "deterministic=True," in files["op.py"]
    plain = generate_op(det.model_copy(update={"deterministic": False}), None, check=False)
    assert "kDeterministic = false;" in plain["rsd.cu"] and "deterministic=" not in plain["op.py"]


def test_the_check_stage_refuses_a_deterministic_plan_with_a_ring():
    """The planner's promise is checked again before any code: a plan that sneaks a ring in is refused."""
    from tilegen.collective.family import FAMILY
    s = spec(op="allreduce", deterministic=True, world_sizes=[4])
    p = plan(s, 4)
    ring = make_schedule("allreduce", "ring", 4, "per_tile")
    bad = replace(p, variants=(replace(p.variants[-1], schedule=ring),))
    problems = FAMILY.check(s, [bad], lambda q, compute: compute())
    assert problems and problems[0].startswith("world 4: ring is not deterministic: out@0[0] adds partial sums")
    assert FAMILY.check(s, [p], lambda q, compute: compute()) == []


# ------------------------------------------------------------------------------ epilogue grid barrier
@pytest.mark.parametrize("op, alg", [("allreduce", "two_shot"), ("allreduce", "ring"), ("allreduce", "ll_one_shot"),
                                     ("reduce_scatter", "direct"), ("reduce_scatter", "ll_direct")])
def test_an_epilogues_grid_barrier_needs_every_cta_resident(op, alg):
    """The hang ranks sharing a GPU hit (some CTAs spun at the epilogue's barrier while others had no SM):
    the schedules alone survive CTAs that wait for an SM; with the barrier only a grid that is resident
    at once (the epilogue ops' cooperative launch) finishes."""
    s = make_schedule(op, alg, 2, "per_tile")
    configs = [(3, 4, False), (4, 6, True)]
    assert check_schedule(s, configs=configs, seeds=1, spare_sms=-1).ok
    assert check_schedule(s, configs=configs, seeds=1, grid_barrier=True).ok
    short = check_schedule(s, configs=configs, seeds=1, grid_barrier=True, spare_sms=-1)
    assert not short.ok and "cannot be scheduled: all 2 SMs are held by spinning CTA 0, CTA 1" in short.problems[0]


def test_epilogue_specs_are_checked_with_their_grid_barrier(monkeypatch):
    from tilegen.collective import family as fam
    asked = []
    monkeypatch.setattr("tilegen.collective.check.verdict_of",
                        lambda s, op, spare, barrier=False: asked.append(barrier) or check_schedule(s, seeds=0))
    s = spec(op="allreduce", world_sizes=[2], shape=[DynamicDim(name="m", max=64), 4096],
             epilogue={"rmsnorm": {"eps": 1e-5}})
    assert fam.FAMILY.check(s, [plan(s, 2)], lambda q, compute: compute()) == []
    assert asked and all(asked)
