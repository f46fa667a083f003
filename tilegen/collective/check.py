"""Stage 3: checker.

A CPU simulation of a schedule over all ranks and CTAs, for two consecutive calls, under several
interleavings. It follows the same rules as the generated kernel (tile t -> CTA t % ctas, per-tile
or per-chunk signals, epochs, the last-arriving CTA in barrier mode) and tracks happens-before with
vector clocks. Data are multisets of (source rank, input slot, tile, call), so a reduction must
receive every rank's contribution exactly once. For the configurations it runs it proves:

* every output element is written exactly once per call with the right value (tiles cover each
  part exactly; each output tile gets one write whose data is what the op defines);
* every wait is eventually satisfied (no deadlock), else it names the blocked rank, CTA and signal;
* no read of data before the signal that publishes it (unsynchronised read), no write into a buffer
  its owner may still be reading (write-after-read), no scratch slot written twice in one call.

LL schedules (sync "ll", flag in data): a move's stores into scratch carry the call's flag, so the
store is its own signal, and readers wait for exactly that flag (a later call's flag must not
satisfy them); scratch alternates between two halves by call parity (slot "k.parity" below) and
there is no entry handshake. Three calls are simulated, so a rank that could store into a half its
peer still reads (two calls back) shows up as a write-after-read or a deadlock. LL schedules may
store remotely only into scratch (the caller's output has no flags).

Residency: a spinning CTA holds its SM. Given ``spare_sms``, each rank's GPU has that many SMs more
than the communication kernel has CTAs: a CTA of it runs only once it holds one (until it finishes
the call), a fused GEMM holds one for the whole call, and each decomposed GEMM needs one free while
it runs (its one-thread wait kernels need none). So a communication kernel that fills the GPU while
it waits for a GEMM, or a persistent GEMM that leaves no SM for the gather it waits on, shows up as
a deadlock.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from ..core.verdict import CheckError, Verdict
from .ir import Schedule
from .layout import tile_ranges
from .ops import OPS, compute_order, expected_output

CALLS = 2
LL_CALLS = 3  # scratch halves alternate by parity: the third call reuses the first call's half


@dataclass(frozen=True)
class Op:
    kind: str  # signal | wait | read | write | arrive
    rank: int = -1  # rank whose memory is touched
    obj: tuple = ()  # ("entry", r) | ("flag", buf, slot, t) | (buf, slot, t) | ("ctr", step)
    value: int = 0
    signals: tuple = ()  # arrive: (rank, buf, slot) flags the last CTA sets
    exact: bool = False  # wait: for exactly `value` (LL flags), not >= value
    scale: bool = False  # read: multiplied by the call's scale (PreMulSum): its data are marked SCALED


SCALED = "x scale"  # appended to a datum's key each time it is multiplied by the call's scale


def _scaled_sources(st) -> tuple[bool, ...]:
    return st.scaled or (False,) * len(st.srcs)


def _vc_join(a: list[int], b: list[int]) -> None:
    for i, x in enumerate(b):
        if x > a[i]:
            a[i] = x


def _hb(clock: tuple[int, int], vc: list[int]) -> bool:
    t, c = clock
    return vc[t] >= c


def expand_agent(sched: Schedule, rank: int, cta: int, ctas: int, ntiles, epoch: int, gemm: bool = False) -> list[Op]:
    """The ops CTA ``cta`` of ``rank`` performs in one call: mirrors the kernel's step loop. A
    collective with per-tile flags runs tile-major (round k: tile k * ctas + cta of every step in
    turn, a step with waits the tile of round k - 1: collective.cuh's kTileMajor); a GEMM op's
    kernel (gemm) and barrier mode step by step."""
    if sched.sync == "ll":
        return _expand_ll(sched, rank, cta, ctas, ntiles, epoch)
    ops: list[Op] = []
    per_tile = sched.sync == "per_tile"
    rounds: list[list[list[Op]]] = []  # per step, the ops of each of this CTA's tiles
    for i, st in enumerate(sched.ranks[rank]):
        if st.kind == "entry":
            if rounds:
                raise CheckError(f"rank {rank} step {i}: an entry step after other steps")
            if cta == 0:
                ops += [Op("signal", p, ("entry", rank), epoch) for p in st.notify]
            ops += [Op("wait", rank, ("entry", p), epoch) for p in st.await_ranks]
            continue
        for g in st.waits:
            if g.rank != rank:
                raise CheckError(f"rank {rank} step {i}: waits on {g}, a segment of another rank")
        mine = [t for t in range(ntiles(st.unit)) if t % ctas == cta]
        tiles: list[list[Op]] = []
        if st.kind == "move":
            if not per_tile and mine:
                ops_pre = [Op("wait", rank, ("flag", g.buf, g.slot, 0), epoch) for g in st.waits]
            else:
                ops_pre = []
            for t in mine:
                tile: list[Op] = []
                if per_tile:  # inputs produced during the call (gemm_rs) are signalled per chunk: tile 0
                    tile += [
                        Op("wait", rank, ("flag", g.buf, g.slot, 0 if g.buf == "in" else t), epoch) for g in st.waits
                    ]
                tile.append(Op("read", -1, ("begin",)))
                tile += [Op("read", g.rank, (g.buf, g.slot, t), scale=k) for g, k in zip(st.srcs, _scaled_sources(st))]
                tile += [Op("write", d.rank, (d.buf, d.slot, t)) for d in st.dests]
                if per_tile:
                    tile += [
                        Op("signal", d.rank, ("flag", d.buf, d.slot, t), epoch)
                        for d in st.dests
                        if d.rank != rank or st.signal_self
                    ]
                tiles.append(tile)
            if tiles:
                tiles[0] = ops_pre + tiles[0]
            if not per_tile:
                remote = tuple((d.rank, d.buf, d.slot) for d in st.dests if d.rank != rank or st.signal_self)
                arrive = [Op("arrive", rank, ("ctr", i), epoch, signals=remote)]
                tiles = [sum(tiles, []) + arrive]  # barrier mode: one round
        elif st.kind == "wait":
            if per_tile:
                tiles = [[Op("wait", rank, ("flag", g.buf, g.slot, t), epoch) for g in st.waits] for t in mine]
            elif cta == 0:
                tiles = [[Op("wait", rank, ("flag", g.buf, g.slot, 0), epoch) for g in st.waits]]
        else:
            raise CheckError(f"rank {rank} step {i}: unknown step kind {st.kind!r}")
        rounds.append(tiles)
    if per_tile and not gemm:  # a step that waits runs one round behind (collective.cuh)
        steps = [st for st in sched.ranks[rank] if st.kind != "entry"]
        lag = [1 if st.waits else 0 for st in steps]
        for k in range(max((len(r) for r in rounds), default=0) + 1):
            for r, d in zip(rounds, lag):
                if 0 <= k - d < len(r):
                    ops += r[k - d]
    else:
        for r in rounds:
            for tile in r:
                ops += tile
    return ops


def _expand_ll(sched: Schedule, rank: int, cta: int, ctas: int, ntiles, epoch: int) -> list[Op]:
    """An LL schedule's ops: per tile, wait for exactly this call's flag in each scratch source, read,
    store; a store into scratch publishes itself (flag in data) in this call's half."""
    half = lambda g: f"{g.slot}.{epoch % 2}" if g.buf == "scr" else g.slot  # noqa: E731
    ops: list[Op] = []
    for i, st in enumerate(sched.ranks[rank]):
        if st.kind != "move":
            raise CheckError(f"rank {rank} step {i}: LL schedules have only moves (reads wait for their flags)")
        for d in st.dests:
            if d.rank != rank and d.buf != "scr":
                raise CheckError(f"rank {rank} step {i}: LL stores into {d}, but peers' buffers other than scratch "
                                 f"carry no flags")
        for g in st.waits:
            if g.rank != rank or g.buf != "scr":
                raise CheckError(f"rank {rank} step {i}: LL waits on {g}; only this rank's scratch has LL flags")
        for g in st.srcs:
            if g.buf not in ("in", "scr"):  # the kernel reads plain memory through the read-only path
                raise CheckError(f"rank {rank} step {i}: LL reads {g}; it reads only its input and its scratch")
        for t in range(ntiles(st.unit)):
            if t % ctas != cta:
                continue
            ops += [Op("wait", rank, ("flag", "scr", half(g), t), epoch, exact=True) for g in st.waits]
            ops.append(Op("read", -1, ("begin",)))
            ops += [Op("read", g.rank, (g.buf, half(g), t), scale=k) for g, k in zip(st.srcs, _scaled_sources(st))]
            for d in st.dests:
                ops.append(Op("write", d.rank, (d.buf, half(d), t)))
                if d.buf == "scr":
                    ops.append(Op("signal", d.rank, ("flag", "scr", half(d), t), epoch))
    return ops


@dataclass
class _Cell:
    write: tuple[int, int] | None = None
    writer: str = ""
    value: Counter | None = None
    reads: dict[int, int] = field(default_factory=dict)
    writes: Counter = field(default_factory=Counter)  # epoch -> writes in that call


@dataclass
class _Sig:
    value: int = 0
    vc: list[int] | None = None


def expand_compute(
    sched: Schedule, rank: int, order: tuple[int, ...], ntiles, epoch: int, fused: bool = False
) -> list[Op]:
    """The compute stream of an AllGather+GEMM: for each chunk in order, wait for all its flags (the
    wait kernel), then the GEMM reads the whole chunk (its own chunk: straight from the input) and
    writes that chunk of C. fused: one GEMM kernel reads every chunk from the gathered buffer, each
    piece right after waiting for that piece's flag (its row blocks wait only for their rows)."""
    ops: list[Op] = []
    P = sched.parts
    if fused:
        for c in order:
            ops.append(Op("read", -1, ("begin",)))
            for h in range(P):
                n = ntiles(c * P + h)
                if sched.sync != "per_tile" and n:
                    ops.append(Op("wait", rank, ("flag", "out", c * P + h, 0), epoch))
                for t in range(n):
                    if sched.sync == "per_tile":
                        ops.append(Op("wait", rank, ("flag", "out", c * P + h, t), epoch))
                    ops.append(Op("read", rank, ("out", c * P + h, t)))
            ops.append(Op("write", rank, ("C", c, 0)))
        return ops
    for c in order:
        if c != rank:
            for h in range(P):
                tiles = range(ntiles(c * P + h)) if sched.sync == "per_tile" else [0]
                ops += [Op("wait", rank, ("flag", "out", c * P + h, t), epoch) for t in tiles]
        ops.append(Op("read", -1, ("begin",)))
        for h in range(P):
            for t in range(ntiles(c * P + h)):
                ops.append(Op("read", rank, ("in", h, t) if c == rank else ("out", c * P + h, t)))
        ops.append(Op("write", rank, ("C", c, 0)))
    return ops


def expand_producer(sched: Schedule, rank: int, order: tuple[int, ...], ntiles, epoch: int) -> list[Op]:
    """The compute stream of a GEMM+ReduceScatter: per chunk in order, the GEMM writes the chunk of
    partial C (the op's input) and a signal kernel sets the chunk's input flag."""
    ops: list[Op] = []
    P = sched.parts
    for c in order:
        for h in range(P):
            ops += [Op("produce", rank, ("in", c * P + h, t)) for t in range(ntiles(c * P + h))]
            ops.append(Op("signal", rank, ("flag", "in", c * P + h, 0), epoch))
    return ops


class _Sim:
    def __init__(
        self,
        sched: Schedule,
        ctas: int,
        ntiles,
        rng: random.Random | None,
        orders=None,
        produces=False,
        slots: int | None = None,
        grid_barrier: bool = False,
    ):
        self.s, self.G, self.ntiles, self.rng = sched, ctas, ntiles, rng
        self.grid_barrier = grid_barrier  # an epilogue's: every CTA of a rank meets there after its steps
        self.slots = slots  # SMs per rank (None: every CTA resident, nothing else competes)
        self.held: dict[int, set[tuple[int, int]]] = {r: set() for r in range(sched.world)}
        self.W = sched.world
        self.orders = orders  # GEMM ops: each rank's compute-stream chunk order
        self.produces = produces  # gemm_rs: the compute stream produces the input instead of consuming the output
        # ag_gemm: a schedule whose moves signal their own dests feeds a fused GEMM
        self.fused = any(st.signal_self for steps in sched.ranks for st in steps)
        self.per_rank = ctas + 1 + (1 if orders else 0)  # CTAs, the host/stream thread, the compute stream
        self.nthreads = self.W * self.per_rank
        self.vc = [[0] * self.nthreads for _ in range(self.nthreads)]
        self.cells: dict[tuple, _Cell] = {}
        self.sigs: dict[tuple, _Sig] = {}
        self.ctr: dict[tuple, tuple[int, list[int]]] = {}
        self.problems: list[str] = []
        self.regs: dict[tuple[int, int], Counter | None] = {}  # per agent: data in registers
        opdef = OPS[sched.op]
        self.in_slots = opdef.in_chunks(self.W) * sched.parts
        self.out_slots = opdef.out_chunks(self.W) * sched.parts
        self.calls = LL_CALLS if sched.sync == "ll" else CALLS

    def tid(self, rank: int, cta: int) -> int:  # cta == -1: the host/stream thread; cta == G: compute stream
        return rank * self.per_rank + (cta + 1)

    def tick(self, t: int) -> tuple[int, int]:
        self.vc[t][t] += 1
        return (t, self.vc[t][t])

    def name(self, t: int) -> str:
        r, c = divmod(t, self.per_rank)
        return (
            f"rank {r} host" if c == 0 else (f"rank {r} compute stream" if c - 1 == self.G else f"rank {r} CTA {c - 1}")
        )

    def _resident(self, key: tuple[int, int], op: Op) -> bool:
        """Whether agent ``key`` can run ``op`` now, given the SMs (see Residency above)."""
        if self.slots is None or key in self.held[key[0]]:
            return True
        free = len(self.held[key[0]]) < self.slots
        if key[1] == self.G and not self.fused:  # a decomposed GEMM: its wait kernels need no SM
            return op.kind == "wait" or free
        return free

    def _occupy(self, key: tuple[int, int]) -> None:
        if self.slots is not None and (key[1] < self.G or self.fused):
            self.held[key[0]].add(key)

    def agents_of(self) -> int:
        return self.G + (1 if self.orders else 0)

    def problem(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)

    @staticmethod
    def where(key: tuple) -> str:
        r, buf, slot, t = key
        return f"{buf}@{r}[{slot}][tile {t}]"

    def do_read(self, t: int, key: tuple, call: int) -> Counter | None:
        cell = self.cells.setdefault(key, _Cell())
        if cell.write is not None and not _hb(cell.write, self.vc[t]):
            self.problem(
                f"call {call}: {self.name(t)} reads {self.where(key)} before the signal of its write by "
                f"{cell.writer} (unsynchronised read)"
            )
        cell.reads[t] = self.tick(t)[1]
        return cell.value

    def do_write(self, t: int, key: tuple, value: Counter | None, call: int) -> None:
        cell = self.cells.setdefault(key, _Cell())
        if cell.write is not None and cell.write[0] != t and not _hb(cell.write, self.vc[t]):
            self.problem(
                f"call {call}: {self.name(t)} writes {self.where(key)} concurrently with {cell.writer} "
                f"(write-write race)"
            )
        for rt, rc in cell.reads.items():
            if rt != t and not _hb((rt, rc), self.vc[t]):
                self.problem(
                    f"call {call}: {self.name(t)} writes {self.where(key)} while {self.name(rt)} may still "
                    f"read it (write-after-read: missing entry synchronisation)"
                )
        cell.write = self.tick(t)
        cell.writer = self.name(t)
        cell.value = value
        cell.reads = {}
        cell.writes[call] += 1
        if key[1] == "scr" and cell.writes[call] > 1:  # LL: per half, the slot is "k.parity"
            self.problem(
                f"call {call}: {self.where(key)} written {cell.writes[call]} times in one call "
                f"(its flag cannot tell the writes apart)"
            )

    def write_inputs(self, r: int, call: int) -> None:
        if self.produces:  # written by the compute stream during the call
            return
        host = self.tid(r, -1)
        for k in range(self.in_slots):
            for tt in range(self.ntiles(k)):
                self.do_write(host, (r, "in", k, tt), Counter({(r, k, tt, call): 1}), call)

    def run(self) -> int:
        W, G = self.W, self.G
        nops = 0
        for r in range(W):
            self.write_inputs(r, 1)
        call_of = [1] * W
        agents: dict[tuple[int, int], list[Op]] = {}
        pcs: dict[tuple[int, int], int] = {}

        def start_call(r: int) -> None:
            host = self.tid(r, -1)
            for b in range(G):  # stream order: the kernel's CTAs start after the host's prior work
                _vc_join(self.vc[self.tid(r, b)], self.vc[host])
                agents[(r, b)] = expand_agent(self.s, r, b, G, self.ntiles, call_of[r], gemm=bool(self.orders))
                if self.grid_barrier:  # the last CTA to arrive releases them all (epilogue.cuh's grid_sync)
                    agents[(r, b)] += [Op("arrive", r, ("ctr", "grid"), call_of[r], signals=((r, "grid", 0),)),
                                       Op("wait", r, ("flag", "grid", 0, 0), call_of[r])]
                pcs[(r, b)] = 0
            if self.orders:  # the compute stream also starts after the host's prior work
                _vc_join(self.vc[self.tid(r, G)], self.vc[host])
                if self.produces:
                    agents[(r, G)] = expand_producer(self.s, r, self.orders[r], self.ntiles, call_of[r])
                else:
                    agents[(r, G)] = expand_compute(self.s, r, self.orders[r], self.ntiles, call_of[r], self.fused)
                pcs[(r, G)] = 0

        for r in range(W):
            start_call(r)
        while True:
            runnable = [
                k
                for k, ops in agents.items()
                if pcs[k] < len(ops) and self._ready(ops[pcs[k]]) and self._resident(k, ops[pcs[k]])
            ]
            if not runnable:
                break
            key = self.rng.choice(runnable) if self.rng else runnable[0]
            self._occupy(key)
            self._exec(key, agents[key][pcs[key]], call_of[key[0]])
            pcs[key] += 1
            nops += 1
            r = key[0]
            if pcs[key] == len(agents[key]):  # done with this call: its SM is free again
                self.held[r].discard(key)
            if all(pcs[(r, b)] == len(agents[(r, b)]) for b in range(self.agents_of())):
                self._finish_call(r, call_of[r])
                if call_of[r] < self.calls:
                    call_of[r] += 1
                    self.write_inputs(r, call_of[r])  # the next call's input, after the kernel (stream order)
                    start_call(r)
                else:
                    for b in range(self.agents_of()):
                        agents.pop((r, b))
        # agents kept off the GPU first: they are the cause of the waits behind them
        stuck = sorted(
            (k for k, ops in agents.items() if pcs[k] < len(ops)), key=lambda k: self._resident(k, agents[k][pcs[k]])
        )
        for key in stuck:
            op = agents[key][pcs[key]]
            who = "compute stream" if key[1] == G else f"CTA {key[1]}"
            if not self._resident(key, op):
                holders = ", ".join(
                    "the GEMM" if b == G else f"CTA {b}" for b in sorted(b for _, b in self.held[key[0]])
                )
                self.problem(
                    f"deadlock: call {call_of[key[0]]}: rank {key[0]} {who} cannot be scheduled: all "
                    f"{self.slots} SMs are held by spinning {holders}"
                )
                continue
            sig = self.sigs.get((op.rank,) + op.obj)
            self.problem(
                f"deadlock: call {call_of[key[0]]}: rank {key[0]} {who} waits {self._sig(op)} "
                f"{'==' if op.exact else '>='} {op.value}, sees {sig.value if sig else 0}, and nothing left can set it"
            )
        return nops

    @staticmethod
    def _sig(op: Op) -> str:
        if op.obj[0] == "entry":
            return f"entry[{op.obj[1]}]@{op.rank}"
        if op.obj[1] == "grid":
            return f"the grid barrier@{op.rank} (CTAs arrived)"
        _, buf, slot, t = op.obj
        return f"flag[{buf}][{slot}][{t}]@{op.rank}"

    def _ready(self, op: Op) -> bool:
        if op.kind != "wait":
            return True
        sig = self.sigs.get((op.rank,) + op.obj)
        return sig is not None and (sig.value == op.value if op.exact else sig.value >= op.value)

    def _exec(self, key: tuple[int, int], op: Op, call: int) -> None:
        r, b = key
        t = self.tid(r, b)
        if op.kind == "wait":  # acquire
            _vc_join(self.vc[t], self.sigs[(op.rank,) + op.obj].vc)
            self.tick(t)
        elif op.kind == "signal":  # release store of the epoch
            self.tick(t)
            self.sigs[(op.rank,) + op.obj] = _Sig(op.value, list(self.vc[t]))
        elif op.kind == "read":
            if op.obj == ("begin",):
                self.regs[key] = Counter()
                return
            v = self.do_read(t, (op.rank,) + op.obj, call)
            if op.scale and v is not None:
                v = Counter({k + (SCALED,): n for k, n in v.items()})
            acc = self.regs.get(key)
            self.regs[key] = None if v is None or acc is None else acc + v
        elif op.kind == "write":
            self.do_write(t, (op.rank,) + op.obj, self.regs.get(key), call)
        elif op.kind == "produce":  # a GEMM writes this rank's contribution to partial C
            _, slot, tt = op.obj
            self.do_write(t, (op.rank,) + op.obj, Counter({(r, slot, tt, call): 1}), call)
        elif op.kind == "arrive":  # atomic add with acq_rel fences around it
            self.tick(t)
            n, cvc = self.ctr.get((r,) + op.obj, (0, [0] * self.nthreads))
            _vc_join(cvc, self.vc[t])
            n += 1
            self.ctr[(r,) + op.obj] = (n, cvc)
            if n == op.value * self.G:  # the last CTA of this call signals once per remote dest
                _vc_join(self.vc[t], cvc)
                self.tick(t)
                for d, buf, slot in op.signals:
                    self.sigs[(d, "flag", buf, slot, 0)] = _Sig(op.value, list(self.vc[t]))

    def _finish_call(self, r: int, call: int) -> None:
        """Kernel end on rank r: the stream joins all CTAs, then the app reads the whole output."""
        host = self.tid(r, -1)
        for b in range(self.agents_of()):
            _vc_join(self.vc[host], self.vc[self.tid(r, b)])
        self.tick(host)
        P = self.s.parts
        if self.orders and not self.produces:
            self._check_gemm_output(r, call)
        for k in range(self.out_slots):
            sources = expected_output(self.s.op, self.W, P, r, k)
            for tt in range(self.ntiles(OPS[self.s.op].out_unit(r, k, P))):
                key = (r, "out", k, tt)
                cell = self.cells.get(key)
                n = cell.writes[call] if cell else 0
                if sources is None:  # the op leaves this rank's output alone
                    if n:
                        self.problem(f"call {call}: {self.where(key)} written, but the op writes no output on rank {r}")
                    continue
                if n != 1:
                    self.problem(
                        f"call {call}: {self.where(key)} " + ("never written" if n == 0 else f"written {n} times")
                    )
                    if n == 0:
                        continue
                mark = (SCALED,) if self.s.scaled else ()  # PreMulSum: each contribution scaled once
                want = Counter({(s, i, tt, call) + mark: 1 for s, i in sources})
                got = self.do_read(host, key, call)
                if got != want:
                    self.problem(f"call {call}: {self.where(key)} holds {_show(got)}, expected {_show(want)}")

    def _check_gemm_output(self, r: int, call: int) -> None:
        P = self.s.parts
        for c in range(self.W):
            key = (r, "C", c, 0)
            cell = self.cells.get(key)
            n = cell.writes[call] if cell else 0
            if n != 1:
                self.problem(f"call {call}: C@{r}[{c}] " + ("never computed" if n == 0 else f"computed {n} times"))
                continue
            want = Counter({(c, h, t, call): 1 for h in range(P) for t in range(self.ntiles(c * P + h))})
            got = self.do_read(self.tid(r, -1), key, call)
            if got != want:
                self.problem(f"call {call}: C@{r}[{c}] was computed from {_show(got)}, expected {_show(want)}")


def _show(v: Counter | None) -> str:
    if v is None:
        return "nothing"
    items = sorted(v.items())
    return " + ".join(f"{'' if n == 1 else f'{n}x '}{'s*' * len(k[4:])}in@{k[0]}[{k[1]}] of call {k[3]}"
                      for k, n in items)


def check_cover(n: int, ranges: list[tuple[int, int]]) -> str | None:
    """The tiles must cover [0, n) exactly once."""
    pos = 0
    for lo, hi in ranges:
        if lo != pos or hi <= lo:
            return f"tile [{lo}, {hi}) does not continue at byte {pos}"
        pos = hi
    return None if pos == n else f"tiles end at byte {pos}, the part has {n}"


def _tiles_fn(sched: Schedule, per_unit: int, short: bool):
    """Tiles per unit. short: the last chunk is empty and second parts are one tile shorter, as an
    allreduce of an awkward size makes them."""
    P, W = sched.parts, sched.world

    def ntiles(unit: int) -> int:
        if not short:
            return per_unit
        c, h = divmod(unit, P)
        if c == W - 1 and sched.op == "allreduce":
            return 0
        return per_unit - (1 if h == 1 else 0)

    return ntiles


def default_configs() -> list[tuple[int, int, bool]]:
    """(ctas, tiles per unit, short): fewer tiles than CTAs, uneven splits, one of each, short tails."""
    return [(1, 1, False), (2, 3, False), (3, 2, False), (2, 4, True), (5, 7, False)]


def check_schedule(
    sched: Schedule,
    configs: list[tuple[int, int, bool]] | None = None,
    seeds: int = 3,
    compute_orders: tuple[tuple[int, ...], ...] | None = None,
    produces: bool = False,
    spare_sms: int | None = None,
    grid_barrier: bool = False,
) -> Verdict:
    """Simulate ``sched`` under each (ctas, tiles per unit, short tails) config. spare_sms: SMs the
    communication kernel leaves free when each of its CTAs holds one (negative: fewer SMs than CTAs;
    None: every CTA resident and nothing beside them). grid_barrier: every CTA of a rank meets at a
    barrier after its steps (an epilogue's), the last to arrive releasing them."""
    problems: list[str] = []
    done: list[str] = []
    nops = 0
    for ctas, per_unit, short in configs or default_configs():
        for seed in range(seeds + 1):
            sim = _Sim(
                sched,
                ctas,
                _tiles_fn(sched, per_unit, short),
                None if seed == 0 else random.Random(seed),
                compute_orders,
                produces,
                None if spare_sms is None else ctas + spare_sms,
                grid_barrier,
            )
            try:
                nops += sim.run()
            except CheckError as e:
                problems.append(str(e))
                break
            for p in sim.problems:
                if p not in problems:
                    problems.append(p)
        what = ("gemm+" if produces else "") + sched.op + ("+gemm" if compute_orders and not produces else "")
        done.append(
            f"{what}/{sched.algorithm}/{sched.sync} world {sched.world}: {ctas} CTAs x {per_unit} tiles"
            f"{' (short tails)' if short else ''}"
            f"{'' if spare_sms is None else f', {ctas + spare_sms} SMs'}{', grid barrier' if grid_barrier else ''}, "
            f"{LL_CALLS if sched.sync == 'll' else CALLS} calls, {seeds + 1} interleavings"
        )
    return Verdict(not problems, problems, done, nops)


def check_layout(op: str, world: int, elem: int, parts: int, in_sizes: list[int], tile: int) -> list[str]:
    """Units tile every chunk and the whole buffer exactly, for concrete sizes (the kernel's arithmetic)."""
    from .layout import layout, unit_length

    problems = []
    nunits = OPS[op].in_chunks(world) * parts
    for n in in_sizes:
        shard, part = layout(op, world, n, elem, parts)
        pos = 0
        for u in range(nunits):
            c, h = divmod(u, parts)
            length = unit_length(op, world, n, shard, part, parts, u)
            off = c * shard + h * part
            if length and off != pos:
                problems.append(f"{op} {n} B: unit {u} starts at {off}, expected {pos}")
            if length % elem or off % elem:
                problems.append(f"{op} {n} B: unit {u} [{off}, {off + length}) splits an element")
            err = check_cover(length, tile_ranges(length, tile)) if length else None
            if err:
                problems.append(f"{op} {n} B: unit {u}: {err}")
            pos = off + length if length else pos
        if pos != n:
            problems.append(f"{op} {n} B: units cover {pos} bytes")
    return problems


@lru_cache(maxsize=None)
def verdict_of(s: Schedule, op: str = "", spare: int | None = None, grid_barrier: bool = False) -> Verdict:
    """The checker's verdict on a schedule (schedules are immutable values: check each once), with
    the compute stream of a GEMM op: consuming gathered chunks (ag_gemm) or producing inputs (gemm_rs),
    on the SMs the communication kernel leaves free (``spare``, see plan.spare_sms); grid_barrier: an
    epilogue's barrier after the steps, every CTA resident (the epilogue ops' cooperative launch)."""
    if not op or OPS[op].gemm is None:
        return check_schedule(s, grid_barrier=grid_barrier)
    orders = tuple(compute_order(op, s, r) for r in range(s.world))
    return check_schedule(s, compute_orders=orders, produces=OPS[op].gemm == "produce", spare_sms=spare)
