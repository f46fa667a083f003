"""Groups of ranks that ops run on (tilegen.group).

An op spans one group per call (default: the world). Each group lives in a *slot* of every op: its own
symmetric buffers, plan (for its size) and call sequence. Symmetric allocation is collective over the
whole NVSHMEM world, so making a group is too, as with torch.distributed.new_group: every rank calls
tilegen.group() with the same groups (or its own ProcessGroup). Groups made in one call must be
disjoint (TP groups side by side); they share a slot, since on each rank its buffers serve the one
group the rank is in. A later group takes the first slot whose groups it does not overlap (and whose
largest group it does not outgrow), else a new slot; overlapping groups get different slots, so
interleaved calls on them use different buffers and only need to be issued in the same order by every
member.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

MAX_SLOTS = 8  # host::kMaxGroups (include/tilegen/host/base.cuh)


@dataclass(frozen=True)
class Group:
    """A group of world ranks; `rank` is this process's rank in it (-1: not a member)."""

    ranks: tuple[int, ...]
    slot: int
    rank: int

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __contains__(self, world_rank: int) -> bool:
        return world_rank in self.ranks

    def __repr__(self) -> str:
        return f"<tilegen group {list(self.ranks)} slot {self.slot}, this rank {self.rank}>"


@dataclass
class Slot:
    groups: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def alloc_world(self) -> int:
        """The largest group's size (sizes a MoE op's symmetric allocation of the slot)."""
        return max((len(g) for g in self.groups), default=0)

    def group_of(self, world_rank: int) -> tuple[int, ...]:
        return next((g for g in self.groups if world_rank in g), ())

    def takes(self, new: Sequence[tuple[int, ...]]) -> bool:
        taken = {r for g in self.groups for r in g}
        return all(not (set(g) & taken) for g in new) and max(len(g) for g in new) <= self.alloc_world


class Registry:
    """Every group made so far, by slot, the same on every rank (slot 0: the world)."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list[Slot] = [Slot([tuple(range(world))])]

    def add(self, groups: Sequence[tuple[int, ...]]) -> tuple[int, str]:
        """Places disjoint `groups` (validated) in a slot: (slot, how): "new" (a slot of their own: every
        op allocates it, on every rank), "joined" (an existing slot's buffers serve them: only their
        members set up their part) or "existing" (a slot holds these groups already, the same ranks in the
        same order: one group, one sequence of calls; nothing to set up)."""
        for i, slot in enumerate(self.slots):
            if all(g in slot.groups for g in groups):
                return i, "existing"
        for i, slot in enumerate(self.slots[1:], start=1):
            if slot.takes(groups):
                slot.groups.extend(groups)
                return i, "joined"
        if len(self.slots) >= MAX_SLOTS:
            raise ValueError(
                f"tilegen.group: at most {MAX_SLOTS - 1} slots of groups besides the world (each op keeps buffers "
                f"per slot); groups made in one call, or disjoint from an earlier call's, share one"
            )
        self.slots.append(Slot(list(groups)))
        return len(self.slots) - 1, "new"


def as_ranks(group: Any, world: int, what: str = "ranks") -> tuple[int, ...]:
    """A group's world ranks, validated: distinct ints in [0, world), at least one."""
    try:
        ranks = tuple(group)
    except TypeError:
        raise ValueError(f"tilegen.group: {what} must be a list of ranks, got {type(group).__name__}") from None
    if not ranks:
        raise ValueError(f"tilegen.group: {what} is empty")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < world:
            raise ValueError(f"tilegen.group: {what} must hold ranks in [0, {world}), got {r!r} in {list(ranks)}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"tilegen.group: {what} {list(ranks)} names a rank twice")
    return ranks


def describe(arg: Any, world: int, me: int) -> list[tuple[int, ...]]:
    """What this rank's argument says is being made: one group (a list of ranks, or a torch
    ProcessGroup this rank is in), several disjoint ones (a list of lists), or nothing (None: this
    rank is in none of the groups that other ranks pass as ProcessGroups)."""
    if arg is None:
        return []
    if _is_process_group(arg):
        import torch.distributed as dist

        ranks = as_ranks(dist.get_process_group_ranks(arg), world, "the ProcessGroup's ranks")
        if me not in ranks:
            raise ValueError(f"tilegen.group: rank {me} passed a ProcessGroup it is not in ({list(ranks)})")
        return [ranks]
    items = list(arg) if isinstance(arg, (list, tuple)) else None
    if items is None:
        raise ValueError(f"tilegen.group: expected a list of ranks, a list of such lists, a torch ProcessGroup or "
                         f"None, got {type(arg).__name__}")
    if items and all(isinstance(x, (list, tuple)) for x in items):
        return [as_ranks(x, world, f"group {i}") for i, x in enumerate(items)]
    return [as_ranks(items, world)]


def _is_process_group(arg: Any) -> bool:
    return type(arg).__name__ == "ProcessGroup" and type(arg).__module__.startswith("torch")


def agree(described: Iterable[list[tuple[int, ...]]], by_process_group: Iterable[bool]) -> list[tuple[int, ...]]:
    """The groups every rank's argument (gathered, one per rank) makes together, checked: lists must
    be the same on every rank; ProcessGroups (and None) add up, each rank naming its own; the groups
    must be disjoint."""
    described, by_pg = list(described), list(by_process_group)
    lists = [d for d, pg in zip(described, by_pg) if not pg and d]
    if lists and any(d != lists[0] for d in lists):
        raise ValueError(f"tilegen.group: ranks passed different groups ({lists[0]} and "
                         f"{next(d for d in lists if d != lists[0])}); every rank must pass the same")
    groups: list[tuple[int, ...]] = list(lists[0]) if lists else []
    for d, pg in zip(described, by_pg):
        if pg and d[0] not in groups:
            groups.append(d[0])
    if not groups:
        raise ValueError("tilegen.group: no rank named a group")
    seen: dict[int, tuple[int, ...]] = {}
    for g in groups:
        for r in g:
            if r in seen and seen[r] != g:
                raise ValueError(f"tilegen.group: groups {list(seen[r])} and {list(g)} made in one call share rank "
                                 f"{r}; make overlapping groups in separate calls")
            seen[r] = g
    return groups


def handle(groups: Sequence[tuple[int, ...]], slot: int, me: int) -> Group | None:
    """This rank's Group among `groups` (None if it is in none of them)."""
    mine = next((g for g in groups if me in g), None)
    return Group(mine, slot, mine.index(me)) if mine is not None else None
