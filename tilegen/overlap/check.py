"""The copy-engine overlap's checker: its programs (tilegen.overlap.ce_program) simulated on every rank.

The programs on every rank, CE_CALLS calls back to back, each step of a
stream in issue order. A copy or GEMM reads its sources when it starts and writes its destination
when it ends, and other streams run in between: a source changed in between is a write-after-read,
and data are tagged with (rank, chunk, split, call), so a read of another call's data (or of no
data) shows in the outputs the user reads after each call. The user writes A before each call and
reads C after it on the caller's stream.
"""
from __future__ import annotations

import random
from functools import lru_cache

from ..core.verdict import CheckError, Interleaving, Verdict

CE_CALLS = 3


def _ce_regions(reg, splits: int, count: int = 1) -> list[tuple]:
    buf, chunk, split = reg
    chunks = [chunk] if chunk is None else range(chunk, chunk + count)
    return [(buf, c, s) for c in chunks for s in (range(splits) if split is None else (split,))]


class _CeSim:
    def __init__(self, kind: str, world: int, splits: int, programs, rng: random.Random | None):
        self.kind, self.W, self.S, self.rng = kind, world, splits, rng
        self.data: dict[tuple, object] = {}  # (rank, buffer, chunk, split) -> value
        self.flags: dict[tuple[int, int], int] = {}
        self.entry: dict[tuple[int, int], int] = {}  # (rank, peer) -> the last call the peer entered
        self.queues: dict[tuple[int, str], list] = {}
        for r in range(world):
            qs: dict[str, list] = {"main": []}
            for st in programs[r]:
                qs.setdefault(st.stream, [])
            main = qs["main"]
            for call in range(CE_CALLS):
                main.append(("user_write", call, None))
                for st in programs[r]:
                    q = qs[st.stream]
                    # a join waits for every copy stream's steps issued so far, a fork for the main steps so far
                    mark = ({n: len(c) for n, c in qs.items() if n != "main"} if st.kind == "join"
                            else len(main) if st.kind == "fork" else None)
                    if st.kind in ("gemm", "put", "reduce"):
                        q.append(("start", call, st))
                        q.append(("end", call, st))
                    elif st.kind == "begin":  # notify the peers, then wait until they all entered
                        q.append(("begin", call, st))
                        q.append(("begin_wait", call, st))
                    else:
                        q.append((st.kind, call, st if mark is None else (st, mark)))
                main.append(("user_read", call, None))
            for n, q in qs.items():
                self.queues[(r, n)] = q
        self.pos = {k: 0 for k in self.queues}
        self.inflight: dict[tuple[int, str], tuple] = {}  # stream -> (sources and the values read, result)
        self.problems: list[str] = []

    # values
    def a_value(self, r: int, reg, call: int):
        return ("A", r, reg[1], reg[2], call)

    def expected_c(self, r: int, reg, call: int):
        buf, chunk, s = reg
        if self.kind == "ag_gemm":
            return ("G", ("A", chunk, None, s, call))
        return frozenset(("G", ("A", q, r, s, call)) for q in range(self.W))

    def where(self, r: int, st, role: str):
        """(rank, region) list a step reads as its source or addend, or writes (dst)."""
        reg = getattr(st, role)
        if reg is None:
            return []
        remote = st.kind == "put" and role == "dst"
        count = st.count if st.kind == "gemm" or (st.kind == "reduce" and role == "src") else 1
        return [(st.peer if remote else r,) + x for x in _ce_regions(reg, self.S, count)]

    @staticmethod
    def _as_sum(v):
        """A value as a set of summed products (None: missing data stays missing)."""
        return None if v is None else v if isinstance(v, frozenset) else frozenset({v})

    def result(self, st, vals: list, addends: list):
        if st.kind == "reduce":  # addends: the destination's values before; vals: count terms per region
            terms = [vals[i::len(addends)] for i in range(len(addends))]
            return [None if old is None or None in t else self._as_sum(old).union(*map(self._as_sum, t))
                    for old, t in zip(addends, terms)]
        if st.kind == "gemm":
            g = [("G", v) for v in vals]
            if st.addend is None:
                return g
            return [None if a is None else self._as_sum(a) | {x} for a, x in zip(map(self._as_sum, addends), g)]
        return list(vals)

    def blocked(self, key) -> str | None:
        """Why stream `key`'s next step cannot run now, or None."""
        r, _ = key
        kind, call, st = self.queues[key][self.pos[key]]
        if kind == "wait" and self.flags.get((r, st.flag), 0) != 1:
            return f"rank {r} call {call}: wait for flag {st.flag}"
        if kind == "begin_wait" and any(self.entry.get((r, q), -1) < call for q in range(self.W) if q != r):
            return f"rank {r} call {call}: entry handshake"
        if kind == "fork" and self.pos[(r, "main")] < st[1]:
            return f"rank {r} call {call}: fork on the main stream"
        if kind == "join":
            late = [n for n, mark in st[1].items() if self.pos[(r, n)] < mark]
            if late:
                return f"rank {r} call {call}: join of the {', '.join(late)} stream"
        return None

    def step(self, key) -> None:
        r, stream = key
        kind, call, st = self.queues[key][self.pos[key]]
        self.pos[key] += 1
        if kind == "user_write":
            for reg in self._a_regions():
                self.data[(r,) + reg] = self.a_value(r, reg, call)
        elif kind == "user_read":
            for reg in self._c_regions():
                got, want = self.data.get((r,) + reg), self.expected_c(r, reg, call)
                if got != want:
                    self.problems.append(f"rank {r} call {call}: {reg} holds {got}, expected {want}")
        elif kind == "begin":
            for q in range(self.W):
                if q != r:
                    self.entry[(q, r)] = call
        elif kind == "end" and st.kind == "put":
            self._finish(key, st, call)
            if self.flags.get((st.peer, st.flag), 0):
                self.problems.append(f"rank {r} call {call}: flag {st.flag} of rank {st.peer} set again before its "
                                     f"wait cleared it")
            self.flags[(st.peer, st.flag)] = 1
        elif kind == "wait":
            self.flags[(r, st.flag)] = 0
        elif kind == "start":
            reads = self.where(r, st, "src") + self.where(r, st, "dst" if st.kind == "reduce" else "addend")
            self.inflight[key] = [(w, self.data.get(w)) for w in reads]
        elif kind == "end":
            self._finish(key, st, call)

    def _finish(self, key, st, call) -> None:
        r = key[0]
        read = self.inflight.pop(key)
        for w, v in read:
            if self.data.get(w) != v:
                self.problems.append(f"rank {r} call {call}: {st.kind} read rank {w[0]}'s {w[1:]} while it was "
                                     f"overwritten (write-after-read)")
        nsrc = len(self.where(r, st, "src"))
        vals, addends = [v for _, v in read[:nsrc]], [v for _, v in read[nsrc:]]
        for w, v in zip(self.where(r, st, "dst"), self.result(st, vals, addends)):
            self.data[w] = v

    def _a_regions(self) -> list:
        if self.kind == "ag_gemm":
            return [("a", None, s) for s in range(self.S)]
        return [("a", d, s) for d in range(self.W) for s in range(self.S)]

    def _c_regions(self) -> list:
        if self.kind == "ag_gemm":
            return [("c", q, s) for q in range(self.W) for s in range(self.S)]
        return [("c", None, s) for s in range(self.S)]

    def run(self, pct: bool = False) -> int:
        """Runs every stream to its end, in the order an Interleaving picks; returns the steps run."""
        order = Interleaving(self.rng, self.queues, sum(len(q) for q in self.queues.values()), pct)
        while True:
            live = [k for k in self.queues if self.pos[k] < len(self.queues[k])]
            if not live:
                return order.n
            ready = [k for k in live if self.blocked(k) is None]
            if not ready:
                raise CheckError("deadlock: " + "; ".join(self.blocked(k) for k in live))
            self.step(order.pick(ready))


def check_copy_engine(kind: str, world: int, splits_options=(1, 2, 3), seeds: int = 40, program_fn=None,
                      styles=None) -> Verdict:
    """Simulate the copy-engine overlap of `kind` at `world` ranks (programs from tilegen.overlap.ce_program
    in each of its styles, or program_fn(world, rank, splits)) for each number of splits, under
    `seeds` random interleavings (half uniform, half PCT) and in order (the first ready stream first)."""
    from .ce_program import STYLES, program
    problems, done, nops = [], [], 0
    runs = [(sp, None) for sp in splits_options] if program_fn else \
        [(sp, st) for st in (styles or STYLES[kind]) for sp in splits_options]
    for splits, style in runs:
        label = f"{splits} splits" + (f", {style}" if style else "")
        make = program_fn or (lambda w, r, s: program(kind, w, r, s, style))
        progs = [make(world, r, splits) for r in range(world)]
        for seed in range(seeds + 1):
            sim = _CeSim(kind, world, splits, progs, None if seed == 0 else random.Random(seed))
            try:
                nops += sim.run(pct=seed % 2 == 0 and seed > 0)
            except CheckError as e:
                problems.append(f"{label}: {e}")
                break
            for p in sim.problems:
                if f"{label}: {p}" not in problems:
                    problems.append(f"{label}: {p}")
        done.append(f"{kind} copy engine world {world}: {label}, {CE_CALLS} calls, {seeds + 1} interleavings")
    return Verdict(not problems, problems, done, nops)


@lru_cache(maxsize=None)
def copy_engine_verdict(op: str, world: int) -> Verdict:
    """The checker's verdict on a GEMM op's copy-engine programs (every style) at `world` ranks."""
    return check_copy_engine(op, world)
