"""Stage 2: planner.

Turns a spec into a per-rank schedule of steps, chosen among candidate algorithms by a cost model
of the topology. A schedule is data: the checker simulates exactly these steps, and the code
generator emits them as a step table that the generic kernel executes.

Buffers and signals (per op instance, on every rank):
  input            the rank's own shard (local, any device memory)
  output           world * shard, symmetric; chunk c holds rank c's shard
  entry[r]         symmetric u64; rank r stores the call's epoch here when it enters the call
  flag[c][t]       symmetric u64; the writer of chunk c, tile t into this rank stores the epoch
Every call has an epoch (1, 2, ...); waits are ``>= epoch`` so signals never need resetting.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .spec import KernelSpec

StepKind = Literal["entry", "copy", "wait"]
MIN_TILE_BYTES = 16 * 1024  # below this a CTA's fixed cost dominates; small shards use fewer CTAs


@dataclass(frozen=True)
class Step:
    """One step of one rank's program. Tiles of a step are spread over CTAs: tile t -> CTA t % ctas.

    entry: CTA 0 stores entry[me]=epoch at each rank in ``notify``; every CTA then waits
           entry[p] >= epoch for each p in ``await_ranks`` (the ranks it will write into).
    copy:  for each tile of ``chunk``: if ``wait_src``, wait flag[chunk][t] first (data forwarded
           to us); read it from ``src`` (input, or our output's chunk); store it to chunk of the
           output of every rank in ``dests``; signal each remote dest (per tile, or once per chunk
           by the last CTA to finish the step in barrier mode).
    wait:  wait until flag[chunk][t] >= epoch for every tile (barrier mode: flag[chunk][0]).
    """

    kind: StepKind
    chunk: int = -1
    src: Literal["input", "output", ""] = ""
    dests: tuple[int, ...] = ()
    wait_src: bool = False
    notify: tuple[int, ...] = ()
    await_ranks: tuple[int, ...] = ()

    def describe(self, rank: int, sync: str) -> str:
        per = "per tile t" if sync == "per_tile" else "once per chunk (last CTA), t=0"
        if self.kind == "entry":
            return (f"entry   store entry[{rank}]=epoch -> ranks {list(self.notify)}; "
                    f"wait entry[p] >= epoch for p in {list(self.await_ranks)}")
        if self.kind == "copy":
            src = f"input[tile t]" if self.src == "input" else f"output[chunk {self.chunk}][tile t]"
            pre = f"wait flag[{self.chunk}][t] >= epoch; " if self.wait_src else ""
            dst = ", ".join(f"out@{d}[chunk {self.chunk}]" for d in self.dests)
            remote = [d for d in self.dests if d != rank]
            sig = f"; signal flag[{self.chunk}][t]=epoch @{remote} {per}" if remote else ""
            return f"put     {pre}{src} -> {dst}{sig}"
        return f"wait    flag[{self.chunk}][t] >= epoch ({per})"


@dataclass(frozen=True)
class Schedule:
    algorithm: str
    world: int
    sync: str
    ranks: tuple[tuple[Step, ...], ...]

    @property
    def max_steps(self) -> int:
        return max(len(r) for r in self.ranks)


@dataclass(frozen=True)
class Topology:
    """Cost-model constants for one link layout (microseconds, bytes per microsecond)."""

    name: str
    launch_us: float = 4.0  # kernel launch + first CTA scheduled
    hop_us: float = 1.5  # one signal's flight over a link (store, fence, remote poll)
    egress_Bpus: float = 365e3  # a GPU's peak outgoing peer-store bandwidth (365 GB/s, FACTS.md)
    link_Bpus: float = 365e3  # one directed link's bandwidth (ring_links)

    def link_load(self, world: int, flows: list[tuple[int, int, int]]) -> float:
        """Largest bytes over any one resource, for flows (src, dst, bytes)."""
        if self.name == "nvswitch":  # full crossbar: each GPU's egress and ingress is the limit
            out = [0] * world
            inn = [0] * world
            for s, d, b in flows:
                out[s] += b
                inn[d] += b
            return max(max(out), max(inn)) / self.egress_Bpus
        load: dict[tuple[int, int], int] = {}
        for s, d, b in flows:  # bidirectional ring of links: route the shorter way round
            fwd = (d - s) % world
            step = 1 if fwd <= world - fwd else -1
            cur = s
            while cur != d:
                nxt = (cur + step) % world
                load[(cur, nxt)] = load.get((cur, nxt), 0) + b
                cur = nxt
        return max(load.values()) / self.link_Bpus


TOPOLOGIES = {"nvswitch": Topology("nvswitch"), "ring_links": Topology("ring_links")}


def direct_schedule(world: int, sync: str) -> Schedule:
    """One-shot: every rank stores its shard straight into every rank's output (one load, W stores)."""
    ranks = []
    for r in range(world):
        peers = tuple(p for p in range(world) if p != r)
        steps = [Step("entry", notify=peers, await_ranks=peers),
                 Step("copy", chunk=r, src="input", dests=(r,) + peers)]
        steps += [Step("wait", chunk=p) for p in peers]
        ranks.append(tuple(steps))
    return Schedule("direct", world, sync, tuple(ranks))


def ring_schedule(world: int, sync: str) -> Schedule:
    """Ring: rank r sends its shard to r+1, then forwards what it receives from r-1, tile by tile."""
    ranks = []
    for r in range(world):
        nxt, prv = (r + 1) % world, (r - 1) % world
        steps = [Step("entry", notify=(prv,), await_ranks=(nxt,)),
                 Step("copy", chunk=r, src="input", dests=(r, nxt))]
        for s in range(1, world - 1):
            steps.append(Step("copy", chunk=(r - s) % world, src="output", dests=(nxt,), wait_src=True))
        steps.append(Step("wait", chunk=(r + 1) % world))
        ranks.append(tuple(steps))
    return Schedule("ring", world, sync, tuple(ranks))


ALGORITHMS = {"direct": direct_schedule, "ring": ring_schedule}


def tile_bytes_for(shard_bytes: int, tile_bytes: int, ctas: int) -> int:
    """Runtime tile size: spread small shards over the CTAs, never above the spec's tile_bytes.

    The generated kernel computes the same (templates/allgather.cu.j2: tile_size_for)."""
    per_cta = -(-shard_bytes // ctas)
    per_cta = -(-per_cta // 16) * 16
    return max(min(tile_bytes, per_cta), min(MIN_TILE_BYTES, tile_bytes))


def tile_ranges(shard_bytes: int, tile: int) -> list[tuple[int, int]]:
    """Byte ranges [lo, hi) of the tiles of one chunk."""
    return [(lo, min(lo + tile, shard_bytes)) for lo in range(0, shard_bytes, tile)]


def max_tiles(spec: KernelSpec) -> int:
    """Signal slots per chunk: enough for any shard up to the spec's max."""
    tile = tile_bytes_for(spec.max_shard_bytes, spec.tile_bytes, spec.ctas)
    return max(len(tile_ranges(spec.max_shard_bytes, tile)), spec.ctas, 1)


@dataclass(frozen=True)
class Candidate:
    algorithm: str
    predicted_us: float
    note: str


@dataclass(frozen=True)
class Plan:
    spec: KernelSpec
    world: int
    schedule: Schedule
    candidates: tuple[Candidate, ...]
    reason: str
    ctas: int
    tile_bytes: int
    max_tiles: int


def predict_us(sched: Schedule, shard_bytes: int, topo: Topology, tile: int) -> tuple[float, str]:
    """Latency + bandwidth estimate of one call."""
    w = sched.world
    if sched.algorithm == "direct":
        flows = [(s, d, shard_bytes) for s in range(w) for d in range(w) if s != d]
        bw = topo.link_load(w, flows)
        lat = topo.launch_us + 2 * topo.hop_us  # entry handshake + last signal
        return lat + bw, f"1 dependent hop, busiest link carries {bw:.1f} us of data"
    if sched.algorithm == "ring":
        flows = [(s, (s + 1) % w, (w - 1) * shard_bytes) for s in range(w)]
        bw = topo.link_load(w, flows)
        fill = (w - 2) * min(tile, shard_bytes) / topo.link_Bpus  # pipeline fill, tile by tile
        lat = topo.launch_us + topo.hop_us * w
        return lat + bw + fill, f"{w - 1} dependent hops, busiest link carries {bw:.1f} us of data"
    raise ValueError(sched.algorithm)


def plan(spec: KernelSpec, world: int, shard_bytes: int | None = None) -> Plan:
    if world not in spec.world_sizes:
        raise ValueError(f"world size {world} is not in the spec's world_sizes {spec.world_sizes}")
    topo = TOPOLOGIES[spec.topology]
    size = spec.max_shard_bytes if shard_bytes is None else shard_bytes
    tile = tile_bytes_for(size, spec.tile_bytes, spec.ctas)
    cands = []
    for name, make in ALGORITHMS.items():
        t, note = predict_us(make(world, spec.sync), size, topo, tile)
        cands.append(Candidate(name, t, note))
    if spec.schedule == "auto":
        best = min(cands, key=lambda c: (c.predicted_us, c.algorithm))
        reason = (f"schedule: auto -> {best.algorithm}, lowest predicted time at {size} B per rank "
                  f"on {spec.topology}")
    else:
        best = next(c for c in cands if c.algorithm == spec.schedule)
        reason = f"schedule: {spec.schedule} (fixed by the spec)"
    sched = ALGORITHMS[best.algorithm](world, spec.sync)
    return Plan(spec, world, sched, tuple(cands), reason, spec.ctas, spec.tile_bytes, max_tiles(spec))


def format_plan(p: Plan) -> str:
    lines = [f"op {p.spec.name}: {p.spec.op} {p.spec.dtype}, world {p.world}, max shard "
             f"{p.spec.max_shard_bytes} B, sync {p.spec.sync}, transport {p.spec.transport}, "
             f"{p.ctas} CTAs x {p.spec.threads} threads, tiles <= {p.tile_bytes} B"]
    lines.append("candidates (predicted time of one call at the max shape):")
    for c in p.candidates:
        mark = "*" if c.algorithm == p.schedule.algorithm else " "
        lines.append(f"  {mark} {c.algorithm:<7} {c.predicted_us:10.1f} us   {c.note}")
    lines.append(p.reason)
    for r, steps in enumerate(p.schedule.ranks):
        lines.append(f"rank {r}:")
        for i, s in enumerate(steps):
            lines.append(f"  {i:2d}  {s.describe(r, p.spec.sync)}")
    return "\n".join(lines)
