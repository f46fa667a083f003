"""Schedule generators: for each collective kind, per-rank step programs (push schedules: a rank
reads only its own memory). Every one of them must pass the checker at every world size (tests).
The registry (tilegen.collective.ops) names which schedules each op kind has.
"""
from __future__ import annotations

from dataclasses import replace

from .ir import Schedule, Seg, Step


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
    """The other ranks in the order r + 1, r + 2, ...: at every step of a direct schedule each rank
    targets a different peer (ascending order would have every rank send to rank 0 first: incast)."""
    return [(r + k) % world for k in range(1, world)]


def ag_direct(w: int, sync: str) -> Schedule:
    bodies = []
    for r in range(w):
        body = [
            Step("move", unit=r, srcs=(Seg(r, "in", 0),), dests=tuple(Seg(q, "out", r) for q in [r] + _others(w, r)))
        ]
        body += [Step("wait", unit=p, waits=(Seg(r, "out", p),)) for p in _others(w, r)]
        bodies.append(body)
    return _with_entry("allgather", "direct", w, sync, 1, bodies)


def _ag_ring_body(
    w: int, r: int, d: int, h: int, P: int, first_srcs: tuple[Seg, ...] | None = None, first_waits: tuple[Seg, ...] = ()
) -> list[Step]:
    """Allgather round a ring in direction d for part h; the first move sends our chunk (from the
    input, or from ``first_srcs`` when a reduction produced it)."""
    nxt = (r + d) % w
    u = r * P + h
    srcs = first_srcs or (Seg(r, "in", h),)
    body = [Step("move", unit=u, srcs=srcs, waits=first_waits, dests=(Seg(r, "out", u), Seg(nxt, "out", u)))]
    for s in range(1, w - 1):
        c = ((r - d * s) % w) * P + h
        body.append(
            Step("move", unit=c, srcs=(Seg(r, "out", c),), waits=(Seg(r, "out", c),), dests=(Seg(nxt, "out", c),))
        )
    last = ((r + d) % w) * P + h
    body.append(Step("wait", unit=last, waits=(Seg(r, "out", last),)))
    return body


def _interleave(a: list[Step], b: list[Step]) -> list[Step]:
    out = []
    for i in range(max(len(a), len(b))):
        out += a[i : i + 1] + b[i : i + 1]
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
        for d, h in [(1, 0), (-1, 1)] if bidir else [(1, 0)]:
            body, srcs, waits = _rs_ring_body(w, r, d, h, P)
            parts.append(body + finish(r, d, h, P, srcs, waits))
        bodies.append(_interleave(*parts) if bidir else parts[0])
    return _with_entry(op, "bidir_ring" if bidir else "ring", w, sync, P, bodies)


def rs_ring(w: int, sync: str, bidir: bool = False) -> Schedule:
    return _rings(
        "reduce_scatter",
        w,
        sync,
        bidir,
        lambda r, d, h, P, srcs, waits: [
            Step("move", unit=r * P + h, srcs=srcs, waits=waits, dests=(Seg(r, "out", h),))
        ],
    )


def rs_bidir(w: int, sync: str) -> Schedule:
    return rs_ring(w, sync, True)


def ar_one_shot(w: int, sync: str) -> Schedule:
    """Every rank pushes its whole tensor into every peer's scratch, then reduces locally."""
    bodies = []
    for r in range(w):
        body = [
            Step("move", unit=c, srcs=(Seg(r, "in", c),), dests=tuple(Seg(q, "scr", r * w + c) for q in _others(w, r)))
            for c in range(w)
        ]
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
    return _rings(
        "allreduce",
        w,
        sync,
        bidir,
        lambda r, d, h, P, srcs, waits: _ag_ring_body(w, r, d, h, P, first_srcs=srcs, first_waits=waits),
    )


def ar_bidir(w: int, sync: str) -> Schedule:
    return ar_ring(w, sync, True)


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
        bodies.append(
            [Step("move", unit=0, srcs=(Seg(r, "out", 0),), waits=(Seg(r, "out", 0),), dests=(Seg(r + 1, "out", 0),))]
        )
    bodies.append([Step("wait", unit=0, waits=(Seg(w - 1, "out", 0),))])
    return _with_entry("broadcast", "chain", w, sync, 1, bodies)


def reduce_direct(w: int, sync: str) -> Schedule:
    """Every other rank pushes its tensor into the root's scratch; the root adds them to its own."""
    scr = tuple(Seg(0, "scr", r - 1) for r in range(1, w))
    root = [Step("move", unit=0, srcs=(Seg(0, "in", 0),) + scr, waits=scr, dests=(Seg(0, "out", 0),))]
    others = [[Step("move", unit=0, srcs=(Seg(r, "in", 0),), dests=(Seg(0, "scr", r - 1),))] for r in range(1, w)]
    return _with_entry("reduce", "direct", w, sync, 1, [root] + others)


# ------------------------------------------------------------------------------ LL (flag in data)
# Small messages: every remote store carries its flag in the data (16-byte lines of 8 data bytes and
# two copies of the call's flag, NCCL's LL protocol), into scratch that alternates by call parity.
# No entry handshake and no separate signal: a rank may store into a peer's scratch for call n + 2
# because in call n + 1 it waited for data that peer stored after it had finished reading call n.
# The checker simulates three calls with the parity buffers to prove exactly that for each schedule.
def _ll(op: str, alg: str, w: int, bodies: list[list[Step]]) -> Schedule:
    return Schedule(op, alg, w, "ll", 1, tuple(tuple(b) for b in bodies))


def _unpack(w: int, r: int, slot_of) -> list[Step]:
    """Copy each peer's chunk from this rank's scratch (slot_of(p)) into output slot p."""
    return [Step("move", unit=p, srcs=(Seg(r, "scr", slot_of(p)),), waits=(Seg(r, "scr", slot_of(p)),),
                 dests=(Seg(r, "out", p),)) for p in _others(w, r)]


def ag_ll(w: int, sync: str) -> Schedule:
    bodies = []
    for r in range(w):
        send = Step("move", unit=r, srcs=(Seg(r, "in", 0),),
                    dests=(Seg(r, "out", r),) + tuple(Seg(q, "scr", r) for q in _others(w, r)))
        bodies.append([send] + _unpack(w, r, lambda p: p))
    return _ll("allgather", "ll_direct", w, bodies)


def rs_ll(w: int, sync: str) -> Schedule:
    return _ll("reduce_scatter", "ll_direct", w,
               [_push_to_owners(w, r) + [_reduce_own(w, r, (Seg(r, "out", 0),))] for r in range(w)])


def a2a_ll(w: int, sync: str) -> Schedule:
    bodies = []
    for r in range(w):
        body = [Step("move", unit=r, srcs=(Seg(r, "in", r),), dests=(Seg(r, "out", r),))]
        body += [Step("move", unit=q, srcs=(Seg(r, "in", q),), dests=(Seg(q, "scr", r),)) for q in _others(w, r)]
        bodies.append(body + _unpack(w, r, lambda p: p))
    return _ll("all_to_all", "ll_direct", w, bodies)


def ar_ll_one_shot(w: int, sync: str) -> Schedule:
    """Every rank stores its whole tensor into every peer's scratch and reduces locally."""
    return _ll("allreduce", "ll_one_shot", w, [list(ar_one_shot(w, sync).ranks[r][1:]) for r in range(w)])


def ar_ll_two_shot(w: int, sync: str) -> Schedule:
    """Reduce-scatter into the owners' scratch, then each owner stores its reduced chunk into every
    peer's scratch (slots w..2w-1), which each rank copies into its output."""
    bodies = []
    for r in range(w):
        body = _push_to_owners(w, r)
        body.append(_reduce_own(w, r, (Seg(r, "out", r),) + tuple(Seg(q, "scr", w + r) for q in _others(w, r))))
        bodies.append(body + _unpack(w, r, lambda p: w + p))
    return _ll("allreduce", "ll_two_shot", w, bodies)


LL_MAX_BYTES = 1 << 20  # LL moves twice the bytes and needs 4x scratch: inputs up to 1 MiB


def is_ll(algorithm: str) -> bool:
    return algorithm.startswith("ll_")


# ------------------------------------------------------------------------------ data flow
# Schedules are static data flow: each segment is written by the same steps in every call, so where a
# segment's data come from can be read off the programs (the checker's simulation proves it holds).
Writers = dict[tuple[int, str, int], tuple[Step, ...]]


def writers_of(s: Schedule) -> Writers:
    """The moves that write each segment (rank, buf, slot)."""
    out: dict[tuple[int, str, int], list[Step]] = {}
    for steps in s.ranks:
        for st in steps:
            for d in st.dests:
                out.setdefault((d.rank, d.buf, d.slot), []).append(st)
    return {k: tuple(v) for k, v in out.items()}


def origins(writers: Writers, g: Seg, depth: int = 0) -> list[Seg | Step | None]:
    """Where segment ``g``'s data come from, following one-source copies back: input segments, the
    reductions (several-source moves) that made them, None for a chain too long to be one (a cycle)."""
    if g.buf == "in":
        return [g]
    found: list[Seg | Step | None] = []
    for w in writers.get((g.rank, g.buf, g.slot), ()):
        if len(w.srcs) > 1:
            found.append(w)
        else:
            found += origins(writers, w.srcs[0], depth + 1) if depth < 64 else [None]
    return found


def contributor(writers: Writers, g: Seg) -> int | None:
    """The rank whose raw input segment ``g`` holds (the input itself, or a chain of one-source copies
    of it), or None where it holds a partial result (a reduction's output, or writers that disagree)."""
    ranks = {o.rank if isinstance(o, Seg) else None for o in origins(writers, g)}
    return ranks.pop() if len(ranks) == 1 else None


def in_canonical_order(s: Schedule) -> Schedule:
    """Every reduction of raw contributions adds them in ascending rank order (relative to the root for
    rooted ops), whichever rank computes it: the result's bits are the same on every rank and in every
    schedule that reduces raw inputs in one step (one_shot, two_shot, direct and their LL forms).
    Reductions of partial results (rings) keep their order."""
    writers = writers_of(s)

    def ordered(st: Step) -> Step:
        if st.kind != "move" or len(st.srcs) < 2:
            return st
        ranks = [contributor(writers, g) for g in st.srcs]
        if None in ranks:
            return st
        return replace(st, srcs=tuple(g for _, g in sorted(zip(ranks, st.srcs))))

    return replace(s, ranks=tuple(tuple(ordered(st) for st in steps) for steps in s.ranks))


def order_problems(s: Schedule, expected) -> list[str]:
    """Why some reduced output of ``s`` is not one reduction of raw contributions in ascending rank
    order ([]: each is), ``expected(rank, out slot)`` naming the (rank, input slot) pairs it sums. This
    is what makes a sum's bits independent of the schedule, the tiles and the CTAs: fp32 adds in one
    fixed order, one rounding to the element type."""
    writers, problems = writers_of(s), []
    for r in range(s.world):
        for k in range(s.slots("out")):
            want = expected(r, k)
            if not want or len(want) < 2:
                continue
            canonical = sorted(src for src, _ in want)
            for w in origins(writers, Seg(r, "out", k)):
                if not isinstance(w, Step):
                    problems.append(f"out@{r}[{k}] is a copy of one rank's input or of data that "
                                    f"differ by writer, not a reduction")
                    continue
                got = [contributor(writers, g) for g in w.srcs]
                if None in got:
                    problems.append(f"out@{r}[{k}] adds partial sums ({', '.join(map(str, w.srcs))}): "
                                    f"their rounding to the element type depends on the schedule")
                elif got != canonical:
                    problems.append(f"out@{r}[{k}] adds the ranks' contributions in the order {got}, "
                                    f"not {canonical}")
    return problems


# ------------------------------------------------------------------------------ PreMulSum
def with_premul(s: Schedule) -> Schedule:
    """reduce: avg / premul_sum (NCCL's PreMulSum): every rank's contribution is multiplied by the
    call's scale exactly once, where it is first summed: a reduce step scales exactly its sources that
    hold one rank's raw input (contributor()). The checker verifies the result (each contribution
    scaled once), not this rule."""
    writers = writers_of(s)

    def raw(g: Seg) -> bool:  # a rank's input, or a copy of it
        return contributor(writers, g) is not None

    ranks = tuple(tuple(replace(st, scaled=tuple(raw(g) for g in st.srcs))
                        if st.kind == "move" and len(st.srcs) > 1 else st for st in steps)
                  for steps in s.ranks)
    return replace(s, ranks=ranks, scaled=True)


# ------------------------------------------------------------------------------ GEMM ops
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
    ranks = tuple(
        tuple(
            replace(st, signal_self=True)
            if st.kind == "move" and any(d.rank == r and d.buf == "out" for d in st.dests)
            else st
            for st in steps
        )
        for r, steps in enumerate(s.ranks)
    )
    return replace(s, ranks=ranks)


def production_order(s: Schedule, rank: int) -> tuple[int, ...]:
    """gemm_rs: the chunks of partial C in the order the communication first needs them."""
    first: dict[int, int] = {}
    for i, st in enumerate(s.ranks[rank]):
        for g in st.srcs:
            if g.buf == "in":
                first.setdefault(g.slot // s.parts, i)
    return tuple(sorted(first, key=lambda c: (first[c], c)))


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
