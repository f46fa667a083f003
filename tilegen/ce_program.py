"""The copy-engine overlap's per-rank program (plan stage for overlap: copy_engine).

One call of a GEMM op on one rank is a sequence of steps, in the order the host issues them, each
on the caller's stream ("main") or the copy stream ("copy"). The runtime (tilegen/overlap.py) runs
these steps; the checker (tilegen/check.py, check_copy_engine) simulates them on every rank for
several calls under many interleavings. Both read this one description, so the protocol that is
checked is the protocol that runs.

Regions are (buffer, chunk, split): rows [chunk * m + lo, chunk * m + hi) of a buffer of world * m
rows, chunk None for a buffer of m rows, split None for every split of the chunk. Buffers:
  ag_gemm: a [m, k] (the caller's), gathered [world * m, k] (symmetric), c [world * m, n]
  gemm_rs: a [world * m, k], partial [world * m, n] (symmetric), c [m, n], extra.j [m, n] (j < world - 2)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .schedules import _others

MAX_SPLITS = 8  # flags per source rank (kCeMaxSplits in include/tilegen/collective.cuh)

Region = tuple[str, "int | None", "int | None"]


@dataclass(frozen=True)
class Step:
    """kinds: begin (entry handshake, main), fork (copy waits for main), join (main waits for the
    copy stream's steps issued so far), put (copy src into peer's dst, then set the peer's flag),
    get (copy peer's src into dst), signal (set the peer's flag after this stream's work so far),
    wait (until this rank's flag is set, then clear it), gemm (dst = src @ B, or dst += src @ B
    with accumulate), add (dst += src)."""

    stream: str
    kind: str
    peer: int = -1
    flag: int = -1
    dst: Region | None = None
    src: Region | None = None
    accumulate: bool = False


def peers(me: int, world: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ranks this rank sends to, in order; ranks it receives from, in arrival order): the direct
    schedules' order, r+1 first, so at every step each rank receives from one peer (no incast)."""
    to = tuple(_others(world, me))
    return to, to[::-1]


def flag(source: int, split: int) -> int:
    return source * MAX_SPLITS + split


@lru_cache(maxsize=256)
def ag_gemm_program(world: int, me: int, splits: int) -> tuple[Step, ...]:
    """Push this rank's A (split by split, each flagged) into every peer's gathered buffer on the
    copy stream; on the caller's stream, GEMM own rows straight from A, then each arrived split."""
    to, frm = peers(me, world)
    steps = [Step("main", "begin"), Step("copy", "fork")]
    steps += [Step("copy", "put", q, flag(me, s), ("gathered", me, s), ("a", None, s))
              for q in to for s in range(splits)]
    steps.append(Step("main", "gemm", dst=("c", me, None), src=("a", None, None)))
    for q in frm:
        for s in range(splits):
            steps += [Step("main", "wait", flag=flag(q, s)),
                      Step("main", "gemm", dst=("c", q, s), src=("gathered", q, s))]
    steps.append(Step("main", "join"))
    return tuple(steps)


@lru_cache(maxsize=256)
def gemm_rs_program(world: int, me: int, splits: int) -> tuple[Step, ...]:
    """Caller's stream: the rows destined to each peer (split by split, peers in send order), each
    followed by a flag at that peer. Copy stream: pull each split of this rank's rows from every
    peer (the first into c, the others into scratch added to c). Caller's stream, once a split's
    pulls are done: its own rows, added into c in the GEMM's epilogue."""
    to, frm = peers(me, world)
    steps = [Step("main", "begin"), Step("copy", "fork")]
    for s in range(splits):
        for d in to:
            steps += [Step("main", "gemm", dst=("partial", d, s), src=("a", d, s)),
                      Step("main", "signal", d, flag(me, s))]
    for s in range(splits):
        for j, q in enumerate(frm):
            dst = ("c", None, s) if j == 0 else (f"extra.{j - 1}", None, s)
            steps += [Step("copy", "wait", flag=flag(q, s)), Step("copy", "get", q, dst=dst, src=("partial", me, s))]
        steps += [Step("copy", "add", dst=("c", None, s), src=(f"extra.{j}", None, s)) for j in range(world - 2)]
        steps += [Step("main", "join"), Step("main", "gemm", dst=("c", None, s), src=("a", me, s), accumulate=True)]
    steps.append(Step("main", "join"))
    return tuple(steps)


def program(kind: str, world: int, me: int, splits: int) -> tuple[Step, ...]:
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {splits}")
    return (ag_gemm_program if kind == "ag_gemm" else gemm_rs_program)(world, me, splits)
