"""Stage 2: planner.

Turns a spec into per-rank schedules of steps, chosen among candidate algorithms by a cost model
of the topology. A schedule is data: the checker simulates exactly these steps, and the code
generator emits them as step tables that one generic kernel executes.

Layout (bytes, at call time). A rank's buffers are cut into *chunks* of ``shard`` bytes (chunk c of
the output of an allgather is rank c's shard; an allreduce's tensor is cut into ``world`` chunks,
the last ones possibly shorter or empty) and every chunk into ``parts`` parts of ``part`` bytes
(bidirectional rings send the two halves of a chunk round the ring in opposite directions).
Slot k of a buffer is part k % parts of chunk k // parts. Buffers:
  in    the caller's input (local)          out  the caller's output (symmetric)
  scr   the op's scratch (symmetric), as many slots as the schedule names
Signals: entry[r] (rank r entered the call) and one flag per (buffer, slot, tile); every call has
an epoch (1, 2, ...) that writers store and readers wait for (>=), so signals never need resetting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Literal

from .spec import ARCH_MIN_SMS, GEMM_OPS, KernelSpec

MIN_TILE_BYTES = 16 * 1024  # below this a CTA's fixed cost dominates; small parts use fewer CTAs
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
           reduce element-wise in fp32), store to every segment of ``dests``, and signal the flag of
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

    def describe(self, rank: int, sync: str) -> str:
        per = "per tile t" if sync == "per_tile" else "per chunk by the last CTA, t=0"
        if self.kind == "entry":
            return (f"entry   store entry[{rank}]=epoch -> ranks {list(self.notify)}; "
                    f"wait entry[p] >= epoch for p in {list(self.await_ranks)}")
        waits = ", ".join(f"flag[{w.buf}][{w.slot}]" + ("" if w.buf == "in" else "[t]") for w in self.waits)
        if self.kind == "wait":
            return f"wait    {waits} >= epoch ({per})"
        pre = f"wait {waits} >= epoch; " if self.waits else ""
        what = "put    " if len(self.srcs) == 1 else "reduce "
        src = " + ".join(f"{s.buf}[{s.slot}]" for s in self.srcs)
        dst = ", ".join(str(d) for d in self.dests)
        remote = sorted({d.rank for d in self.dests if d.rank != rank or self.signal_self})
        sig = f"; signal their flags @{remote} {per}" if remote else ""
        return f"{what} {pre}{src} (unit {self.unit}) -> {dst}{sig}"


@dataclass(frozen=True)
class Schedule:
    """Per-rank steps. For broadcast, ranks are relative to the root (rank r runs ranks[(r - root) % W])."""

    op: str
    algorithm: str
    world: int
    sync: str
    parts: int
    ranks: tuple[tuple[Step, ...], ...]

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


# ------------------------------------------------------------------------------ op definitions
@dataclass(frozen=True)
class OpDef:
    """What an op computes, in chunks of the schedule's layout (not spec.IO_SHARDS's rows: an
    allreduce's input is one shard of rows but ``world`` chunks here)."""

    kind: str
    in_chunks: Callable[[int], int]  # world -> chunks of the input
    out_chunks: Callable[[int], int]
    reduces: bool


OPS: dict[str, OpDef] = {
    "allgather": OpDef("allgather", lambda w: 1, lambda w: w, False),
    "reduce_scatter": OpDef("reduce_scatter", lambda w: w, lambda w: 1, True),
    "allreduce": OpDef("allreduce", lambda w: w, lambda w: w, True),
    "all_to_all": OpDef("all_to_all", lambda w: w, lambda w: w, False),
    "broadcast": OpDef("broadcast", lambda w: 1, lambda w: 1, False),
}


def expected_output(op: str, world: int, parts: int, rank: int, slot: int) -> list[tuple[int, int]]:
    """The (source rank, input slot) pairs whose data output slot ``slot`` of ``rank`` must hold
    (summed when there are several). Ranks are absolute; broadcast's root is rank 0."""
    c, h = divmod(slot, parts)
    if op == "allgather":
        return [(c, h)]
    if op == "reduce_scatter":
        return [(s, rank * parts + h) for s in range(world)]
    if op == "allreduce":
        return [(s, slot) for s in range(world)]
    if op == "all_to_all":
        return [(c, rank * parts + h)]
    if op == "broadcast":
        return [(0, slot)]
    raise ValueError(op)


# ------------------------------------------------------------------------------ schedules
def _with_entry(op: str, alg: str, world: int, sync: str, parts: int, bodies: list[list[Step]]) -> Schedule:
    """Prefix every rank's program with the entry handshake its remote writes need: a rank may store
    into a peer's buffers only after that peer entered the call (it no longer reads the last call's)."""
    writes_to = [sorted({d.rank for s in body for d in s.dests if d.rank != r}) for r, body in enumerate(bodies)]
    written_by = [sorted(r for r in range(world) if q in writes_to[r]) for q in range(world)]
    ranks = []
    for r, body in enumerate(bodies):
        entry = Step("entry", notify=tuple(written_by[r]), await_ranks=tuple(writes_to[r]))
        ranks.append(tuple([entry] + body))
    return Schedule(op, alg, world, sync, parts, tuple(ranks))


def _others(world: int, r: int) -> list[int]:
    return [p for p in range(world) if p != r]


def ag_direct(w: int, sync: str) -> Schedule:
    bodies = []
    for r in range(w):
        body = [Step("move", unit=r, srcs=(Seg(r, "in", 0),), dests=tuple(Seg(q, "out", r) for q in [r] + _others(w, r)))]
        body += [Step("wait", unit=p, waits=(Seg(r, "out", p),)) for p in _others(w, r)]
        bodies.append(body)
    return _with_entry("allgather", "direct", w, sync, 1, bodies)


def _ag_ring_body(w: int, r: int, d: int, h: int, P: int, first_srcs: tuple[Seg, ...] | None = None,
                  first_waits: tuple[Seg, ...] = ()) -> list[Step]:
    """Allgather round a ring in direction d for part h; the first move sends our chunk (from the
    input, or from ``first_srcs`` when a reduction produced it)."""
    nxt = (r + d) % w
    u = r * P + h
    srcs = first_srcs or (Seg(r, "in", h),)
    body = [Step("move", unit=u, srcs=srcs, waits=first_waits, dests=(Seg(r, "out", u), Seg(nxt, "out", u)))]
    for s in range(1, w - 1):
        c = ((r - d * s) % w) * P + h
        body.append(Step("move", unit=c, srcs=(Seg(r, "out", c),), waits=(Seg(r, "out", c),), dests=(Seg(nxt, "out", c),)))
    last = ((r + d) % w) * P + h
    body.append(Step("wait", unit=last, waits=(Seg(r, "out", last),)))
    return body


def _interleave(a: list[Step], b: list[Step]) -> list[Step]:
    out = []
    for i in range(max(len(a), len(b))):
        out += a[i:i + 1] + b[i:i + 1]
    return out


def ag_ring(w: int, sync: str) -> Schedule:
    return _with_entry("allgather", "ring", w, sync, 1, [_ag_ring_body(w, r, 1, 0, 1) for r in range(w)])


def ag_bidir(w: int, sync: str) -> Schedule:
    bodies = [_interleave(_ag_ring_body(w, r, 1, 0, 2), _ag_ring_body(w, r, -1, 1, 2)) for r in range(w)]
    return _with_entry("allgather", "bidir_ring", w, sync, 2, bodies)


def _push_to_owners(w: int, r: int) -> list[Step]:
    """Reduce-scatter's first shot: chunk q of my input goes to rank q's scratch slot r."""
    return [Step("move", unit=q, srcs=(Seg(r, "in", q),), dests=(Seg(q, "scr", r),)) for q in _others(w, r)]


def _reduce_own(w: int, r: int, dests: tuple[Seg, ...]) -> Step:
    scr = tuple(Seg(r, "scr", s) for s in _others(w, r))
    return Step("move", unit=r, srcs=(Seg(r, "in", r),) + scr, waits=scr, dests=dests)


def rs_direct(w: int, sync: str) -> Schedule:
    bodies = [_push_to_owners(w, r) + [_reduce_own(w, r, (Seg(r, "out", 0),))] for r in range(w)]
    return _with_entry("reduce_scatter", "direct", w, sync, 1, bodies)


def _rs_ring_body(w: int, r: int, d: int, h: int, P: int) -> tuple[list[Step], tuple[Seg, ...], tuple[Seg, ...]]:
    """Reduce-scatter round a ring: at step s rank r adds its part of chunk r - d*s to what came from
    r - d and passes it on (scratch slot s). Returns the steps and the sources/waits of the final
    reduction of chunk r (left to the caller: it decides where the result goes)."""
    nxt = (r + d) % w
    body = []
    for s in range(1, w):
        c = ((r - d * s) % w) * P + h
        srcs = (Seg(r, "in", c),)
        waits: tuple[Seg, ...] = ()
        if s > 1:
            prev = Seg(r, "scr", (s - 1) * P + h)
            srcs, waits = srcs + (prev,), (prev,)
        body.append(Step("move", unit=c, srcs=srcs, waits=waits, dests=(Seg(nxt, "scr", s * P + h),)))
    last = Seg(r, "scr", (w - 1) * P + h)
    return body, (Seg(r, "in", r * P + h), last), (last,)


def _rings(op: str, w: int, sync: str, bidir: bool, finish) -> Schedule:
    """A reduce-scatter ring (both directions, one half each, when bidir) followed by what
    ``finish(r, d, h, P, srcs, waits)`` makes of each rank's reduced part."""
    P = 2 if bidir else 1
    bodies = []
    for r in range(w):
        parts = []
        for d, h in ([(1, 0), (-1, 1)] if bidir else [(1, 0)]):
            body, srcs, waits = _rs_ring_body(w, r, d, h, P)
            parts.append(body + finish(r, d, h, P, srcs, waits))
        bodies.append(_interleave(*parts) if bidir else parts[0])
    return _with_entry(op, "bidir_ring" if bidir else "ring", w, sync, P, bodies)


def rs_ring(w: int, sync: str, bidir: bool = False) -> Schedule:
    return _rings("reduce_scatter", w, sync, bidir, lambda r, d, h, P, srcs, waits: [
        Step("move", unit=r * P + h, srcs=srcs, waits=waits, dests=(Seg(r, "out", h),))])


def ar_one_shot(w: int, sync: str) -> Schedule:
    """Every rank pushes its whole tensor into every peer's scratch, then reduces locally."""
    bodies = []
    for r in range(w):
        body = [Step("move", unit=c, srcs=(Seg(r, "in", c),), dests=tuple(Seg(q, "scr", r * w + c) for q in _others(w, r)))
                for c in range(w)]
        for c in range(w):
            scr = tuple(Seg(r, "scr", s * w + c) for s in _others(w, r))
            body.append(Step("move", unit=c, srcs=(Seg(r, "in", c),) + scr, waits=scr, dests=(Seg(r, "out", c),)))
        bodies.append(body)
    return _with_entry("allreduce", "one_shot", w, sync, 1, bodies)


def ar_two_shot(w: int, sync: str) -> Schedule:
    """Reduce-scatter by direct pushes, then the owner stores its reduced chunk into every output."""
    bodies = []
    for r in range(w):
        body = _push_to_owners(w, r)
        body.append(_reduce_own(w, r, tuple(Seg(q, "out", r) for q in [r] + _others(w, r))))
        body += [Step("wait", unit=p, waits=(Seg(r, "out", p),)) for p in _others(w, r)]
        bodies.append(body)
    return _with_entry("allreduce", "two_shot", w, sync, 1, bodies)


def ar_ring(w: int, sync: str, bidir: bool = False) -> Schedule:
    """Reduce-scatter round the ring, then allgather the reduced parts round it."""
    return _rings("allreduce", w, sync, bidir, lambda r, d, h, P, srcs, waits:
                  _ag_ring_body(w, r, d, h, P, first_srcs=srcs, first_waits=waits))


def a2a_direct(w: int, sync: str) -> Schedule:
    bodies = []
    for r in range(w):
        body = [Step("move", unit=r, srcs=(Seg(r, "in", r),), dests=(Seg(r, "out", r),))]
        body += [Step("move", unit=q, srcs=(Seg(r, "in", q),), dests=(Seg(q, "out", r),)) for q in _others(w, r)]
        body += [Step("wait", unit=p, waits=(Seg(r, "out", p),)) for p in _others(w, r)]
        bodies.append(body)
    return _with_entry("all_to_all", "direct", w, sync, 1, bodies)


def bc_direct(w: int, sync: str) -> Schedule:
    bodies = [[Step("move", unit=0, srcs=(Seg(0, "in", 0),), dests=tuple(Seg(q, "out", 0) for q in range(w)))]]
    bodies += [[Step("wait", unit=0, waits=(Seg(r, "out", 0),))] for r in range(1, w)]
    return _with_entry("broadcast", "direct", w, sync, 1, bodies)


def bc_chain(w: int, sync: str) -> Schedule:
    """Pipelined chain root -> 1 -> 2 -> ...: each rank forwards tiles as they arrive."""
    bodies = [[Step("move", unit=0, srcs=(Seg(0, "in", 0),), dests=(Seg(0, "out", 0), Seg(1, "out", 0)))]]
    for r in range(1, w - 1):
        bodies.append([Step("move", unit=0, srcs=(Seg(r, "out", 0),), waits=(Seg(r, "out", 0),), dests=(Seg(r + 1, "out", 0),))])
    bodies.append([Step("wait", unit=0, waits=(Seg(w - 1, "out", 0),))])
    return _with_entry("broadcast", "chain", w, sync, 1, bodies)


ALGORITHMS: dict[str, dict[str, Callable[[int, str], Schedule]]] = {
    "allgather": {"direct": ag_direct, "ring": ag_ring, "bidir_ring": ag_bidir},
    "reduce_scatter": {"direct": rs_direct, "ring": rs_ring, "bidir_ring": lambda w, s: rs_ring(w, s, True)},
    "allreduce": {"one_shot": ar_one_shot, "two_shot": ar_two_shot, "ring": ar_ring,
                  "bidir_ring": lambda w, s: ar_ring(w, s, True)},
    "all_to_all": {"direct": a2a_direct},
    "broadcast": {"direct": bc_direct, "chain": bc_chain},
}


def comm_kind(op: str) -> str:
    """The collective that moves an op's data (ag_gemm gathers A; gemm_rs reduce-scatters partial C)."""
    return {"ag_gemm": "allgather", "gemm_rs": "reduce_scatter"}.get(op, op)


def with_input_waits(s: Schedule) -> Schedule:
    """gemm_rs: the input (partial C) is produced by GEMMs during the call, chunk by chunk; every move
    that reads an input chunk first waits for that chunk's flag (set by the compute stream)."""
    ranks = []
    for steps in s.ranks:
        out = []
        for st in steps:
            ins = tuple(g for g in st.srcs if g.buf == "in")
            out.append(replace(st, waits=ins + st.waits) if st.kind == "move" and ins else st)
        ranks.append(tuple(out))
    return replace(s, ranks=tuple(ranks))


def with_local_signals(s: Schedule) -> Schedule:
    """Fused ag_gemm: the GEMM reads every chunk of A, its own too, from the gathered buffer, so the
    moves that fill this rank's own output also set its flags."""
    ranks = tuple(tuple(replace(st, signal_self=True) if st.kind == "move" and any(d.rank == r and d.buf == "out" for d in st.dests)
                        else st for st in steps) for r, steps in enumerate(s.ranks))
    return replace(s, ranks=ranks)


def production_order(s: Schedule, rank: int) -> tuple[int, ...]:
    """gemm_rs: the chunks of partial C in the order the communication first needs them."""
    first: dict[int, int] = {}
    for i, st in enumerate(s.ranks[rank]):
        for g in st.srcs:
            if g.buf == "in":
                first.setdefault(g.slot // s.parts, i)
    return tuple(sorted(first, key=lambda c: (first[c], c)))


def algorithms_for(op: str) -> list[str]:
    return list(ALGORITHMS[comm_kind(op)])


def arrival_order(s: Schedule, rank: int) -> tuple[int, ...]:
    """Chunks of an allgather's output in the order they become complete on ``rank``: its own chunk
    first, then by the step at which the last of its parts is waited for (GEMMs follow this order)."""
    done: dict[int, int] = {}
    for i, st in enumerate(s.ranks[rank]):
        if st.kind == "move" and st.srcs and st.srcs[0].buf == "in":
            for d in st.dests:
                if d.rank == rank:
                    done[d.slot // s.parts] = max(done.get(d.slot // s.parts, -1), -1)
        for g in st.waits:
            if g.buf == "out":
                done[g.slot // s.parts] = max(done.get(g.slot // s.parts, -1), i)
    return tuple(sorted(done, key=lambda c: (done[c], c)))


@lru_cache(maxsize=None)
def make_schedule(op: str, algorithm: str, world: int, sync: str, fused: bool = False) -> Schedule:
    """Schedules are pure functions of these: build each once."""
    kind = comm_kind(op)
    try:
        s = ALGORITHMS[kind][algorithm](world, sync)
    except KeyError:
        raise ValueError(f"op {op} has no schedule {algorithm!r}; it has {', '.join(ALGORITHMS[kind])}") from None
    if op == "gemm_rs":
        return with_input_waits(s)
    return with_local_signals(s) if op == "ag_gemm" and fused else s


# ------------------------------------------------------------------------------ runtime layout
def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def layout(op: str, world: int, in_bytes: int, elem: int, parts: int) -> tuple[int, int]:
    """(shard, part) bytes for a call. Same rule as the kernel's host code (templates/collective.cu.j2)."""
    if op == "allreduce":  # the tensor is cut into world chunks; 16 B boundaries keep stores vectorised
        shard = align_up(-(-in_bytes // world), 16)
    elif op in ("reduce_scatter", "all_to_all"):
        shard = in_bytes // world
    else:
        shard = in_bytes
    part = shard if parts == 1 else align_up(-(-shard // parts), 16 if shard % 16 == 0 or op == "allreduce" else elem)
    return shard, part


def unit_length(op: str, world: int, in_bytes: int, shard: int, part: int, parts: int, unit: int) -> int:
    c, h = divmod(unit, parts)
    chunk = min(shard, max(0, in_bytes - c * shard)) if op == "allreduce" else shard
    return max(0, min(part, chunk - h * part))


def tile_bytes_for(part_bytes: int, tile_bytes: int, ctas: int) -> int:
    """Runtime tile size: spread small parts over the CTAs, never above the plan's tile size."""
    per_cta = align_up(-(-max(part_bytes, 1) // ctas), 16)
    return max(min(tile_bytes, per_cta), min(MIN_TILE_BYTES, tile_bytes))


def tile_ranges(n: int, tile: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + tile, n)) for lo in range(0, n, tile)]


# ------------------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class Topology:
    """Cost-model constants (microseconds, bytes per microsecond). `tilegen tune` can replace them."""

    name: str
    launch_us: float = 4.0  # kernel launch until the first CTA runs
    hop_us: float = 1.5  # one dependent signal over a link (store, fence, remote poll)
    step_us: float = 0.4  # one more step of a rank's program (a pass over its tiles)
    egress_Bpus: float = 365e3  # a GPU's outgoing peer-store bandwidth (365 GB/s, FACTS.md)
    link_Bpus: float = 365e3  # one directed link (ring_links)
    cta_Bpus: float = 2.2e3  # what one CTA of 512 threads sustains to a peer (~2.2 GB/s/CTA)
    reduce_Bpus: float = 1500e3  # local HBM bytes read+written per us while reducing

    def link_time(self, world: int, flows: dict[tuple[int, int], int]) -> float:
        """Time for the largest bytes through one resource: GPU egress/ingress (NVSwitch) or a directed link."""
        if not flows:
            return 0.0
        if self.name == "nvswitch":
            out, inn = [0] * world, [0] * world
            for (s, d), b in flows.items():
                out[s] += b
                inn[d] += b
            return max(max(out), max(inn)) / self.egress_Bpus
        load: dict[tuple[int, int], int] = {}
        for (s, d), b in flows.items():  # bidirectional ring: route the shorter way round
            fwd = (d - s) % world
            step = 1 if fwd <= world - fwd else -1
            cur = s
            while cur != d:
                nxt = (cur + step) % world
                load[(cur, nxt)] = load.get((cur, nxt), 0) + b
                cur = nxt
        return max(load.values()) / self.link_Bpus


TOPOLOGIES = {"nvswitch": Topology("nvswitch"), "ring_links": Topology("ring_links")}


@lru_cache(maxsize=None)
def _critical_hops(s: Schedule) -> int:
    """Longest chain of remote signal dependencies in the schedule (per tile)."""
    # depth of a segment = hops until its data is final there; a move's output depth = max(input waits) + 1
    depth: dict[tuple, int] = {}
    changed = True
    while changed:
        changed = False
        for r, steps in enumerate(s.ranks):
            for st in steps:
                if st.kind != "move":
                    continue
                d_in = max([depth.get((w.rank, w.buf, w.slot), 0) for w in st.waits], default=0)
                for d in st.dests:
                    v = d_in + (1 if d.rank != r else 0)
                    key = (d.rank, d.buf, d.slot)
                    if depth.get(key, -1) < v:
                        depth[key] = v
                        changed = True
    return max(depth.values(), default=0)


def schedule_traffic(s: Schedule, in_bytes: int, elem: int) -> tuple[dict[tuple[int, int], int], int]:
    """Bytes each rank stores into each other rank, and the bytes rank 0 reads and writes while
    reducing, for one call on a per-rank input of in_bytes."""
    shard, part = layout(s.op, s.world, in_bytes, elem, s.parts)
    flows: dict[tuple[int, int], int] = {}
    reduce_bytes = 0
    for r, rank_steps in enumerate(s.ranks):
        for st in rank_steps:
            if st.kind != "move":
                continue
            n = unit_length(s.op, s.world, in_bytes, shard, part, s.parts, st.unit)
            for d in st.dests:
                if d.rank != r:
                    flows[(r, d.rank)] = flows.get((r, d.rank), 0) + n
            if len(st.srcs) > 1 and r == 0:
                reduce_bytes += n * (len(st.srcs) + len(st.dests))
    return flows, reduce_bytes


def predict_us(s: Schedule, in_bytes: int, elem: int, topo: Topology, ctas: int, tile: int,
               traffic: tuple[dict[tuple[int, int], int], int] | None = None) -> float:
    """Latency + bandwidth estimate of one call of schedule s on a per-rank input of in_bytes."""
    w = s.world
    _, part = layout(s.op, w, in_bytes, elem, s.parts)
    flows, reduce_bytes = traffic or schedule_traffic(s, in_bytes, elem)
    steps = s.max_steps
    bw = topo.link_time(w, flows)
    per_rank_out = max(flows.values(), default=0)
    cta_limit = per_rank_out / (ctas * topo.cta_Bpus) if per_rank_out else 0.0
    hops = _critical_hops(s)
    fill = max(0, hops - 1) * min(tile, part) / topo.link_Bpus  # pipeline fill, tile by tile
    return topo.launch_us + topo.hop_us * (hops + 1) + topo.step_us * steps + max(bw, cta_limit) + fill \
        + reduce_bytes / topo.reduce_Bpus


@dataclass(frozen=True)
class Candidate:
    algorithm: str
    predicted_us: float


@dataclass(frozen=True)
class Variant:
    """The schedule used for calls whose input is at most ``max_bytes`` (the last variant: up to the spec's max)."""

    max_bytes: int
    schedule: Schedule
    ctas: int
    tile_bytes: int
    reason: str


@dataclass(frozen=True)
class Plan:
    spec: KernelSpec
    world: int
    variants: tuple[Variant, ...]
    table: tuple[tuple[int, tuple[Candidate, ...]], ...]  # sizes and every candidate's prediction

    @property
    def schedule(self) -> Schedule:  # the schedule of the largest messages
        return self.variants[-1].schedule


def spare_sms(spec: KernelSpec, ctas: int) -> int | None:
    """GEMM ops: SMs left for the GEMMs on the smallest GPU of the arch when each communication CTA
    spins on an SM of its own (the checker needs one; 0 means the kernel can starve its GEMM).
    None for collectives, which nothing runs beside (the runtime keeps all their CTAs resident)."""
    if spec.op not in GEMM_OPS:
        return None
    return max(0, min(1, ARCH_MIN_SMS.get(spec.sm, 24) - ctas))


CTA_CHOICES = (16, 33, 66, 132, 264, 528)
GEMM_CTA_CHOICES = (8, 16, 33)


def _sizes(max_bytes: int) -> list[int]:
    sizes, n = [], 4096
    while n < max_bytes:
        sizes.append(n)
        n *= 4
    return sizes + [max_bytes]


def choose(spec: KernelSpec, world: int, in_bytes: int, topo: Topology, algorithms: list[str]) -> tuple[Candidate, int, int, tuple[Candidate, ...]]:
    """Best (algorithm, ctas, tile) at one size; returns also every algorithm's best prediction."""
    if spec.ctas != "auto":
        ctas_opts = (spec.ctas,)
    elif spec.op in ("ag_gemm", "gemm_rs"):  # the GEMMs need the SMs: keep the communication kernel small
        ctas_opts = GEMM_CTA_CHOICES
    else:
        ctas_opts = CTA_CHOICES
    tiles = (spec.tile_bytes,) if spec.tile_bytes != "auto" else (64 << 10, 256 << 10, 1 << 20)
    best_per_alg = []
    best = None
    for alg in algorithms:
        s = make_schedule(spec.op, alg, world, spec.sync, spec.fused)
        shard, part = layout(s.op, world, in_bytes, spec.elem_bytes, s.parts)
        traffic = schedule_traffic(s, in_bytes, spec.elem_bytes)
        opts = []
        for c in ctas_opts:
            for tb in tiles:
                t = tile_bytes_for(part, tb, c)
                opts.append((predict_us(s, in_bytes, spec.elem_bytes, topo, c, t, traffic), c, tb))
        t_us, c, tb = min(opts)
        cand = Candidate(alg, t_us)
        best_per_alg.append(cand)
        if best is None or (t_us, alg) < (best[0].predicted_us, best[0].algorithm):
            best = (cand, c, tb)
    return best[0], best[1], best[2], tuple(best_per_alg)


def plan(spec: KernelSpec, world: int, calibration: dict | None = None) -> Plan:
    """Plan every message size the spec allows: one variant per range of sizes with the same best
    schedule (at most 3), chosen by the cost model unless the spec fixes the schedule."""
    if world not in spec.world_sizes:
        raise ValueError(f"world size {world} is not in the spec's world_sizes {spec.world_sizes}")
    topo = TOPOLOGIES[spec.topology]
    if calibration:
        topo = replace(topo, **{k: v for k, v in calibration.items() if k in Topology.__dataclass_fields__ and k != "name"})
    algs = algorithms_for(spec.op) if spec.schedule == "auto" else [spec.schedule]
    for a in algs:
        make_schedule(spec.op, a, world, spec.sync, spec.fused)  # raises for a schedule the op lacks
    max_in = spec.max_in_bytes(world)
    table = []
    picks = []
    for n in _sizes(max_in):
        best, ctas, tile, cands = choose(spec, world, n, topo, algs)
        table.append((n, cands))
        picks.append((n, best.algorithm, ctas, tile))
    # merge runs of the same algorithm into variants; keep the settings chosen at each run's top size
    runs: list[list] = []
    for n, alg, ctas, tile in picks:
        if runs and runs[-1][1] == alg:
            runs[-1] = [n, alg, ctas, tile]
        else:
            runs.append([n, alg, ctas, tile])
    while len(runs) > 3:  # fold the smallest run into its neighbour
        i = min(range(len(runs) - 1), key=lambda k: runs[k][0])
        runs.pop(i)
    runs[-1][0] = max_in
    variants = []
    lo = 0
    for n, alg, ctas, tile in runs:
        why = (f"{alg} fixed by the spec" if spec.schedule != "auto" else
               f"{alg}: lowest predicted time for inputs in ({lo}, {n}] B on {spec.topology}")
        variants.append(Variant(n, make_schedule(spec.op, alg, world, spec.sync, spec.fused), ctas, tile, why))
        lo = n
    return Plan(spec, world, tuple(variants), tuple(table))


def format_plan(p: Plan) -> str:
    s = p.spec
    lines = [f"op {s.name}: {s.op} {s.dtype}{' ' + s.reduce if OPS[comm_kind(s.op)].reduces else ''}, world {p.world}, "
             f"input up to {s.max_in_bytes(p.world)} B per rank, sync {s.sync}, transport {s.transport}"]
    lines.append("predicted time of one call (us), best CTA count and tile per schedule:")
    algs = [c.algorithm for c in p.table[0][1]]
    lines.append("  " + f"{'bytes':>12}" + "".join(f"{a:>12}" for a in algs))
    for n, cands in p.table:
        best = min(cands, key=lambda c: (c.predicted_us, c.algorithm))
        lines.append("  " + f"{n:>12}" + "".join(
            f"{c.predicted_us:>11.1f}{'*' if c is best else ' '}" for c in cands))
    for i, v in enumerate(p.variants):
        lines.append(f"variant {i}: inputs <= {v.max_bytes} B: {v.schedule.algorithm}, {v.ctas} CTAs x {s.threads} threads, "
                     f"tiles <= {v.tile_bytes} B ({v.reason})")
        for r, steps in enumerate(v.schedule.ranks):
            lines.append(f"  rank {r}{' (root-relative)' if s.op == 'broadcast' else ''}:")
            for k, st in enumerate(steps):
                lines.append(f"    {k:2d}  {st.describe(r, s.sync)}")
            if s.op == "gemm_rs" and s.fused:
                lines.append("    fused GEMM (one CUTLASS kernel): row blocks of chunks " + ", ".join(
                    map(str, production_order(v.schedule, r))) + "; the tile completing a part of a chunk sets flag[in][part]")
            elif s.op == "gemm_rs":
                lines.append("    compute stream: " + "; ".join(
                    f"P[{c}] = A[{c}] @ B, signal flag[in][{c}]" for c in production_order(v.schedule, r)))
            if s.op == "ag_gemm" and s.fused:
                lines.append("    fused GEMM (one CUTLASS kernel): row blocks of chunks " + ", ".join(
                    map(str, arrival_order(v.schedule, r))) + "; each waits flag[out][chunk part][t] of its rows, then loads A_full")
            elif s.op == "ag_gemm":
                order = arrival_order(v.schedule, r)
                lines.append(f"    compute stream: " + "; ".join(
                    f"{'' if c == r else f'wait chunk {c} flags, '}C[{c}] = {'A' if c == r else f'A_full[{c}]'} @ B"
                    for c in order))
    return "\n".join(lines)
