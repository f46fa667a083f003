"""The copy-engine overlap's per-rank program (plan stage for overlap: copy_engine).

One call of a GEMM op on one rank is a sequence of steps, in the order the host issues them, each
on the caller's stream ("main") or the copy stream ("copy"). The runtime (tilegen/overlap/runtime.py) runs
these steps; the checker (tilegen/overlap/check.py, check_copy_engine) simulates them on every rank for
several calls under many interleavings. Both read this one description, so the protocol that is
checked is the protocol that runs.

Regions are (buffer, chunk, split): rows [chunk * m + lo, chunk * m + hi) of a buffer of chunks of m
rows, chunk None for a buffer of m rows, split None for every split of the chunk; a step's `count`
makes them chunks chunk .. chunk + count - 1 (whole chunks: one block of rows for a GEMM, the terms
of a sum for a reduce). Buffers:
  ag_gemm: a [m, k] (the caller's), gathered [world * m, k] (symmetric), c [world * m, n]
  gemm_rs: a [world * m, k], acc [(world - 1) * m, n], recv [(world - 1) * m, n] (symmetric), c [m, n]

Each op has styles (what `overlap: auto` chooses between by measured size ranges, tilegen/overlap/runtime.py):
  ag_gemm "chunks": a GEMM per arrived split; "merged": the peers' rows in (at most) two GEMMs once
    they arrived (small m: one GEMM per chunk leaves SMs idle); "merged_spread": merged, the pushes
    to the peers on one copy stream each (at once).
  gemm_rs "direct": each peer's rows pushed to it, summed there (one hop); "ring": a ring whose sums
    are the GEMMs' epilogues (no reduction kernel, world - 1 hops).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..collective.schedules import _others

MAX_SPLITS = 8  # flags per source rank (kCeMaxSplits in include/tilegen/collective.cuh)

Region = tuple[str, "int | None", "int | None"]


@dataclass(frozen=True)
class Step:
    """Streams: "main" (the caller's) and copy streams ("copy", "copy0", "copy1", ...). kinds: begin
    (entry handshake, main), fork (a copy stream waits for main), join (main waits for every copy
    stream's steps issued so far), put (copy src into peer's dst, then set the peer's flag),
    wait (until this rank's flag is set, then clear it), gemm (dst = src @ B, plus addend when it
    has one, in the GEMM's epilogue), reduce (dst += the sum of src's count chunks, in fp32)."""

    stream: str
    kind: str
    peer: int = -1
    flag: int = -1
    dst: Region | None = None
    src: Region | None = None
    addend: Region | None = None
    count: int = 1


def peers(me: int, world: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ranks this rank sends to, in order; ranks it receives from, in arrival order): the direct
    schedules' order, r+1 first, so at every step each rank receives from one peer (no incast)."""
    to = tuple(_others(world, me))
    return to, to[::-1]


STYLES = {"ag_gemm": ("chunks", "merged", "merged_spread"), "gemm_rs": ("direct", "ring")}
# The style a deterministic op runs at every size: direct adds each output row's terms in an order fixed
# per rank (own rows' GEMM plus the first arrival in its epilogue, then the other arrivals in slot order),
# whatever m and the splits; the ring's epilogue sums would do too, but two styles by size would not.
DETERMINISTIC_STYLE = {"gemm_rs": "direct"}
# (style, row splits) at sizes no measurement covers (a calibration's copy_engine/choices.json)
CE_DEFAULT = {"ag_gemm": ("chunks", 1), "gemm_rs": ("direct", 2)}


def flag(source: int, split: int) -> int:
    """The flag rank `source`'s split `split` sets once it landed (the ring: source is the step)."""
    return source * MAX_SPLITS + split


@lru_cache(maxsize=256)
def ag_gemm_program(world: int, me: int, splits: int, style: str = "chunks") -> tuple[Step, ...]:
    """Push this rank's A (split by split, each flagged) into every peer's gathered buffer on the
    copy stream; on the caller's stream, GEMM own rows straight from A, then each arrived split
    (chunks), or the peers' rows below and above its own, each in one GEMM once arrived (merged)."""
    to, frm = peers(me, world)
    steps = [Step("main", "begin")]
    # merged_spread: one copy stream per peer, so the pushes run at once on several DMA engines
    # (everything arrives sooner; worth it where the GEMM waits for every chunk anyway)
    streams = [f"copy{i}" if style == "merged_spread" else "copy" for i in range(len(to))]
    steps += [Step(st, "fork") for st in dict.fromkeys(streams)]
    steps += [Step(on, "put", q, flag(me, s), ("gathered", me, s), ("a", None, s))
              for on, q in zip(streams, to) for s in range(splits)]
    steps.append(Step("main", "gemm", dst=("c", me, None), src=("a", None, None)))
    if style.startswith("merged"):  # arrival order: me - 1 .. 0 (below), then world - 1 .. me + 1 (above)
        for lo, hi in ((0, me), (me + 1, world)):
            if hi > lo:
                steps += [Step("main", "wait", flag=flag(q, s)) for q in frm if lo <= q < hi for s in range(splits)]
                steps.append(Step("main", "gemm", dst=("c", lo, None), src=("gathered", lo, None), count=hi - lo))
    else:
        for q in frm:
            for s in range(splits):
                steps += [Step("main", "wait", flag=flag(q, s)),
                          Step("main", "gemm", dst=("c", q, s), src=("gathered", q, s))]
    steps.append(Step("main", "join"))
    return tuple(steps)


@lru_cache(maxsize=256)
def gemm_rs_direct(world: int, me: int, splits: int) -> tuple[Step, ...]:
    """Caller's stream: each peer's rows (split by split, peers in send order) into acc, each pushed
    on the copy stream into that peer's recv slot (slot j: from rank peer - 1 - j, its j-th arrival)
    once computed; then its own rows plus the first arrival (the GEMM's epilogue), and the other
    arrivals summed in by one reduction per split."""
    to, frm = peers(me, world)
    steps = [Step("main", "begin")]
    for s in range(splits):
        for j, d in enumerate(to):
            slot = (d - 1 - me) % world
            steps += [Step("main", "gemm", dst=("acc", j, s), src=("a", d, s)),
                      Step("copy", "fork"),
                      Step("copy", "put", d, flag(me, s), ("recv", slot, s), ("acc", j, s))]
    for s in range(splits):
        steps += [Step("main", "wait", flag=flag(frm[0], s)),
                  Step("main", "gemm", dst=("c", None, s), src=("a", me, s), addend=("recv", 0, s))]
    for s in range(splits if world > 2 else 0):
        steps += [Step("main", "wait", flag=flag(q, s)) for q in frm[1:]]
        steps.append(Step("main", "reduce", dst=("c", None, s), src=("recv", 1, s), count=world - 2))
    steps.append(Step("main", "join"))
    return tuple(steps)


@lru_cache(maxsize=256)
def gemm_rs_ring(world: int, me: int, splits: int) -> tuple[Step, ...]:
    """A ring whose additions are the GEMMs' epilogues (no reduction kernels). At ring step t this
    rank computes chunk d = me - 1 - t's rows, plus (t > 0) the sum of the t + 1 previous ranks'
    products that rank me - 1 pushed into recv, and pushes the result to rank me + 1 on the copy
    stream while it computes the next split; its own rows, last, add the sum of all the others.
    Split s of step t waits for the neighbour's split s of step t - 1, which was computed splits - 1
    GEMMs earlier: the copy is hidden while it takes under (splits - 1) split GEMMs."""
    nxt = (me + 1) % world
    steps = [Step("main", "begin")]
    for t in range(world - 1):
        d = (me - 1 - t) % world
        for s in range(splits):
            if t:
                steps.append(Step("main", "wait", flag=flag(t - 1, s)))
            addend = ("recv", t - 1, s) if t else None
            steps += [Step("main", "gemm", dst=("acc", t, s), src=("a", d, s), addend=addend),
                      Step("copy", "fork"),
                      Step("copy", "put", nxt, flag(t, s), ("recv", t, s), ("acc", t, s))]
    for s in range(splits):
        steps += [Step("main", "wait", flag=flag(world - 2, s)),
                  Step("main", "gemm", dst=("c", None, s), src=("a", me, s), addend=("recv", world - 2, s))]
    steps.append(Step("main", "join"))
    return tuple(steps)


def program(kind: str, world: int, me: int, splits: int, style: str | None = None) -> tuple[Step, ...]:
    """Rank me's program of op kind `kind` (style None: the first of STYLES[kind])."""
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {splits}")
    style = style or STYLES[kind][0]
    if style not in STYLES[kind]:
        raise ValueError(f"{kind} copy-engine style must be one of {', '.join(STYLES[kind])}, got {style!r}")
    if kind == "ag_gemm":
        return ag_gemm_program(world, me, splits, style)
    return (gemm_rs_direct if style == "direct" else gemm_rs_ring)(world, me, splits)
