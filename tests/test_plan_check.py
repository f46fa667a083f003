"""Planner candidates and cost model; the checker on every schedule and on deliberately broken ones."""
import dataclasses

import pytest

from tilegen import cli
from tilegen.check import check_cover, check_schedule
from tilegen.plan import (ALGORITHMS, MIN_TILE_BYTES, Schedule, Step, direct_schedule, format_plan, max_tiles, plan,
                          ring_schedule, tile_bytes_for, tile_ranges)
from tilegen.spec import DynamicDim, KernelSpec


def spec(**kw):
    base = dict(name="ag", op="allgather", dtype="bf16", world_sizes=[2, 4, 8],
                shape=[DynamicDim(name="m", max=4096), 8192])
    base.update(kw)
    return KernelSpec(**base)


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("alg", ["direct", "ring"])
@pytest.mark.parametrize("sync", ["per_tile", "barrier"])
def test_every_schedule_passes_the_checker(world, alg, sync):
    v = check_schedule(ALGORITHMS[alg](world, sync))
    assert v.ok, str(v)
    assert v.ops > 0 and len(v.configs) >= 4


def test_direct_schedule_shape():
    s = direct_schedule(4, "per_tile")
    r1 = s.ranks[1]
    assert [st.kind for st in r1] == ["entry", "copy", "wait", "wait", "wait"]
    assert r1[0].notify == r1[0].await_ranks == (0, 2, 3)
    assert r1[1].chunk == 1 and set(r1[1].dests) == {0, 1, 2, 3} and r1[1].src == "input"
    assert [st.chunk for st in r1[2:]] == [0, 2, 3]


def test_ring_schedule_forwards_what_it_received():
    s = ring_schedule(4, "per_tile")
    r0 = s.ranks[0]
    assert r0[0].notify == (3,) and r0[0].await_ranks == (1,)
    assert [(st.chunk, st.src, st.dests, st.wait_src) for st in r0[1:4]] == [
        (0, "input", (0, 1), False), (3, "output", (1,), True), (2, "output", (1,), True)]
    assert r0[4].kind == "wait" and r0[4].chunk == 1


def _broken(sched, fn):
    return Schedule("broken", sched.world, sched.sync, tuple(tuple(fn(list(r))) for r in sched.ranks))


def test_checker_rejects_missing_entry_barrier_as_write_after_read():
    b = _broken(direct_schedule(2, "per_tile"), lambda r: [Step("entry")] + r[1:])
    v = check_schedule(b)
    assert not v.ok and any("write-after-read" in p for p in v.problems), v.problems


def test_checker_rejects_missing_waits_as_unsynchronised_reads():
    b = _broken(direct_schedule(2, "barrier"), lambda r: [s for s in r if s.kind != "wait"])
    v = check_schedule(b)
    assert not v.ok and any("unsynchronised read" in p for p in v.problems), v.problems


def test_checker_reports_deadlock_with_rank_cta_and_signal():
    b = _broken(direct_schedule(2, "per_tile"), lambda r: r + [Step("wait", chunk=0)])
    v = check_schedule(b)
    assert not v.ok
    assert any(p.startswith("deadlock: call 1: rank 0 CTA 0 waits flag[0][0]@0 >= 1, sees 0") for p in v.problems), v.problems


def test_checker_rejects_forwarding_before_arrival():
    b = _broken(ring_schedule(4, "per_tile"), lambda r: [dataclasses.replace(s, wait_src=False) for s in r])
    v = check_schedule(b)
    assert not v.ok and any("CTA" in p and "unsynchronised read" in p for p in v.problems)


def test_checker_rejects_double_writes_and_wrong_sources():
    def dup(r):
        c = r[1]
        return r[:2] + [dataclasses.replace(c, dests=tuple(d for d in c.dests))] + r[2:]
    v = check_schedule(_broken(direct_schedule(2, "per_tile"), dup))
    assert any("written 2 times" in p for p in v.problems)

    def wrong_chunk(r):  # each rank stores its shard in the other's slot (and waits accordingly)
        c, w = r[1], r[2]
        return [r[0], dataclasses.replace(c, chunk=w.chunk), dataclasses.replace(w, chunk=c.chunk)]
    v = check_schedule(_broken(direct_schedule(2, "per_tile"), wrong_chunk))
    assert not any("deadlock" in p for p in v.problems)
    assert any("holds rank 0's input tile 0 of call 1, expected rank 1's" in p for p in v.problems), v.problems


def test_tiles_cover_every_byte_exactly_once():
    for n in [1, 15, 16, 17, 4095, 4096, 262144 + 18, 10 ** 7 + 3]:
        for ctas in [1, 7, 264]:
            t = tile_bytes_for(n, 262144, ctas)
            assert t % 16 == 0 and MIN_TILE_BYTES <= t <= 262144
            assert check_cover(n, tile_ranges(n, t)) is None
    assert check_cover(10, [(0, 4), (5, 10)]) is not None
    assert check_cover(10, [(0, 4), (4, 8)]) is not None


def test_signal_slots_hold_every_tile_count_up_to_max():
    s = spec()
    for rows in [1, 2, 100, 4096]:
        n = rows * 8192 * 2
        assert len(tile_ranges(n, tile_bytes_for(n, s.tile_bytes, s.ctas))) <= max_tiles(s)


def test_planner_prefers_direct_on_nvswitch_and_ring_on_ring_links():
    p = plan(spec(), 8)
    assert p.schedule.algorithm == "direct" and "auto -> direct" in p.reason
    p = plan(spec(topology="ring_links"), 8)
    assert p.schedule.algorithm == "ring"
    times = {c.algorithm: c.predicted_us for c in p.candidates}
    assert times["ring"] < times["direct"]


def test_fixed_schedule_is_respected_and_world_checked():
    assert plan(spec(schedule="ring"), 4).schedule.algorithm == "ring"
    with pytest.raises(ValueError, match="world size 3"):
        plan(spec(), 3)


def test_format_plan_lists_candidates_and_every_rank():
    text = format_plan(plan(spec(), 4))
    assert "candidates" in text and "* direct" in text
    for r in range(4):
        assert f"rank {r}:" in text
    assert "signal flag[0][t]=epoch @[1, 2, 3] per tile t" in text


def test_cli_plan_prints_schedule_and_verdict(root, capsys):
    assert cli.main(["plan", str(root / "specs/allgather_bf16.yaml"), "--world", "2"]) == 0
    out = capsys.readouterr().out
    assert "rank 1:" in out and "checker: OK" in out and "entry" in out
    assert cli.main(["plan", str(root / "specs/allgather_bf16.yaml"), "--world", "3"]) == 1
