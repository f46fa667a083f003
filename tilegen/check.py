"""Stage 3: checker.

A CPU simulation of a schedule over all ranks and CTAs, for two consecutive calls, under several
interleavings. It follows the same rules as the generated kernel (tile t -> CTA t % ctas, per-tile
or per-chunk signals, epochs, the last-arriving CTA in barrier mode) and tracks happens-before with
vector clocks, so that it proves, for the configurations it runs:

* every output element is written exactly once per call, with the right source (tiles cover the
  chunk exactly, each tile cell gets one write whose data is rank c's input tile t of this call);
* every wait is eventually satisfied (no deadlock), else it names the blocked rank, CTA and signal;
* no read of data before the signal that publishes it (unsynchronised read), and no remote write
  into a buffer its owner may still be reading from the previous call (write-after-read).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .plan import Schedule, Step, tile_ranges

CALLS = 2


class CheckError(Exception):
    pass


@dataclass
class Verdict:
    ok: bool
    problems: list[str]
    configs: list[str]
    ops: int = 0

    def __str__(self) -> str:
        head = "OK" if self.ok else "FAILED"
        s = f"checker: {head} ({len(self.configs)} configurations, {self.ops} simulated operations)"
        for c in self.configs:
            s += f"\n  checked {c}"
        for p in self.problems[:20]:
            s += f"\n  problem: {p}"
        if len(self.problems) > 20:
            s += f"\n  ... {len(self.problems) - 20} more"
        return s


# ---- operations of one agent (one CTA of one rank in one call) ----
@dataclass(frozen=True)
class Op:
    kind: str  # signal | wait | read | write | arrive
    rank: int = -1  # rank whose memory is touched
    obj: tuple = ()  # ("entry", idx) | ("flag", chunk, tile) | ("out", chunk, tile) | ("in", tile)
    value: int = 0
    step: int = -1
    dests: tuple[int, ...] = ()


def _vc_join(a: list[int], b: list[int]) -> None:
    for i, x in enumerate(b):
        if x > a[i]:
            a[i] = x


def _hb(clock: tuple[int, int], vc: list[int]) -> bool:
    """Event (thread, time) happens-before a thread whose vector clock is vc."""
    t, c = clock
    return vc[t] >= c


def expand_agent(sched: Schedule, rank: int, cta: int, ctas: int, ntiles: int, epoch: int) -> list[Op]:
    """The ops CTA ``cta`` of ``rank`` performs in one call: mirrors the kernel's step loop."""
    ops: list[Op] = []
    per_tile = sched.sync == "per_tile"
    mine = [t for t in range(ntiles) if t % ctas == cta]
    for i, st in enumerate(sched.ranks[rank]):
        if st.kind == "entry":
            if cta == 0:
                ops += [Op("signal", p, ("entry", rank), epoch) for p in st.notify]
            ops += [Op("wait", rank, ("entry", p), epoch) for p in st.await_ranks]
        elif st.kind == "copy":
            if st.wait_src and not per_tile and mine:
                ops.append(Op("wait", rank, ("flag", st.chunk, 0), epoch))
            for t in mine:
                if st.wait_src and per_tile:
                    ops.append(Op("wait", rank, ("flag", st.chunk, t), epoch))
                src = ("in", t) if st.src == "input" else ("out", st.chunk, t)
                ops.append(Op("read", rank, src))
                ops += [Op("write", d, ("out", st.chunk, t)) for d in st.dests]
                if per_tile:
                    ops += [Op("signal", d, ("flag", st.chunk, t), epoch) for d in st.dests if d != rank]
            if not per_tile:
                remote = tuple(d for d in st.dests if d != rank)
                ops.append(Op("arrive", rank, ("ctr", i), epoch, step=i, dests=remote))
        elif st.kind == "wait":
            if per_tile:
                ops += [Op("wait", rank, ("flag", st.chunk, t), epoch) for t in mine]
            elif cta == 0:
                ops.append(Op("wait", rank, ("flag", st.chunk, 0), epoch))
        else:
            raise CheckError(f"rank {rank} step {i}: unknown step kind {st.kind!r}")
    return ops


@dataclass
class _Cell:
    write: tuple[int, int] | None = None  # (thread, time) of the last write
    writer: str = ""
    value: tuple | None = None
    reads: dict[int, int] = field(default_factory=dict)  # thread -> time of its last read
    writes_this_call: int = 0


@dataclass
class _Sig:
    value: int = 0
    vc: list[int] | None = None


class _Sim:
    def __init__(self, sched: Schedule, ctas: int, ntiles: int, rng: random.Random | None):
        self.s, self.G, self.T, self.rng = sched, ctas, ntiles, rng
        self.W = sched.world
        self.nthreads = self.W * (ctas + 1)  # CTAs plus one host/stream thread per rank
        self.vc = [[0] * self.nthreads for _ in range(self.nthreads)]
        self.cells: dict[tuple, _Cell] = {}
        self.sigs: dict[tuple, _Sig] = {}
        self.ctr: dict[tuple, tuple[int, list[int]]] = {}
        self.problems: list[str] = []
        self.last_read: dict[tuple[int, int], tuple | None] = {}  # per agent: data in registers
        self.nops = 0

    def tid(self, rank: int, cta: int) -> int:  # cta == -1: the rank's host/stream thread
        return rank * (self.G + 1) + (cta + 1)

    def tick(self, t: int) -> tuple[int, int]:
        self.vc[t][t] += 1
        return (t, self.vc[t][t])

    def name(self, t: int) -> str:
        r, c = divmod(t, self.G + 1)
        return f"rank {r} host" if c == 0 else f"rank {r} CTA {c - 1}"

    def problem(self, msg: str) -> None:
        if msg not in self.problems:
            self.problems.append(msg)

    # memory accesses with race detection
    def do_read(self, t: int, key: tuple, call: int) -> tuple | None:
        cell = self.cells.setdefault(key, _Cell())
        if cell.write is not None and not _hb(cell.write, self.vc[t]):
            self.problem(f"call {call}: {self.name(t)} reads {self._k(key)} before the signal of its write by "
                         f"{cell.writer} (unsynchronised read)")
        cell.reads[t] = self.tick(t)[1]
        return cell.value

    def do_write(self, t: int, key: tuple, value: tuple, call: int) -> None:
        cell = self.cells.setdefault(key, _Cell())
        if cell.write is not None and cell.write[0] != t and not _hb(cell.write, self.vc[t]):
            self.problem(f"call {call}: {self.name(t)} writes {self._k(key)} concurrently with {cell.writer} (write-write race)")
        for rt, rc in cell.reads.items():
            if rt != t and not _hb((rt, rc), self.vc[t]):
                self.problem(f"call {call}: {self.name(t)} writes {self._k(key)} while {self.name(rt)} may still read it "
                             f"(write-after-read: missing entry synchronisation)")
        cell.write = self.tick(t)
        cell.writer = self.name(t)
        cell.value = value
        cell.reads = {}
        cell.writes_this_call += 1

    @staticmethod
    def _k(key: tuple) -> str:
        r, kind, *rest = key
        if kind == "out":
            return f"output@{r}[chunk {rest[0]}][tile {rest[1]}]"
        return f"input@{r}[tile {rest[0]}]"

    def run(self) -> int:
        W, G, T = self.W, self.G, self.T
        ops_total = 0
        for r in range(W):  # inputs of call 1 are written by each rank's host thread
            for tt in range(T):
                self.do_write(self.tid(r, -1), (r, "in", tt), ("in", r, tt, 1), 0)
        call_of = [1] * W
        agents: dict[tuple[int, int], list[Op]] = {}
        pcs: dict[tuple[int, int], int] = {}

        def start_call(r: int) -> None:
            host = self.tid(r, -1)
            for b in range(G):  # stream order: the kernel's CTAs start after the host's prior work
                t = self.tid(r, b)
                _vc_join(self.vc[t], self.vc[host])
                agents[(r, b)] = expand_agent(self.s, r, b, G, T, call_of[r])
                pcs[(r, b)] = 0

        for r in range(W):
            start_call(r)
        while True:
            runnable = []
            for key, ops in agents.items():
                pc = pcs[key]
                if pc < len(ops) and self._ready(key, ops[pc]):
                    runnable.append(key)
            if not runnable:
                break
            key = self.rng.choice(runnable) if self.rng else runnable[0]
            self._exec(key, agents[key][pcs[key]], call_of[key[0]])
            pcs[key] += 1
            ops_total += 1
            r = key[0]
            if all(pcs[(r, b)] == len(agents[(r, b)]) for b in range(G)):
                self._finish_call(r, call_of[r])
                if call_of[r] < CALLS:
                    call_of[r] += 1
                    host = self.tid(r, -1)
                    for tt in range(T):  # next call's input, written after the kernel (stream order)
                        self.do_write(host, (r, "in", tt), ("in", r, tt, call_of[r]), call_of[r])
                    start_call(r)
                else:
                    for b in range(G):
                        agents.pop((r, b))
        for key, ops in agents.items():
            pc = pcs[key]
            if pc < len(ops):
                op = ops[pc]
                sig = self.sigs.get((op.rank,) + op.obj)
                seen = sig.value if sig else 0
                self.problem(f"deadlock: call {call_of[key[0]]}: rank {key[0]} CTA {key[1]} waits "
                             f"{self._sig(op)} >= {op.value}, sees {seen}, and nothing left can set it")
        self.nops += ops_total
        return ops_total

    def _sig(self, op: Op) -> str:
        if op.obj[0] == "entry":
            return f"entry[{op.obj[1]}]@{op.rank}"
        if op.obj[0] == "ctr":
            return f"counter[{op.obj[1]}]@{op.rank}"
        return f"flag[{op.obj[1]}][{op.obj[2]}]@{op.rank}"

    def _ready(self, key: tuple[int, int], op: Op) -> bool:
        if op.kind != "wait":
            return True
        sig = self.sigs.get((op.rank,) + op.obj)
        return sig is not None and sig.value >= op.value

    def _exec(self, key: tuple[int, int], op: Op, call: int) -> None:
        r, b = key
        t = self.tid(r, b)
        if op.kind == "wait":  # acquire
            sig = self.sigs[(op.rank,) + op.obj]
            _vc_join(self.vc[t], sig.vc)
            self.tick(t)
        elif op.kind == "signal":  # release store of the epoch
            self.tick(t)
            self.sigs[(op.rank,) + op.obj] = _Sig(op.value, list(self.vc[t]))
        elif op.kind == "read":
            self.last_read[key] = self.do_read(t, (op.rank,) + op.obj, call)
        elif op.kind == "write":
            self.do_write(t, (op.rank,) + op.obj, self.last_read.get(key), call)
        elif op.kind == "arrive":  # atomic add with release/acquire fences around it
            self.tick(t)
            ckey = (op.rank,) + op.obj
            n, cvc = self.ctr.get(ckey, (0, [0] * self.nthreads))
            _vc_join(cvc, self.vc[t])
            n += 1
            self.ctr[ckey] = (n, cvc)
            if n == op.value * self.G:  # last CTA of this call: it signals the chunk once
                _vc_join(self.vc[t], cvc)
                self.tick(t)
                for d in op.dests:
                    step = self.s.ranks[r][op.step]
                    self.sigs[(d, "flag", step.chunk, 0)] = _Sig(op.value, list(self.vc[t]))
            elif n > op.value * self.G:
                self.problem(f"call {call}: rank {r} counter {op.step} overran: {n} arrivals")

    def _finish_call(self, r: int, call: int) -> None:
        """Kernel end on rank r: the stream joins all CTAs, then the app reads the whole output."""
        host = self.tid(r, -1)
        for b in range(self.G):
            _vc_join(self.vc[host], self.vc[self.tid(r, b)])
        self.tick(host)
        for c in range(self.W):
            for tt in range(self.T):
                key = (r, "out", c, tt)
                cell = self.cells.get(key)
                if cell is None or cell.writes_this_call == 0:
                    self.problem(f"call {call}: output@{r}[chunk {c}][tile {tt}] never written")
                    continue
                if cell.writes_this_call > 1:
                    self.problem(f"call {call}: output@{r}[chunk {c}][tile {tt}] written {cell.writes_this_call} times")
                want = ("in", c, tt, call)
                got = self.do_read(host, key, call)
                if got != want:
                    src = "nothing" if got is None else f"rank {got[1]}'s input tile {got[2]} of call {got[3]}"
                    self.problem(f"call {call}: output@{r}[chunk {c}][tile {tt}] holds {src}, expected rank {c}'s "
                                 f"input tile {tt} of call {call}")
                cell.writes_this_call = 0


def check_cover(n: int, ranges: list[tuple[int, int]]) -> str | None:
    """The tiles must cover [0, n) exactly once."""
    pos = 0
    for lo, hi in ranges:
        if lo != pos or hi <= lo:
            return f"tile [{lo}, {hi}) does not continue at byte {pos}"
        pos = hi
    return None if pos == n else f"tiles end at byte {pos}, the chunk has {n}"


def default_configs(ctas: int) -> list[tuple[int, int]]:
    """(ctas, tiles) pairs: fewer tiles than CTAs, uneven split, one of each, and the plan's CTA count."""
    cfgs = [(1, 1), (2, 3), (3, 2), (2, 4)]
    if ctas not in (1, 2, 3):
        cfgs.append((min(ctas, 5), min(ctas, 5) + 2))
    return cfgs


def check_schedule(sched: Schedule, configs: list[tuple[int, int]] | None = None, seeds: int = 4,
                   shard_sizes: tuple[int, ...] = (1, 15, 4096, 262144 + 18), tile: int = 4096) -> Verdict:
    problems: list[str] = []
    done: list[str] = []
    nops = 0
    for n in shard_sizes:
        err = check_cover(n, tile_ranges(n, tile))
        if err:
            problems.append(f"shard of {n} B with {tile} B tiles: {err}")
    for ctas, ntiles in configs or default_configs(2):
        for seed in range(seeds + 1):
            sim = _Sim(sched, ctas, ntiles, None if seed == 0 else random.Random(seed))
            nops += sim.run()
            for p in sim.problems:
                if p not in problems:
                    problems.append(p)
        done.append(f"{sched.algorithm}/{sched.sync} world {sched.world}: {ctas} CTAs x {ntiles} tiles, "
                    f"{CALLS} calls, {seeds + 1} interleavings")
    return Verdict(not problems, problems, done, nops)
