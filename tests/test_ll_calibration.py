"""Flag-in-data (LL) schedules, the kernel's tile-major order, measured calibrations and tilegen tune's
sweep (CPU side; the GPU tests run every op, LL variants included, at 2 and 4 ranks)."""
import json
import math
from pathlib import Path

import pytest

from tilegen.core.calibration import CALIBRATIONS_DIR, load, resolve
from tilegen.collective.check import check_schedule, expand_agent
from tilegen.collective.render import render_context, totals
from tilegen.collective.ir import Schedule, Seg, Step
from tilegen.core.pipeline import checked_lowering
from tilegen.collective.plan import LL_MAX_BYTES, MAX_VARIANTS, plan
from tilegen.collective.ops import make_schedule
from tilegen.collective.schedules import _others
from tilegen.core.spec import DynamicDim, KernelSpec
from tilegen.tune import auto_vs_fastest, sweep


def spec(**kw):
    base = dict(name="ar", op="allreduce", dtype="bf16", world_sizes=[2, 4],
                shape=[DynamicDim(name="m", max=4096), 1024])
    base.update(kw)
    return KernelSpec(**base)


def _ll_broadcast(world: int) -> Schedule:
    """The root stores into the others' scratch and never hears back: nothing stops it from
    reusing a half its peers still read two calls later."""
    root = [Step("move", unit=0, srcs=(Seg(0, "in", 0),),
                 dests=(Seg(0, "out", 0),) + tuple(Seg(q, "scr", 0) for q in range(1, world)))]
    others = [[Step("move", unit=0, srcs=(Seg(r, "scr", 0),), waits=(Seg(r, "scr", 0),), dests=(Seg(r, "out", 0),))]
              for r in range(1, world)]
    return Schedule("broadcast", "ll_bad", world, "ll", 1, tuple(tuple(b) for b in [root] + others))


def test_ll_without_a_back_channel_is_caught_across_three_calls():
    v = check_schedule(_ll_broadcast(2))
    assert not v.ok
    assert any("write-after-read" in p for p in v.problems), v.problems
    assert any("deadlock" in p and "== 1" in p for p in v.problems), v.problems  # a later call's flag never matches
    assert all("3 calls" in c for c in v.configs)


def test_ll_stores_into_a_peers_output_are_refused():
    s = make_schedule("allgather", "ll_direct", 2, "per_tile")
    bad = list(s.ranks[0])
    bad[0] = Step("move", unit=0, srcs=(Seg(0, "in", 0),), dests=(Seg(0, "out", 0), Seg(1, "out", 0)))
    v = check_schedule(Schedule(s.op, s.algorithm, 2, "ll", 1, (tuple(bad), s.ranks[1])))
    assert not v.ok and "carry no flags" in v.problems[0]


def test_ll_schedules_have_no_entry_handshake_and_store_remotely_only_into_scratch():
    for op, alg in [("allgather", "ll_direct"), ("reduce_scatter", "ll_direct"), ("all_to_all", "ll_direct"),
                    ("allreduce", "ll_one_shot"), ("allreduce", "ll_two_shot")]:
        for w in (2, 4):
            s = make_schedule(op, alg, w, "per_tile")
            assert s.sync == "ll"
            for r, steps in enumerate(s.ranks):
                assert all(st.kind == "move" for st in steps)
                assert all(d.buf == "scr" for st in steps for d in st.dests if d.rank != r)


def test_direct_schedules_spread_their_first_step_over_all_peers():
    """No incast: at each step of a direct reduce-scatter every rank stores into a different peer."""
    for w in (3, 4, 8):
        s = make_schedule("reduce_scatter", "direct", w, "per_tile")
        for k in range(1, w):  # step 0 is the entry handshake
            targets = [s.ranks[r][k].dests[0].rank for r in range(w)]
            assert sorted(targets) == list(range(w)), (w, k, targets)
    assert _others(4, 1) == [2, 3, 0]


def test_per_tile_collectives_run_tile_major_and_gemm_ops_step_by_step():
    ntiles = lambda u: 3  # noqa: E731
    s = make_schedule("reduce_scatter", "direct", 2, "per_tile")
    ops = [o for o in expand_agent(s, 0, 0, 1, ntiles, 1) if o.kind == "write"]
    assert [o.obj[2] for o in ops] == [0, 1, 0, 2, 1, 2]  # round k: push tile k, reduce tile k - 1
    g = make_schedule("gemm_rs", "direct", 2, "per_tile")
    ops = [o for o in expand_agent(g, 0, 0, 1, ntiles, 1, gemm=True) if o.kind == "write"]
    assert [o.obj[2] for o in ops] == [0, 1, 2, 0, 1, 2]


def test_planner_uses_ll_for_small_messages_only():
    for w in (2, 4):
        p = plan(spec(), w, None)
        for v in p.variants:
            lo = max([u.max_bytes for u in p.variants if u.max_bytes < v.max_bytes], default=0)
            if v.schedule.sync == "ll":
                assert lo < LL_MAX_BYTES
        assert p.variants[0].schedule.sync == "ll"
        assert p.variants[-1].schedule.sync != "ll"


def test_ll_schedule_rules_are_clear_errors():
    with pytest.raises(ValueError, match="schedule: ll_two_shot carries its flags in the data and serves inputs up to"):
        spec(schedule="ll_two_shot", shape=[DynamicDim(name="m", max=65536), 1024])
    with pytest.raises(ValueError, match="schedule: ll_two_shot stores through NVLink peer pointers"):
        spec(schedule="ll_two_shot", transport="nvshmem")
    assert all(v.schedule.sync != "ll" for v in plan(spec(transport="nvshmem"), 2).variants)
    with pytest.raises(ValueError):
        make_schedule("ag_gemm", "ll_direct", 2, "per_tile")  # GEMM ops wait on per-tile flags


def test_ll_scratch_is_sized_for_every_ll_variant():
    s = spec(schedule="auto")
    plans = checked_lowering(s, None)
    t = totals(s, plans)
    assert t.ll_slots >= 4 * 4 and t.ll_bytes == 2 * t.ll_slots * t.ll_slot_bytes  # one-shot at 4 ranks: 16 slots
    ctx = render_context(s, plans)
    flags = [v["ll"] for w in ctx["worlds"] for v in w["variants"]]
    assert True in flags and False in flags
    nv = spec(transport="nvshmem")
    assert totals(nv, checked_lowering(nv, None)).ll_bytes == 0


# ------------------------------------------------------------------------------ calibrations
def _cal(tmp_path: Path, rows: list[dict], op="allreduce", world=2) -> Path:
    f = tmp_path / f"{op}_w{world}.json"
    f.write_text(json.dumps({"format": 2, "op": op, "world": world, "device": "test GPU", "measurements": rows}))
    return f


def _row(alg, ctas, tile, n, us):
    return {"schedule": alg, "ctas": ctas, "tile_bytes": tile, "in_bytes": n, "us": us}


def test_measured_plan_follows_the_measurements(tmp_path):
    sizes = [4096 * 4 ** k for k in range(7)]  # 4 KiB .. 16 MiB
    rows = []
    for n in sizes:
        rows.append(_row("ll_one_shot", 16, 0, n, 5.0 if n <= 65536 else 50.0) if n <= LL_MAX_BYTES else None)
        rows.append(_row("two_shot", 66, 65536, n, 6.0 + n / 1e5))
        rows.append(_row("two_shot", 132, 262144, n, 7.0 + n / 2e5))
        rows.append(_row("ring", 132, 262144, n, 30.0 + n / 1.5e5))
    cal = load(_cal(tmp_path, [r for r in rows if r]))
    p = plan(spec(shape=[DynamicDim(name="m", max=8192), 1024]), 2, cal)
    used = {n: next((v.schedule.algorithm, v.ctas) for v in p.variants if n <= v.max_bytes) for n in sizes}
    assert all(used[n] == ("ll_one_shot", 16) for n in sizes if n <= 65536), used
    assert all(used[n][0] == "two_shot" for n in sizes if n > 65536), used  # the ring is never faster
    assert "measured on test GPU" in p.variants[0].reason
    assert len(p.variants) <= MAX_VARIANTS
    # a world without measurements falls back to the cost model
    assert "predicted" in plan(spec(shape=[DynamicDim(name="m", max=8192), 1024]), 4, cal).variants[0].reason


def test_segments_minimise_the_worst_ratio(tmp_path):
    n = [1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20]
    # a is best at the ends, b in the middle: with two ranges the best split still loses somewhere
    rows = [_row("two_shot", 16, 65536, s, t) for s, t in zip(n, [1, 2, 4, 4, 1])]
    rows += [_row("ring", 16, 65536, s, t) for s, t in zip(n, [2, 1, 1, 1, 2])]
    cal = load(_cal(tmp_path, rows))
    one = cal.segments("allreduce", 2, ["two_shot", "ring"], 1 << 20, 1)
    assert len(one) == 1 and one[0][1].algorithm == "ring" and one[0][2] == 2.0
    three = cal.segments("allreduce", 2, ["two_shot", "ring"], 1 << 20, 3)
    assert [s[1].algorithm for s in three] == ["two_shot", "ring", "two_shot"] and max(s[2] for s in three) == 1.0


def test_sweep_groups_configurations_the_kernel_runs_alike():
    groups = sweep(part=8 << 10, threads=512, ll=False)  # 8 KiB parts: one tile, one CTA, whatever asked
    assert len(groups) == 1 and len(groups[0][1]) == 18
    big = sweep(part=64 << 20, threads=512, ll=False)
    assert len(big) >= 15  # at 64 MiB nearly every (CTAs, tile) runs differently
    ll = sweep(part=16 << 10, threads=512, ll=True)  # 2048 lines: 4 CTAs of 512 threads at most
    assert [g[0] for g in ll] == [(16, 0)] and all(t == 0 for _, ms in ll for _, t in ms)


def test_resolve_calibrations(tmp_path):
    assert resolve("none", "sm_90") is None and resolve(None, "sm_90") is None
    assert resolve({"hop_us": 9.0}, "sm_90") == {"hop_us": 9.0}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"topology": {"hop_us": 3.0}}))
    assert resolve(str(old), "sm_90") == {"hop_us": 3.0}
    assert resolve("auto", "sm_80") is None  # nothing measured for that arch
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "measurements": []}))
    with pytest.raises(ValueError, match="format 2"):
        load(bad)


COMMITTED = sorted((CALIBRATIONS_DIR).glob("*/*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=[f"{p.parent.name}/{p.stem}" for p in COMMITTED])
def test_committed_calibrations_pick_within_5_percent_of_the_fastest(root, path):
    """Goal: at every measured size, auto (the plan generate makes from the committed measurements)
    runs a configuration within 5% of the fastest measured one."""
    data = json.loads(path.read_text())
    from tilegen.core.spec_files import load_spec
    s = load_spec(root / "specs" / f"{data['spec']}.yaml").spec
    rows = auto_vs_fastest(s, data["world"], path)
    assert rows and all(not math.isnan(mine) for _, _, mine, _ in rows), rows
    worst = max(mine / fastest for _, _, mine, fastest in rows)
    assert worst <= 1.05, rows


def test_ll_ops_make_every_rank_wait_for_every_other():
    """Why an LL call may follow a non-LL one of the same op (variants switch by size): a rank's call
    ends only after every rank stored data for that call (its output depends on every rank's input),
    so every rank had finished the call before; the next LL call's parity half is free again. True
    of every op with LL schedules, and must stay so (broadcast and reduce have none)."""
    from tilegen.collective.ops import OPS, expected_output
    for kind, d in OPS.items():
        if not any(a.startswith("ll_") for a in d.schedules):
            continue
        for w in (2, 3, 4, 8):
            for r in range(w):
                srcs = {s for k in range(d.out_chunks(w)) for s, _ in (expected_output(kind, w, 1, r, k) or [])}
                assert srcs == set(range(w)), (kind, w, r, srcs)


def test_ll_reads_only_input_and_scratch():
    s = make_schedule("allgather", "ll_direct", 2, "per_tile")
    bad = list(s.ranks[1])
    bad[-1] = Step("move", unit=0, srcs=(Seg(1, "out", 1),), dests=(Seg(1, "out", 0),))
    v = check_schedule(Schedule(s.op, s.algorithm, 2, "ll", 1, (s.ranks[0], tuple(bad))))
    assert not v.ok and "reads only its input and its scratch" in v.problems[0]
