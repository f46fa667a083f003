"""The step IR every stage shares: a schedule is per-rank lists of steps over buffer segments.

Layout (bytes, at call time). A rank's buffers are cut into *chunks* of ``shard`` bytes (chunk c of
the output of an allgather is rank c's shard; an allreduce's tensor is cut into ``world`` chunks,
the last ones possibly shorter or empty) and every chunk into ``parts`` parts of ``part`` bytes
(bidirectional rings send the two halves of a chunk round the ring in opposite directions).
Slot k of a buffer is part k % parts of chunk k // parts. Buffers:
  in    the caller's input (local)          out  the caller's output (symmetric when peers store into it)
  scr   the op's scratch (symmetric), as many slots as the schedule names
Signals: entry[r] (rank r entered the call) and one flag per (buffer, slot, tile); every call has
an epoch (1, 2, ...) that writers store and readers wait for (>=), so signals never need resetting.
The byte arithmetic is tilegen.layout's (and include/tilegen/layout.cuh's, the same rules in C++).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Buf = Literal["in", "out", "scr"]


@dataclass(frozen=True, order=True)
class Seg:
    """Slot ``slot`` of buffer ``buf`` on rank ``rank`` (rank relative to the root, see Schedule)."""

    rank: int
    buf: str
    slot: int

    def __str__(self) -> str:
        return f"{self.buf}@{self.rank}[{self.slot}]"


@dataclass(frozen=True)
class Step:
    """One step of one rank's program. Tiles are spread over CTAs: tile t -> CTA t % ctas.

    entry: CTA 0 stores entry[me]=epoch at each rank in ``notify``; every CTA then waits
           entry[p] >= epoch for each p in ``await_ranks`` (the ranks whose buffers it writes).
    move:  for each tile of ``unit`` (the logical slot whose length applies): wait for the flags of
           ``waits`` (segments of this rank that peers fill), read ``srcs`` (one: copy; several:
           reduce element-wise in fp32, multiplying the sources ``scaled`` marks by the call's scale
           first: PreMulSum), store to every segment of ``dests``, and signal the flag of
           each remote dest (per tile, or once by the last CTA in barrier mode); with ``signal_self``
           also the flag of its own dests (a fused GEMM on this rank waits on them).
    wait:  wait until the flags of ``waits`` are set for every tile.
    """

    kind: Literal["entry", "move", "wait"]
    unit: int = -1
    srcs: tuple[Seg, ...] = ()
    dests: tuple[Seg, ...] = ()
    waits: tuple[Seg, ...] = ()
    notify: tuple[int, ...] = ()
    await_ranks: tuple[int, ...] = ()
    signal_self: bool = False
    scaled: tuple[bool, ...] = ()  # per source: multiplied by the call's scale (schedules.with_premul)

    def describe(self, rank: int, sync: str) -> str:
        if sync == "ll":
            return self._describe_ll(rank)
        per = "per tile t" if sync == "per_tile" else "per chunk by the last CTA, t=0"
        if self.kind == "entry":
            return (f"entry   store entry[{rank}]=epoch -> ranks {list(self.notify)}; "
                    f"wait entry[p] >= epoch for p in {list(self.await_ranks)}")
        waits = ", ".join(f"flag[{w.buf}][{w.slot}]" + ("" if w.buf == "in" else "[t]") for w in self.waits)
        if self.kind == "wait":
            return f"wait    {waits} >= epoch ({per})"
        pre = f"wait {waits} >= epoch; " if self.waits else ""
        what = "put    " if len(self.srcs) == 1 else "reduce "
        src = self._sources()
        dst = ", ".join(str(d) for d in self.dests)
        remote = sorted({d.rank for d in self.dests if d.rank != rank or self.signal_self})
        sig = f"; signal their flags @{remote} {per}" if remote else ""
        return f"{what} {pre}{src} (unit {self.unit}) -> {dst}{sig}"


    def _sources(self, ll: bool = False) -> str:
        """The sources as read: scaled ones as s*x, LL scratch as lines that carry their flag."""
        scaled = self.scaled or (False,) * len(self.srcs)
        return " + ".join(("s*" if k else "") + f"{g.buf}[{g.slot}]"
                          + (" (LL lines, as their flag arrives)" if ll and g.buf == "scr" else "")
                          for g, k in zip(self.srcs, scaled))

    def _describe_ll(self, rank: int) -> str:
        what = "put    " if len(self.srcs) == 1 else "reduce "
        src = self._sources(ll=True)
        dst = ", ".join(str(d) + (" (LL lines: flag in the data)" if d.buf == "scr" else "") for d in self.dests)
        return f"{what} {src} (unit {self.unit}) -> {dst}"


@dataclass(frozen=True)
class Schedule:
    """Per-rank steps. For broadcast, ranks are relative to the root (rank r runs ranks[(r - root) % W])."""

    op: str
    algorithm: str
    world: int
    sync: str
    parts: int
    ranks: tuple[tuple[Step, ...], ...]
    scaled: bool = False  # PreMulSum: every contribution is multiplied by the call's scale, once

    @property
    def max_steps(self) -> int:
        return max(len(r) for r in self.ranks)

    def slots(self, buf: str) -> int:
        n = 0
        for steps in self.ranks:
            for s in steps:
                for g in s.srcs + s.dests + s.waits:
                    if g.buf == buf:
                        n = max(n, g.slot + 1)
        return n
