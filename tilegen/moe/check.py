"""MoE token dispatch and combine (expert parallelism, one node): the layout and the per-rank
protocol the kernels (include/tilegen/moe/) implement, checked before a MoE op is generated (the
MoE family's check stage: moe_problems, at the end of this module).

Routing: rank s holds m_s tokens x_s [m_s, hidden] and topk_idx_s [m_s, k] (expert ids in
[0, experts), -1: slot dropped) with topk_weights_s [m_s, k]. Experts are split evenly: expert e
lives on rank e // L, as its local expert e % L (L = experts / world). An item is one (s, t, j)
with e = topk_idx_s[t, j] >= 0: token t of rank s sent to expert e.

Dispatch (normal mode) lays the items each rank receives out contiguously per local expert, in a
fixed order: local expert, then source rank, then token, then slot (deterministic: independent of
timing). The kernels push each token once per destination rank into that rank's staging segment for
the sender (`staging_rows`), with the item indices the sender computed (`item_index`: its earlier
items for the same expert); the sender's counts travel with its flag; the receiver expands the
staging rows into the final rows (`expanded_rows`), the same rows `sender_rows` computes item by
item. The handle (source rank, token, slot of every received row) is what combine needs.

Low-latency mode: fixed capacity, no host synchronisation: rank d's local expert l has one segment
of max_tokens rows per source rank (experts are distinct per token); an item's row in its segment
is its item index; the counts per (expert, source) travel first, in head lines (CUDA-graph capturable).
Each source sends a token once to each other rank it goes to, as a line row in its staging segment there
(`staging_rows`): the token and combine's state (its slot rows there, weights) in lines that carry the
call's epoch (LL128), which the destination copies into every item row as they land; on its own rank
the source writes the item rows and the state itself (`_simulate_low_latency` runs it).

Combine: each received row's expert output goes back to its source rank (the kernels first sum a
token's items on each expert rank, in slot order, in fp32); the source sums them weighted, in a
fixed order: deterministic.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from ..core.verdict import Interleaving

MODES = ("normal", "low_latency")


@dataclass(frozen=True)
class MoeShape:
    world: int
    experts: int
    topk: int
    max_tokens: int  # per rank

    def __post_init__(self):
        if self.world < 1 or self.experts < 1 or self.topk < 1 or self.max_tokens < 0:
            raise ValueError(f"MoE shape needs world, experts, topk >= 1 and max_tokens >= 0, got {self}")
        if self.experts % self.world:
            raise ValueError(f"experts ({self.experts}) must split evenly over {self.world} ranks")
        if self.topk > self.experts:
            raise ValueError(f"topk ({self.topk}) exceeds the {self.experts} experts")

    @property
    def local_experts(self) -> int:
        return self.experts // self.world

    def owner(self, expert: int) -> tuple[int, int]:
        """(rank, local expert) of a global expert id."""
        return divmod(expert, self.local_experts)

    def ll_capacity(self) -> int:
        """Rows of one (local expert, source rank) segment in low-latency mode: a source's tokens, each
        reaching an expert at most once (experts are distinct per token)."""
        return self.max_tokens


def check_routing(shape: MoeShape, topk_idx: np.ndarray, topk_weights: np.ndarray | None = None,
                  rank: int | None = None) -> None:
    """ValueError (naming the argument and what was expected) for a routing no kernel may see."""
    who = "" if rank is None else f" (rank {rank})"
    idx = np.asarray(topk_idx)
    if idx.ndim != 2 or idx.shape[1] != shape.topk:
        raise ValueError(f"topk_idx{who} must be [m, {shape.topk}] (topk {shape.topk}), got shape {list(idx.shape)}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"topk_idx{who} must hold integers (int32/int64), got {idx.dtype}")
    if idx.shape[0] > shape.max_tokens:
        raise ValueError(f"topk_idx{who} has {idx.shape[0]} tokens, more than max_tokens {shape.max_tokens}")
    bad = (idx < -1) | (idx >= shape.experts)
    if bad.any():
        t, j = map(int, np.argwhere(bad)[0])
        raise ValueError(f"topk_idx{who}[{t}, {j}] = {int(idx[t, j])}: expert ids must be in [0, {shape.experts}) "
                         f"or -1 (dropped)")
    if topk_weights is not None:
        w = np.asarray(topk_weights)
        if w.shape != idx.shape:
            raise ValueError(f"topk_weights{who} must have topk_idx's shape {list(idx.shape)}, got {list(w.shape)}")


def expert_counts(shape: MoeShape, topk_idx: np.ndarray) -> np.ndarray:
    """[experts] items this rank sends to each expert (what the all-gather exchanges)."""
    idx = np.asarray(topk_idx).reshape(-1)
    return np.bincount(idx[idx >= 0], minlength=shape.experts).astype(np.int64)


def sender_rows(shape: MoeShape, me: int, topk_idx: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Normal mode, on sender `me`: the destination row (on rank owner(e)) of each of its items,
    [m, k] (-1 for dropped slots), from every rank's counts [world, experts] (the all-gathered ones).
    Row = items of the destination's earlier local experts + earlier source ranks' items for e +
    this rank's earlier items for e (in token, slot order): the kernels' arithmetic."""
    idx = np.asarray(topk_idx)
    L = shape.local_experts
    per_expert = counts.sum(axis=0)  # [experts] items every expert receives
    rows = np.full(idx.shape, -1, dtype=np.int64)
    seen = np.zeros(shape.experts, dtype=np.int64)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e < 0:
                continue
            d = e // L
            rows[t, j] = per_expert[d * L:e].sum() + counts[:me, e].sum() + seen[e]
            seen[e] += 1
    return rows


def token_counts(shape: MoeShape, topk_idx: np.ndarray) -> np.ndarray:
    """[world] tokens this rank sends to each rank when a token goes once per destination rank
    (whatever number of its experts live there): what the deduplicated push exchanges besides the
    per-expert counts."""
    idx = np.asarray(topk_idx)
    L = shape.local_experts
    out = np.zeros(shape.world, dtype=np.int64)
    for row in idx:
        for d in {int(e) // L for e in row if e >= 0}:
            out[d] += 1
    return out


def staging_rows(shape: MoeShape, me: int, topk_idx: np.ndarray, ntok: np.ndarray | None = None) -> np.ndarray:
    """Deduplicated push, on sender `me`: [m, world] the staging row at each destination of each of its
    tokens (-1: no expert there): its own segment of max_tokens rows there (so no token counts need
    exchanging first) + its earlier tokens for that destination (the kernels' route and push; `ntok`,
    the all-gathered token counts, is unused by this arithmetic and kept for replacements in tests)."""
    idx = np.asarray(topk_idx)
    L = shape.local_experts
    rows = np.full((idx.shape[0], shape.world), -1, dtype=np.int64)
    seen = np.zeros(shape.world, dtype=np.int64)
    for t, row in enumerate(idx):
        for d in sorted({int(e) // L for e in row if e >= 0}):
            rows[t, d] = me * shape.max_tokens + seen[d]
            seen[d] += 1
    return rows


def expanded_rows(shape: MoeShape, d: int, staged: list[tuple[int, int, np.ndarray, np.ndarray]],
                  counts: np.ndarray) -> list:
    """On receiver d, from its staging rows [(source, token, topk_idx row, item indices)] in staging
    order (segments by source) and every source's per-expert counts [world, experts] (sent with its
    flag): [(staging row, slot, final row)] for every slot with an expert here. Final row as
    sender_rows computes it; its last term, the source's earlier items for e, is the item index the
    sender computed (item_index) and sent in the staging row's meta."""
    L = shape.local_experts
    per_expert = counts.sum(axis=0)
    out = []
    for i, (s, t, row, index) in enumerate(staged):
        for j, e in enumerate(int(v) for v in row):
            if e >= 0 and e // L == d:
                out.append((i, j, int(per_expert[d * L:e].sum() + counts[:s, e].sum() + index[j])))
    return out


def item_index(shape: MoeShape, topk_idx: np.ndarray) -> np.ndarray:
    """[m, k]: each item's rank among this rank's items for its expert, in (token, slot) order (-1:
    dropped): what the sender writes into a staging row's meta, and a low-latency segment's row."""
    return ll_rows(shape, topk_idx)


def nvlink_rows(shape: MoeShape, idxs: Sequence[np.ndarray]) -> tuple[int, int]:
    """(token rows sent to other ranks when each item is pushed, when each token goes once per
    destination rank): the NVLink traffic of the two dispatch designs."""
    L = shape.local_experts
    per_item = sum(int(((np.asarray(i) >= 0) & (np.asarray(i) // L != s)).sum()) for s, i in enumerate(idxs))
    per_token = sum(len({int(e) // L for e in row if e >= 0} - {s}) for s, i in enumerate(idxs) for row in i)
    return per_item, per_token


def ll_rows(shape: MoeShape, topk_idx: np.ndarray) -> np.ndarray:
    """Low-latency mode: each item's row within its (local expert, source) segment, [m, k] (-1: dropped)."""
    idx = np.asarray(topk_idx)
    rows = np.full(idx.shape, -1, dtype=np.int64)
    seen = np.zeros(shape.experts, dtype=np.int64)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e >= 0:
                rows[t, j] = seen[e]
                seen[e] += 1
    return rows


@dataclass
class Dispatched:
    """What rank d receives (normal mode): x [rows, hidden], the per-local-expert counts, and the
    handle: (source rank, token, slot) of every row."""

    x: np.ndarray
    counts: np.ndarray  # [local experts]
    handle: np.ndarray  # [rows, 3]


def reference_dispatch(shape: MoeShape, xs: Sequence[np.ndarray], idxs: Sequence[np.ndarray]) -> list[Dispatched]:
    """The normal-mode result on every rank, by definition (not by the protocol): items sorted by
    (local expert, source, token, slot)."""
    out = []
    L = shape.local_experts
    hidden = xs[0].shape[1] if xs and xs[0].ndim == 2 else 0
    for d in range(shape.world):
        items = [(e - d * L, s, t, j) for s, idx in enumerate(idxs) for t in range(len(idx))
                 for j in range(shape.topk) if (e := int(idx[t, j])) >= 0 and e // L == d]
        items.sort()
        x = np.stack([xs[s][t] for _, s, t, _ in items]) if items else np.zeros((0, hidden), xs[0].dtype)
        counts = np.bincount([le for le, *_ in items], minlength=L).astype(np.int64)
        handle = np.array([(s, t, j) for _, s, t, j in items], dtype=np.int64).reshape(-1, 3)
        out.append(Dispatched(x, counts, handle))
    return out


def reference_combine(shape: MoeShape, ys: Sequence[np.ndarray], handles: Sequence[np.ndarray],
                      idxs: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """out_s[t] = sum over slots j (in order) of weights_s[t, j] * the expert output of item (s, t, j),
    in float64 (the reference GPU results are compared against)."""
    hidden = ys[0].shape[1]
    staged = [np.zeros((len(idx), shape.topk, hidden)) for idx in idxs]
    for y, h in zip(ys, handles):
        for row, (s, t, j) in enumerate(h):
            staged[s][t, j] = y[row]
    return [np.einsum("tj,tjh->th", np.where(np.asarray(idx) >= 0, w, 0.0), st)
            for st, idx, w in zip(staged, idxs, weights)]


# ------------------------------------------------------------------ protocol check
class MoeCheckError(Exception):
    pass


def _simulate_normal(shape: MoeShape, xs, idxs, rows_fn=None) -> list[Dispatched]:
    """The protocol as the kernels run it: counts all-gathered, each sender computing its items'
    rows, pushing them (and their handles) into the destinations' buffers; a row written twice or
    never, or a row outside the buffer, is an error."""
    counts = np.stack([expert_counts(shape, idx) for idx in idxs])  # the all-gather
    L = shape.local_experts
    per_rank = [int(counts[:, d * L:(d + 1) * L].sum()) for d in range(shape.world)]
    hidden = xs[0].shape[1]
    bufs = [np.full((n, hidden), np.nan) for n in per_rank]
    handles = [np.full((n, 3), -1, dtype=np.int64) for n in per_rank]
    written = [np.zeros(n, dtype=np.int64) for n in per_rank]
    for s, (x, idx) in enumerate(zip(xs, idxs)):
        rows = (rows_fn or sender_rows)(shape, s, idx, counts)
        for t in range(len(idx)):
            for j in range(shape.topk):
                e = int(idx[t, j])
                if e < 0:
                    continue
                d, row = e // L, int(rows[t, j])
                if not 0 <= row < per_rank[d]:
                    raise MoeCheckError(f"rank {s} token {t} slot {j}: row {row} outside rank {d}'s {per_rank[d]}")
                bufs[d][row], handles[d][row] = x[t], (s, t, j)
                written[d][row] += 1
    for d in range(shape.world):
        twice, never = np.flatnonzero(written[d] > 1), np.flatnonzero(written[d] == 0)
        if len(twice) or len(never):
            raise MoeCheckError(f"rank {d}: rows written twice {twice[:5].tolist()}, never {never[:5].tolist()}")
    return [Dispatched(bufs[d], counts[:, d * L:(d + 1) * L].sum(axis=0), handles[d]) for d in range(shape.world)]


def _simulate_normal_dedup(shape: MoeShape, xs, idxs, rows_fn=None) -> list[Dispatched]:
    """The deduplicated protocol as tilegen/moe.cuh runs it: each token pushed once per destination
    rank into its staging row there (with its routing row and the item indices it computed), each
    source's counts (per expert, and its tokens for that rank) sent with its flag, each receiver
    reading the first `tokens` rows of every source's segment and expanding them into the final
    per-expert layout; every staging row read must have been written once, every final row once."""
    counts = np.stack([expert_counts(shape, idx) for idx in idxs])
    ntok = np.stack([token_counts(shape, idx) for idx in idxs])  # [source, destination]
    L, hidden, T = shape.local_experts, xs[0].shape[1], shape.max_tokens
    staged: list[list] = [[None] * (shape.world * T) for _ in range(shape.world)]
    for s, (x, idx) in enumerate(zip(xs, idxs)):
        rows = (rows_fn or staging_rows)(shape, s, idx, ntok)
        index = item_index(shape, idx)
        for t in range(len(idx)):
            for d in range(shape.world):
                r = int(rows[t, d])
                if r < 0:
                    continue
                if not 0 <= r < len(staged[d]) or staged[d][r] is not None:
                    raise MoeCheckError(f"rank {s} token {t}: staging row {r} at rank {d} outside its "
                                        f"{len(staged[d])} rows or written twice")
                staged[d][r] = (s, t, np.asarray(idx[t]), index[t], x[t])
    out = []
    for d in range(shape.world):
        read = [staged[d][s * T + i] for s in range(shape.world) for i in range(int(ntok[s, d]))]
        if any(v is None for v in read):
            raise MoeCheckError(f"rank {d}: staging rows never written among the first rows of a segment")
        if sum(v is not None for v in staged[d]) != len(read):
            raise MoeCheckError(f"rank {d}: staging rows written outside the rows it reads")
        n = int(counts[:, d * L:(d + 1) * L].sum())
        buf, handle, written = np.full((n, hidden), np.nan), np.full((n, 3), -1, dtype=np.int64), np.zeros(n, int)
        for i, j, row in expanded_rows(shape, d, [(s, t, r, ix) for s, t, r, ix, _ in read], counts):
            s, t, _, _, x = read[i]
            if not 0 <= row < n:
                raise MoeCheckError(f"rank {d}: expanded row {row} outside its {n}")
            buf[row], handle[row] = x, (s, t, j)
            written[row] += 1
        if (written != 1).any():
            raise MoeCheckError(f"rank {d}: final rows written {written.tolist()[:8]} times")
        out.append(Dispatched(buf, counts[:, d * L:(d + 1) * L].sum(axis=0), handle))
    return out


def line_row_slots(slot_rows: np.ndarray, d: int) -> np.ndarray:
    """Low-latency dispatch: the slot rows a token's line row to rank d carries (slot_rows: [world, k],
    the token's row of each slot at each rank, -1 elsewhere): its rows at d."""
    return slot_rows[d].copy()


def state_weights(w: np.ndarray, slot_rows: np.ndarray) -> np.ndarray:
    """Low-latency combine's state: a token's slot weights at one rank, in slot order (0 for the slots
    whose expert is elsewhere: their rows are -1, which combine skips)."""
    return np.where(slot_rows >= 0, w, 0.0)


def _simulate_low_latency(shape: MoeShape, xs, idxs, rows_fn=None, ws=None) -> list[Dispatched]:
    """Low-latency, as the kernels run it: segments [local expert][source] of ll_capacity rows; each
    source sends its token to every other rank it goes to as a line row in its staging segment there
    (the token's rank among its tokens to that rank) with combine's state (slot rows there, weights,
    source and token); the destination copies the token into every slot row the line row names and
    keeps the state; on its own rank the source writes the item rows and the state. The rows a receiver
    reads are the first count rows of each segment, compacted here in (local expert, source) order to
    compare with the reference. With `ws`, combine runs through the state too (each destination sums
    a token's slots in slot order, the source sums the destinations in rank order) and must give the
    weighted sum of the experts' outputs (here sin of each row)."""
    L, cap, W, K = shape.local_experts, shape.ll_capacity(), shape.world, shape.topk
    hidden = xs[0].shape[1]
    buf: dict[tuple[int, int], np.ndarray] = {}  # (d, row) -> token
    handle: dict[tuple[int, int], tuple] = {}  # (d, row) -> (s, t, j)
    state: dict[tuple[int, int], tuple] = {}  # (d, staging row) -> (s, t, slot rows, weights)
    lines: dict[tuple[int, int], tuple] = {}  # (d, staging row) -> what the line row carries: state, token
    for s, (x, idx) in enumerate(zip(xs, idxs)):
        rows = (rows_fn or ll_rows)(shape, idx)
        stage = staging_rows(shape, s, idx)
        for t in range(len(idx)):
            slot_rows = np.full((W, K), -1, dtype=np.int64)
            for j in range(K):
                e = int(idx[t, j])
                if e < 0:
                    continue
                d, le = divmod(e, L)
                r = int(rows[t, j])
                if not 0 <= r < cap:
                    raise MoeCheckError(f"rank {s} token {t} slot {j}: row {r} outside the {cap}-row segment")
                slot_rows[d, j] = (le * W + s) * cap + r
            for d in range(W):
                slots = [j for j in range(K) if slot_rows[d, j] >= 0]
                if not slots:
                    continue
                srow = int(stage[t, d])
                if not s * cap <= srow < (s + 1) * cap or (d, srow) in state:
                    raise MoeCheckError(f"rank {s} token {t}: staging row {srow} at rank {d} outside its segment "
                                        f"or written twice")
                w = ws[s][t] if ws is not None else np.zeros(K)
                carried = line_row_slots(slot_rows, d)
                sent = (s, t, carried, state_weights(w, carried))
                if d == s:
                    _expand_line_row(shape, d, srow, sent + (x[t],), buf, handle, state)
                else:
                    lines[(d, srow)] = sent + (x[t],)
    for (d, srow), line_row in sorted(lines.items()):  # each destination's copies of other ranks' tokens
        _expand_line_row(shape, d, srow, line_row, buf, handle, state)
    out = []
    for d in range(W):
        xr, hr, counts = [], [], np.zeros(L, dtype=np.int64)
        for le in range(L):
            for s in range(W):
                base = (le * W + s) * cap
                n = sum(1 for r in range(cap) if (d, base + r) in buf)
                if any((d, base + r) not in buf for r in range(n)):
                    raise MoeCheckError(f"rank {d} expert {le} source {s}: rows are not 0..n-1")
                counts[le] += n
                xr += [buf[(d, base + r)] for r in range(n)]
                hr += [handle[(d, base + r)] for r in range(n)]
        out.append(Dispatched(np.stack(xr) if xr else np.zeros((0, hidden)), counts,
                              np.array(hr, dtype=np.int64).reshape(-1, 3)))
    if ws is not None:
        _combine_through_state(shape, xs, idxs, ws, buf, state)
    return out


def _expand_line_row(shape: MoeShape, d: int, srow: int, line_row: tuple, buf, handle, state) -> None:
    """Rank d keeps a line row's state (combine reads it) and copies its token into every slot row it
    names, with the handles: MoeCheckError where a row is outside d's rows or written twice."""
    s, t, slot_rows, w, x = line_row
    n = shape.local_experts * shape.world * shape.ll_capacity()
    state[(d, srow)] = (s, t, slot_rows, w)
    for j, r in enumerate(int(r) for r in slot_rows):
        if r < 0:
            continue
        if r >= n or (d, r) in buf:
            raise MoeCheckError(f"rank {d}: row {r} of token {t} from rank {s} outside its {n} rows or written twice")
        buf[(d, r)], handle[(d, r)] = x, (s, t, j)


def weighted_outputs(shape: MoeShape, x: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[m, hidden]: each token's weighted sum of its experts' outputs, sin of its row standing for every
    expert (a token whose slots are all dropped: zeros)."""
    hidden = x.shape[1]
    return np.array([sum((w[t, j] * np.sin(x[t]) for j in range(shape.topk) if idx[t, j] >= 0), np.zeros(hidden))
                     for t in range(len(x))]).reshape(len(x), hidden)


def _combine_through_state(shape: MoeShape, xs, idxs, ws, buf, state) -> None:
    """Low-latency combine as the kernels run it, from the state the sources wrote: MoeCheckError if it
    differs from the weighted sum of each token's experts' outputs (sin of its row)."""
    hidden = xs[0].shape[1]
    back = [np.zeros((len(x), hidden)) for x in xs]
    for (d, _), (s, t, slot_rows, w) in sorted(state.items()):  # rank order per token
        back[s][t] += sum((w[j] * np.sin(buf[(d, int(r))]) for j, r in enumerate(slot_rows) if r >= 0),
                          np.zeros(hidden))
    for s, (x, idx) in enumerate(zip(xs, idxs)):
        if not np.allclose(back[s], weighted_outputs(shape, x, idx, ws[s])):
            raise MoeCheckError(f"rank {s}: combine through the sources' state differs from the weighted sum")


def random_routing(shape: MoeShape, m: int, rng: random.Random, case: str = "random") -> np.ndarray:
    """A [m, k] routing: random distinct experts ("random"), with dropped slots ("dropped"), every
    token to the same k experts ("one_expert": the first k, so expert 0 gets every token), or a
    routing that leaves most experts empty ("sparse")."""
    k, E = shape.topk, shape.experts
    if case == "one_expert":
        return np.tile(np.arange(k), (m, 1)).astype(np.int64)
    pool = list(range(E)) if case != "sparse" else list(range(min(E, k + 1)))
    idx = np.array([rng.sample(pool, k) for _ in range(m)], dtype=np.int64).reshape(m, k)
    if case == "dropped":
        idx[np.array([[rng.random() < 0.3 for _ in range(k)] for _ in range(m)], dtype=bool).reshape(m, k)] = -1
    return idx


CASES = ("random", "dropped", "one_expert", "sparse")


PUSHES = ("item", "token")  # normal mode: each item to its final row, or each token once per rank


def check_moe(shape: MoeShape, mode: str = "normal", hidden: int = 3, seeds: int = 8, rows_fn=None,
              push: str = "item") -> list[str]:
    """Simulates dispatch then combine on every rank for random routings (each case, token counts
    0, 1, max and random, per rank) and compares with the references: [] or the problems found.
    rows_fn replaces the senders' row arithmetic (sender_rows / staging_rows / ll_rows), for tests."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if push not in PUSHES:
        raise ValueError(f"push must be one of {', '.join(PUSHES)}, got {push!r}")
    simulate = _simulate_low_latency if mode == "low_latency" else \
        _simulate_normal if push == "item" else _simulate_normal_dedup
    problems: list[str] = []
    for seed in range(seeds):
        rng = random.Random(seed)
        case = CASES[seed % len(CASES)]
        ms = [rng.choice([0, 1, shape.max_tokens, rng.randint(0, shape.max_tokens)]) for _ in range(shape.world)]
        idxs = [random_routing(shape, m, rng, case) for m in ms]
        xs = [np.array([[s * 1000 + t + h / 10 for h in range(hidden)] for t in range(m)]).reshape(m, hidden)
              for s, m in enumerate(ms)]
        ws = [np.array([[rng.random() for _ in range(shape.topk)] for _ in range(m)]).reshape(m, shape.topk)
              for m in ms]
        where = f"seed {seed} ({case}, tokens {ms})"
        try:
            for s, idx in enumerate(idxs):
                check_routing(shape, idx, ws[s], s)
            got = simulate(shape, xs, idxs, rows_fn, ws) if mode == "low_latency" else \
                simulate(shape, xs, idxs, rows_fn)
        except (MoeCheckError, ValueError) as e:
            problems.append(f"{where}: {e}")
            continue
        want = reference_dispatch(shape, xs, idxs)
        for d, (g, w) in enumerate(zip(got, want)):
            if not (np.array_equal(g.counts, w.counts) and np.array_equal(g.handle, w.handle)
                    and np.array_equal(g.x, w.x)):
                problems.append(f"{where}: rank {d} received a different layout than the reference")
        ys = [np.sin(g.x) for g in got]  # any per-row expert function
        outs = reference_combine(shape, ys, [g.handle for g in got], idxs, ws)
        direct = [weighted_outputs(shape, xs[s], idxs[s], ws[s]) for s in range(shape.world)]
        for s in range(shape.world):
            if not np.allclose(outs[s], direct[s]):
                problems.append(f"{where}: rank {s}'s combine differs from the weighted sum of its experts' outputs")
    return problems


# ------------------------------------------------------------------ the protocol across calls
# Each rank runs its steps in order on one stream (the kernels of dispatch, the caller's expert
# computation, combine), call after call. Buffers are reused across calls, so a fast rank's next
# call must not overwrite what a slow rank still reads: the simulation tags every value with its
# call and checks that each read sees its own call's values, under random and PCT interleavings.
# Flags carry the call's epoch (monotonic: never cleared, a CUDA graph replays them right when the
# epoch lives on the device).
@dataclass(frozen=True)
class MoeStep:
    """kinds: put (write `buf` at every peer, the part from this rank; then set flag `flag` there;
    tagged: the flag is in the data, `buf` carries the epoch, and only this rank's own flag is set,
    here), wait (until every peer set flag `flag` here), read (the caller or a kernel reads `buf` here:
    every peer's part must be this call's), tagged_read (a read that first waits until every peer's
    part of `buf` here carries the epoch `flag` names: exactly, as the kernels compare)."""

    kind: str
    buf: str = ""
    flag: str = ""
    tagged: bool = False


def moe_program(mode: str) -> tuple[MoeStep, ...]:
    """One call of dispatch, the expert computation and combine, on one rank. Normal mode exchanges
    counts first (the senders' rows depend on them); low-latency mode sends counts with the data, and
    its sources send the tokens and combine's state as tagged line rows (recv: the epoch in the data),
    which the destination reads as they land, then keeps (the experts and combine read them).
    No entry handshake: every put goes to every peer (an empty one still sets its flag), so a rank
    starts writing a peer's buffer only after that peer's own puts of the step before, which follow
    its reads of the previous call (the check shows it; a rank that skipped an empty peer would
    deadlock it, which the check shows too)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    steps = []
    if mode == "normal":
        steps += [MoeStep("put", "counts", "counts"), MoeStep("wait", flag="counts"), MoeStep("read", "counts")]
    if mode == "normal":
        steps += [MoeStep("put", "recv", "recv"), MoeStep("wait", flag="recv"), MoeStep("read", "recv")]  # experts
    else:  # the expansion reads the line rows, the experts their copies, combine's send its state
        steps += [MoeStep("put", "recv", "recv", tagged=True), MoeStep("tagged_read", "recv", "recv"),
                  MoeStep("read", "recv"), MoeStep("read", "recv")]
    steps += [MoeStep("put", "back", "back"), MoeStep("wait", flag="back"), MoeStep("read", "back")]  # combine
    return tuple(steps)


MOE_CALLS = 3


HOST_VALUES = ("epoch", "arrivals")

# Low-latency epochs as the kernels take them (moe.cuh, ll_flag): each half's from this rank's own flag
# of the other half here (flag -> (own flag read, added)): the dispatch's one more than the last
# combine's, the combine's the dispatch's.
LL_EPOCHS = {"recv": ("back", 1), "back": ("recv", 0)}


def check_moe_protocol(world: int, mode: str = "normal", seeds: int = 40, program=None,
                       captured: tuple[str, ...] = (), epochs: dict | None = None) -> list[str]:
    """Every rank runs `program` (default moe_program(mode)) MOE_CALLS times; [] or the problems
    (stale or overwritten reads, deadlocks naming the blocked steps).

    captured: per-call values the calls take from the host, as a CUDA graph replays them (the
    capture's, call 0's, on every replay): "epoch" (the flags' value), "arrivals" (the count of
    blocks a put's last block waits for before it sets the flags: without a reset, replays never see
    it again). Low-latency mode must keep both on the device: the check shows what either would do.
    epochs: where each put and wait takes its epoch (default: the call's, call + 1; low-latency mode:
    LL_EPOCHS). A rule reads the rank's own flag; a wait reads it as its put starts, the kernel that
    waits being launched early (it starts while the put's kernel runs), so a rule reading a flag the
    put itself sets sees the value before or after, as it happens."""
    bad = set(captured) - set(HOST_VALUES)
    if bad:
        raise ValueError(f"captured must name values of {', '.join(HOST_VALUES)}, got {sorted(bad)}")
    rules = epochs if epochs is not None else (LL_EPOCHS if mode == "low_latency" else {})
    prog = program or moe_program(mode)
    problems: list[str] = []
    for seed in range(seeds + 1):
        rng = random.Random(seed) if seed else None
        pct = seed % 2 == 0 and seed > 0
        data: dict[tuple, int] = {}  # (rank, buf, from rank) -> call
        tags: dict[tuple, int] = {}  # (rank, buf, from rank) -> the epoch a tagged put wrote with it
        flags: dict[tuple, int] = {}  # (rank, flag, from rank) -> epoch (call + 1)
        pos = [0] * world
        queue = [[(call, st) for call in range(MOE_CALLS) for st in prog] for _ in range(world)]
        inflight: dict[int, list] = {}  # rank -> what its running read saw (a read spans other ranks' steps)
        order = Interleaving(rng, range(world), world * len(queue[0]) + 1, pct)
        early: dict[tuple, int] = {}  # (rank, flag) -> the epoch its waiting kernel read as the put started

        def epoch(r, call, flag):
            if "epoch" in captured:
                return 1
            if flag not in rules:
                return call + 1
            own, add = rules[flag]
            return flags.get((r, own, r), 0) + add

        def blocked(r):
            call, st = queue[r][pos[r]]
            if st.kind not in ("wait", "tagged_read") or r in inflight:
                return None
            want = early.get((r, st.flag), epoch(r, call, st.flag))
            if st.kind == "tagged_read":
                if any(tags.get((r, st.buf, q), 0) != want for q in range(world) if q != r):
                    return f"rank {r} call {call}: wait for {st.buf}'s epoch {want}"
            elif any(flags.get((r, st.flag, q), 0) < want for q in range(world) if q != r):
                return f"rank {r} call {call}: wait for {st.flag}"
            return None

        try:
            while True:
                live = [r for r in range(world) if pos[r] < len(queue[r])]
                if not live:
                    break
                ready = [r for r in live if blocked(r) is None]
                if not ready:
                    raise MoeCheckError("deadlock: " + "; ".join(blocked(r) for r in live))
                r = order.pick(ready)
                call, st = queue[r][pos[r]]
                if st.kind in ("read", "tagged_read") and r not in inflight:  # starts, runs beside others, ends
                    inflight[r] = [(q, data.get((r, st.buf, q))) for q in range(world)]
                    continue
                pos[r] += 1
                if st.kind == "put":
                    value = epoch(r, call, st.flag)
                    if st.flag in rules:
                        early[(r, st.flag)] = value  # (read before this put sets its own flag)
                    for q in range(world):
                        data[(q, st.buf, r)] = call
                        if st.tagged:
                            tags[(q, st.buf, r)] = value
                        if (st.tagged and q != r) or (call and "arrivals" in captured):
                            continue  # (the capture's count passed to the last block: no flag set)
                        flags[(q, st.flag, r)] = value
                elif st.kind in ("read", "tagged_read"):
                    for q, seen in inflight.pop(r):
                        now = data.get((r, st.buf, q))
                        if seen != call:
                            problems.append(f"seed {seed}: rank {r} call {call} read {st.buf} from rank {q} of "
                                            f"call {seen}")
                        elif now != seen:
                            problems.append(f"seed {seed}: rank {r} call {call}: rank {q} overwrote {st.buf} "
                                            f"while it was read (write-after-read)")
        except MoeCheckError as e:
            problems.append(f"seed {seed}: {e}")
        if problems:
            break
    return problems


@lru_cache(maxsize=None)
def moe_problems(world: int, experts: int, topk: int, mode: str = "normal") -> tuple[str, ...]:
    """The checks above of the layout arithmetic the MoE kernels implement (the deduplicated push
    into staging rows and its expansion; low_latency: the fixed segments it expands into; random /
    dropped / one-expert / sparse routings, 0..max tokens) and of their flag protocol across calls:
    () or the problems. Token counts are small: the arithmetic does not depend on them."""
    shape = MoeShape(world, experts, topk, max_tokens=12)
    layout = check_moe(shape, "normal", push="token")
    if mode == "low_latency":
        layout += check_moe(shape, "low_latency")
    return tuple(layout + check_moe_protocol(world, mode))
