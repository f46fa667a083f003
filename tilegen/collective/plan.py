"""Stage 2: planner.

Chooses, for every world size a spec lists and every range of message sizes, a schedule (from the
registry's generators), a CTA count and a tile size by a cost model of the topology, and prints the
result. Schedules are data: the checker simulates exactly these steps and the code generator emits
them as step tables that one generic kernel executes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from .ir import Schedule
from .layout import layout, tile_bytes_for, unit_length
from .ops import GEMM_OPS, OPS, algorithms_for, comm_op, compute_order, make_schedule, order_problems
from ..core.calibration import Calibration
from .schedules import LL_MAX_BYTES, is_ll
from .spec import CollectiveSpec


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
def critical_hops(s: Schedule) -> int:
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
    hops = critical_hops(s)
    if s.sync == "ll":  # no entry handshake, no separate signals; 16-byte lines carry 8 data bytes
        return topo.launch_us + topo.hop_us * hops + topo.step_us * steps + 2 * max(bw, cta_limit) \
            + reduce_bytes / topo.reduce_Bpus
    fill = max(0, hops - 1) * min(tile, part) / topo.link_Bpus  # pipeline fill, tile by tile
    return topo.launch_us + topo.hop_us * (hops + 1) + topo.step_us * steps + max(bw, cta_limit) + fill \
        + reduce_bytes / topo.reduce_Bpus


@dataclass(frozen=True)
class Candidate:
    algorithm: str
    predicted_us: float


@dataclass(frozen=True)
class Variant:
    """The schedule used for calls whose input is at most ``max_bytes`` (the last variant: up to the spec's max),
    lowered: the sizes the kernel and its buffers are made for at ``max_bytes`` (what the renderer emits)."""

    max_bytes: int
    schedule: Schedule
    ctas: int
    tile_bytes: int
    reason: str
    shard: int = 0  # bytes of a chunk at max_bytes (tilegen.collective.layout)
    part: int = 0  # bytes of a unit (a chunk's part) at max_bytes
    max_tiles: int = 1  # most tiles a unit is cut into, plus one (the kernel's per-unit counters)
    ll_slot_bytes: int = 0  # LL schedules: bytes of a scratch slot (one 16-byte line per 8 data bytes)
    orders: tuple[tuple[int, ...], ...] = ()  # GEMM ops: each rank's compute stream's chunk order
    spare_sms: int | None = None  # GEMM ops: SMs the kernel leaves its GEMMs (spare_sms)
    out_slots: int = 1  # slots of the output and of the input (chunks x parts) at this world size
    in_slots: int = 1


@dataclass(frozen=True)
class OpFacts:
    """What the kernel is generated for, of the op's descriptor (collective/ops.py)."""

    summary: str
    rooted: bool
    chunks: str  # one | per_rank | split (include/tilegen/collective/layout.cuh's Chunks)
    reduces: bool
    gemm: str | None  # the compute stream: consume (ag_gemm), produce (gemm_rs) or none
    alias: str  # what the input may be exactly: none | whole | own_chunk (of the output)
    in_world_rows: bool  # the input / output has world * m rows
    out_world_rows: bool

    @staticmethod
    def of(op: str) -> "OpFacts":
        d, comm = OPS[op], comm_op(op)
        return OpFacts(d.summary, d.rooted, comm.chunks, comm.reduces, d.gemm, d.alias, d.in_rows(2) == 2,
                       d.out_rows(2) == 2)


def spec_schedule(spec: CollectiveSpec, algorithm: str, world: int) -> Schedule:
    """The schedule a spec runs by this name: its sync, its compute stream, its scaling."""
    return make_schedule(spec.op, algorithm, world, spec.sync, spec.fused, spec.premul)


def ll_slot_bytes(part: int) -> int:
    """An LL scratch slot of a part: one 16-byte line (8 data bytes, 2 flags) per 8 bytes."""
    return 2 * (-(-part // 8) * 8)


def lowered(spec: CollectiveSpec, world: int, max_bytes: int, s: Schedule, ctas: int, tile_bytes: int,
            reason: str) -> Variant:
    """A variant with its sizes computed: the one place the layout's rules meet the plan."""
    shard, part = layout(s.op, world, max_bytes, spec.elem_bytes, s.parts)
    ll = s.sync == "ll"  # its lines carry their flags: no tiles, no per-tile counters
    tiles = 1 if ll else max(-(-part // tile_bytes_for(part, tile_bytes, ctas)) + 1, ctas + 1)
    orders = tuple(compute_order(spec.op, s, r) for r in range(world)) if OPS[spec.op].gemm else ()
    desc = OPS[spec.op]
    return Variant(max_bytes, s, ctas, tile_bytes, reason, shard, part, tiles,
                   ll_slot_bytes(part) if ll else 0, orders, spare_sms(spec, ctas),
                   desc.out_chunks(world) * s.parts, desc.in_chunks(world) * s.parts)


@dataclass(frozen=True)
class Plan:
    spec: CollectiveSpec
    world: int
    variants: tuple[Variant, ...]
    table: tuple[tuple[int, tuple[Candidate, ...]], ...]  # sizes and every candidate's prediction
    op: OpFacts | None = None

    @property
    def schedule(self) -> Schedule:  # the schedule of the largest messages
        return self.variants[-1].schedule


# Smallest SM count of a data-center GPU of each architecture. A GEMM op's communication kernel runs
# beside GEMMs that need SMs; bounding its CTAs by this keeps room for them on every GPU of the arch
# (the runtime checks the real device again).
ARCH_MIN_SMS = {70: 80, 75: 40, 80: 56, 86: 28, 89: 24, 90: 78, 100: 148, 101: 148, 103: 148, 120: 24, 121: 24}
MAX_GEMM_COMM_CTAS = 64


def max_gemm_comm_ctas(arch_sm: int) -> int:
    """Most CTAs a GEMM op's communication kernel may take: at most half the smallest GPU's SMs."""
    return min(MAX_GEMM_COMM_CTAS, ARCH_MIN_SMS.get(arch_sm, 24) // 2)


def spare_sms(spec: CollectiveSpec, ctas: int) -> int | None:
    """GEMM ops: SMs left for the GEMMs on the smallest GPU of the arch when each communication CTA
    spins on an SM of its own (the checker needs one; 0 means the kernel can starve its GEMM).
    None for collectives, which nothing runs beside (the runtime keeps all their CTAs resident)."""
    if spec.op not in GEMM_OPS:
        return None
    return max(0, min(1, ARCH_MIN_SMS.get(spec.sm, 24) - ctas))


CTA_CHOICES = (16, 33, 66, 132, 264, 528)
GEMM_CTA_CHOICES = (8, 16, 33)


def message_sizes(max_bytes: int) -> list[int]:
    sizes, n = [], 4096
    while n < max_bytes:
        sizes.append(n)
        n *= 4
    return sizes + [max_bytes]


def choose(spec: CollectiveSpec, world: int, in_bytes: int, topo: Topology,
           algorithms: list[str]) -> tuple[Candidate, int, int, tuple[Candidate, ...]]:
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
        s = spec_schedule(spec, alg, world)
        if s.sync == "ll" and in_bytes > LL_MAX_BYTES:
            best_per_alg.append(Candidate(alg, float("inf")))
            continue
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


MAX_VARIANTS = 4  # schedules per world, by message size


def fixed_settings(spec: CollectiveSpec) -> tuple[int | None, int | None]:
    """The CTAs and tile bytes the spec fixes (None: auto), which measured choices must keep."""
    return None if spec.ctas == "auto" else spec.ctas, None if spec.tile_bytes == "auto" else spec.tile_bytes


def measured_choice(cal: Calibration, spec: CollectiveSpec, world: int, in_bytes: int,
                    algorithms: list[str]) -> tuple[Candidate, int, int, tuple[Candidate, ...]] | None:
    """Like choose(), from `tilegen tune` measurements (None where there are none for this size)."""
    picks = cal.best(spec.op, world, in_bytes, algorithms, *fixed_settings(spec))
    if not picks:
        return None
    best = min(picks.values(), key=lambda p: (p.us, p.algorithm))
    cands = tuple(Candidate(a, picks[a].us if a in picks else float("inf")) for a in algorithms)
    return Candidate(best.algorithm, best.us), best.ctas, best.tile_bytes, cands


def plan(spec: CollectiveSpec, world: int, calibration: dict | Calibration | None = None) -> Plan:
    """Plan every message size the spec allows: one variant per range of sizes with the same best
    schedule (at most MAX_VARIANTS), chosen by measurements where a calibration has them for this op
    and world (collectives), else by the cost model (whose constants a dict may replace), unless the
    spec fixes the schedule."""
    if world not in spec.world_sizes:
        raise ValueError(f"world size {world} is not in the spec's world_sizes {spec.world_sizes}")
    topo = TOPOLOGIES[spec.topology]
    measured = calibration if isinstance(calibration, Calibration) else None
    if measured is not None and (spec.op in GEMM_OPS or not measured.has(spec.op, world)):
        measured = None  # GEMM ops share the GPU with their GEMMs: collective timings do not transfer
    if isinstance(calibration, dict) and calibration:
        topo = replace(
            topo, **{k: v for k, v in calibration.items() if k in Topology.__dataclass_fields__ and k != "name"}
        )
    algs = algorithms_for(spec.op) if spec.schedule == "auto" else [spec.schedule]
    if spec.transport == "nvshmem":  # LL lines are stored through peer pointers only (the spec refuses a fixed one)
        algs = [a for a in algs if not is_ll(a)]
    if spec.deterministic and spec.order_matters:  # only schedules that add raw inputs in rank order
        algs = [a for a in algs if not order_problems(spec.op, spec_schedule(spec, a, world))]
    for a in algs:
        spec_schedule(spec, a, world)  # raises for a schedule the op lacks
    max_in = spec.max_in_bytes(world)
    table = []
    picks = []
    for n in message_sizes(max_in):
        algs_n = [a for a in algs if not (is_ll(a) and n > LL_MAX_BYTES)] or algs
        got = measured_choice(measured, spec, world, n, algs_n) if measured else None
        best, ctas, tile, cands = got or choose(spec, world, n, topo, algs)
        if got and len(algs_n) < len(algs):  # the table lists every schedule
            cands = tuple(next((c for c in cands if c.algorithm == a), Candidate(a, float("inf"))) for a in algs)
        table.append((n, cands))
        picks.append((n, best.algorithm, ctas, tile))
    segs = measured.segments(spec.op, world, algs, max_in, MAX_VARIANTS, *fixed_settings(spec)) if measured else []
    variants = []
    lo = 0
    if segs:  # measured: ranges of sizes, one configuration each, closest to the fastest at every size
        where = measured.devices[(spec.op, world)]
        for i, (n, pick, worst) in enumerate(segs):
            n = max_in if i == len(segs) - 1 else n
            why = (f"{pick.algorithm} fixed by the spec" if spec.schedule != "auto" else
                   f"{pick.algorithm}: measured on {where}, within {100 * (worst - 1):.0f}% of the fastest "
                   f"configuration at every size in ({fmt_bytes(lo)}, {fmt_bytes(n)}]")
            tile = pick.tile_bytes or (64 << 10)  # LL ignores tiles; a valid one for the kernel's arithmetic
            s = spec_schedule(spec, pick.algorithm, world)
            variants.append(lowered(spec, world, n, s, pick.ctas, tile, why))
            lo = n
        return Plan(spec, world, tuple(variants), tuple(table), OpFacts.of(spec.op))
    # merge runs of the same algorithm into variants; keep the settings chosen at each run's top size
    runs: list[list] = []
    for n, alg, ctas, tile in picks:
        if runs and runs[-1][1] == alg:
            runs[-1] = [n, alg, ctas, tile, runs[-1][4] + 1]
        else:
            runs.append([n, alg, ctas, tile, 1])
    while len(runs) > MAX_VARIANTS:  # fold the run of fewest sizes (not the last) into the one above it
        i = min(range(len(runs) - 1), key=lambda k: (runs[k][4], k))
        runs[i + 1][4] += runs[i][4]
        runs.pop(i)
    runs[-1][0] = max_in
    for n, alg, ctas, tile, _count in runs:
        why = (
            f"{alg} fixed by the spec"
            if spec.schedule != "auto"
            else f"{alg}: lowest predicted time for inputs in ({fmt_bytes(lo)}, {fmt_bytes(n)}] on {spec.topology}"
        )
        variants.append(lowered(spec, world, n, spec_schedule(spec, alg, world), ctas, tile,
                                why))
        lo = n
    return Plan(spec, world, tuple(variants), tuple(table), OpFacts.of(spec.op))


def fmt_bytes(n: int) -> str:
    """Bytes for people, four significant digits: 1536 -> '1.5 KiB', 268435456 -> '256 MiB', 4192256 ->
    '3.998 MiB' (not '4.0': a size just below a power of two reads as one)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def _compute_stream_line(spec: CollectiveSpec, sched: Schedule, r: int) -> str | None:
    """GEMM ops: what rank r's compute stream (or fused GEMM) does, in its chunk order."""
    role = OPS[spec.op].gemm
    if role is None:
        return None
    order = compute_order(spec.op, sched, r)
    if spec.overlap_style == "copy_engine":
        if role == "produce":
            return (f"    copy engine: compute stream P[d] = A[d] @ B for peers d = r+1, r+2, ... (split by rows, each "
                    f"flagged at d); rank {r} pulls its rows of P from every peer into C, then C += A[{r}] @ B")
        return (f"    copy engine: rank {r} pushes A into every peer's A_full (cudaMemcpyAsync, a flag per split); "
                f"compute stream C[{r}] = A @ B, then C[q] = A_full[q] @ B for q = r-1, r-2, ... as they arrive")
    if spec.fused:
        what = (
            "the tile completing a part of a chunk sets flag[in][part]"
            if role == "produce"
            else "each waits flag[out][chunk part][t] of its rows, then loads A_full"
        )
        return f"    fused GEMM (one CUTLASS kernel): row blocks of chunks {', '.join(map(str, order))}; {what}"
    if role == "produce":
        return "    compute stream: " + "; ".join(f"P[{c}] = A[{c}] @ B, signal flag[in][{c}]" for c in order)
    return "    compute stream: " + "; ".join(
        f"{'' if c == r else f'wait chunk {c} flags, '}C[{c}] = {'A' if c == r else f'A_full[{c}]'} @ B" for c in order
    )


def format_plan(p: Plan) -> str:
    s = p.spec
    lines = [
        f"op {s.name}: {s.op} {s.dtype}{' ' + s.reduce if OPS[s.op].reduces else ''}, world {p.world}, "
        f"input up to {fmt_bytes(s.max_in_bytes(p.world))} per rank, sync {s.sync}, transport {s.transport}"
        + (", deterministic (sums in rank order, rounded once)" if s.deterministic else "")
        + (f", then {s.epilogue.stages} per row (after a grid barrier)" if s.epilogue else "")
    ]
    how = ("measured (tilegen tune)" if any("measured on" in v.reason for v in p.variants)
           else "predicted (cost model)")
    lines.append(f"{how} time of one call (us) per schedule, each at its best CTA count and tile (* the choice):")
    algs = [c.algorithm for c in p.table[0][1]]
    lines.append("  " + f"{'bytes':>12}" + "".join(f"{a:>12}" for a in algs))
    for n, cands in p.table:
        best = min(cands, key=lambda c: (c.predicted_us, c.algorithm))
        lines.append("  " + f"{fmt_bytes(n):>12}" + "".join(f"{c.predicted_us:>11.1f}{'*' if c is best else ' '}"
                                                           for c in cands))
    for i, v in enumerate(p.variants):
        lines.append(
            f"variant {i}: inputs <= {fmt_bytes(v.max_bytes)}: {v.schedule.algorithm}, {v.ctas} CTAs x {s.threads} "
            f"threads, tiles <= {fmt_bytes(v.tile_bytes)} ({v.reason})"
        )
        for r, steps in enumerate(v.schedule.ranks):
            lines.append(f"  rank {r}{' (root-relative)' if OPS[s.op].rooted else ''}:")
            for k, st in enumerate(steps):
                lines.append(f"    {k:2d}  {st.describe(r, v.schedule.sync)}")
            line = _compute_stream_line(s, v.schedule, r)
            if line:
                lines.append(line)
    return "\n".join(lines)
