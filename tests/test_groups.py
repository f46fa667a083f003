"""Groups of ranks (tilegen.core.group): what every rank's argument makes, slots, bad input; and an op's
group check before anything is launched (a library stand-in records what it was asked)."""
import pytest

from tilegen.core import runtime
from tilegen.core.group import MAX_SLOTS, Group, Registry, agree, describe, handle


def test_one_list_is_one_group_for_every_rank():
    assert describe([2, 3], 4, 0) == [(2, 3)]
    assert describe([[0, 1], [2, 3]], 4, 3) == [(0, 1), (2, 3)]
    assert describe(None, 4, 1) == []
    groups = agree([[(0, 1), (2, 3)]] * 4, [False] * 4)
    assert handle(groups, 1, 2) == Group((2, 3), 1, 0)
    assert handle(groups, 1, 1) == Group((0, 1), 1, 1)


def test_process_groups_add_up_rank_by_rank():
    # ranks 0, 1 pass their TP group, 2, 3 theirs (torch's new_subgroups): one call, two groups
    gathered = [[(0, 1)], [(0, 1)], [(2, 3)], [(2, 3)]]
    assert agree(gathered, [True] * 4) == [(0, 1), (2, 3)]
    # a group and ranks outside it (None)
    assert agree([[(1, 3)], [], [], [(1, 3)]], [True, False, False, True]) == [(1, 3)]


@pytest.mark.parametrize("arg, needle", [
    ([0, 4], "ranks in [0, 4)"),
    ([1, 1], "names a rank twice"),
    ([], "is empty"),
    ([0, "1"], "ranks in [0, 4)"),
    ([True, 2], "ranks in [0, 4)"),
    ("01", "list of ranks"),
    ([[0, 1], [2, 9]], "group 1 must hold ranks in [0, 4)"),
])
def test_bad_ranks_name_what_is_wrong(arg, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        describe(arg, 4, 0)


def test_ranks_must_agree_and_one_call_must_not_overlap():
    with pytest.raises(ValueError, match="every rank must pass the same"):
        agree([[(0, 1)], [(0, 1)], [(0, 2)], [(0, 1)]], [False] * 4)
    with pytest.raises(ValueError, match="share rank 1"):
        agree([[(0, 1), (1, 2)]] * 3, [False] * 3)
    with pytest.raises(ValueError, match="no rank named a group"):
        agree([[], []], [False, False])


def test_slots_share_disjoint_groups_and_separate_overlapping_ones():
    reg = Registry(4)
    assert reg.add([(0, 1), (2, 3)]) == (1, "new")      # TP2 x DP2: one slot
    assert reg.add([(0, 2), (1, 3)]) == (2, "new")      # the DP groups overlap them: a slot of their own
    assert reg.add([(1, 0)]) == (3, "new")               # overlaps both slots' groups
    assert reg.add([(3, 2)]) == (3, "joined")            # disjoint from slot 3's group, no larger: shares it
    assert reg.slots[3].group_of(2) == (3, 2) and reg.slots[3].group_of(0) == (1, 0)
    assert reg.add([(2, 3)]) == (1, "existing")          # made again (e.g. from ProcessGroups): the same slot
    assert reg.add([(0, 1, 2, 3)]) == (0, "existing")    # the world is slot 0's
    assert reg.add([(1, 0, 2, 3)]) == (4, "new")         # the same ranks in another order: another group
    assert reg.slots[0].groups == [(0, 1, 2, 3)]
    reg2 = Registry(4)
    reg2.add([(0,)])
    assert reg2.add([(1, 2)]) == (2, "new")              # larger than slot 1's largest group: a new slot


def test_slots_run_out_with_a_clear_error():
    reg = Registry(8)
    for i in range(MAX_SLOTS - 1):  # every one holds rank 0: a slot each
        assert reg.add([(0, i + 1)]) == (i + 1, "new")
    with pytest.raises(ValueError, match=f"at most {MAX_SLOTS - 1} slots"):
        reg.add([(0, 3, 5)])


class _Library:
    """Stands in for an op library: records the slots set up and selected."""

    def __init__(self):
        self.calls = []

    def init_group(self, slot, alloc_world, pes):
        self.calls.append(("init_group", slot, alloc_world, list(pes)))

    def select(self, slot):
        self.calls.append(("select", slot))


@pytest.fixture
def job(monkeypatch):
    """A 4-rank job seen from rank 2, with TP groups [0, 1], [2, 3] in slot 1 and [0, 2, 3] (3 ranks) in slot 2."""
    reg = Registry(4)
    reg.add([(0, 1), (2, 3)])
    reg.add([(0, 2, 3)])
    monkeypatch.setitem(runtime._state, "initialised", True)
    monkeypatch.setitem(runtime._state, "rank", 2)
    monkeypatch.setitem(runtime._state, "world", 4)
    monkeypatch.setitem(runtime._state, "groups", reg)
    op = runtime.GeneratedOp("/nonexistent", "allgather_bf16", "allgather", "bfloat16", [8, 16], [2, 4])
    op._mod = _Library()
    op._world, op._rank = 4, 2
    return op


def test_an_op_sets_up_every_slot_with_this_ranks_group_or_none(job):
    job._init_slot(1)
    job._init_slot(2)
    # slot 1: this rank's group [2, 3]; slot 2: a group of 3 ranks, a size this op was not generated for
    assert job._mod.calls == [("init_group", 1, 2, [2, 3]), ("init_group", 2, 3, [])]


def test_a_call_selects_its_groups_slot_once(job):
    tp = Group((2, 3), 1, 0)
    job._use(tp)
    job._use(tp)
    assert (job._world, job._rank) == (2, 0)
    job._use(None)
    assert (job._world, job._rank) == (4, 2)
    assert job._mod.calls == [("select", 1), ("select", 0)]


@pytest.mark.parametrize("group, needle", [
    (Group((0, 1), 1, -1), r"group \[0, 1\] does not hold this rank \(2\)"),
    (Group((0, 2, 3), 2, 1), r"has 3 ranks; this op was generated for world sizes \[2, 4\]"),
    ([2, 3], "group must be a tilegen group"),
])
def test_a_wrong_group_is_a_value_error_before_the_library_is_asked(job, group, needle):
    with pytest.raises(ValueError, match=needle):
        job._use(group)
    assert job._mod.calls == []


class _Dist:
    """torch.distributed stand-in for one rank: every rank passed `args` (gathered), barriers counted."""

    def __init__(self, args):
        self.args, self.barriers = args, 0

    def all_gather_object(self, out, obj):
        from tilegen.core.group import describe
        out[:] = [(describe(a, len(self.args), r), False) for r, a in enumerate(self.args)]

    def barrier(self):
        self.barriers += 1


def test_making_a_group_sets_up_slots_only_where_needed(job, monkeypatch):
    """A new slot: every loaded op, on every rank (collective); a joined slot: only the new groups'
    members, then a barrier; groups a slot holds already: nothing (re-making them must not ask the
    libraries again: a second set-up of a slot is an error there)."""
    import sys
    import types

    job._mod, job._world = _Library(), 4
    monkeypatch.setitem(runtime._state, "ops", [job])

    def make(arg, everyone):
        d = _Dist(everyone)
        monkeypatch.setitem(sys.modules, "torch.distributed", d)
        monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(distributed=d))
        job._mod.calls.clear()
        g = runtime.group(arg)
        return g, list(job._mod.calls), d.barriers

    # rank 2; the fixture's registry has [0, 1] + [2, 3] in slot 1 and [0, 2, 3] in slot 2
    g, calls, barriers = make([[0, 1], [2, 3]], [[[0, 1], [2, 3]]] * 4)
    assert (g, calls, barriers) == (Group((2, 3), 1, 0), [], 0)          # existing: nothing
    g, calls, barriers = make([1, 3], [[1, 3]] * 4)                        # overlaps both: a new slot
    assert (g.slot, g.rank, calls, barriers) == (3, -1, [("init_group", 3, 2, [])], 0)
    g, calls, barriers = make([0, 2], [[0, 2]] * 4)                        # disjoint from [1, 3]: joins slot 3
    assert (g, calls, barriers) == (Group((0, 2), 3, 1), [("init_group", 3, 2, [0, 2])], 1)
