"""The op registry: one descriptor per op kind, read by every stage (spec validation, planning, the
checker, code generation, the runtime and the benchmarks). Adding a collective kind means adding a
descriptor here and its schedule functions (tilegen.collective.schedules); nothing else names op kinds.

Pure Python, no third-party imports: deployed apps load it through the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Literal, Optional

from . import schedules as S
from .ir import Schedule

Sources = Optional[list]  # [(source rank, input slot), ...] summed when several; None: the slot is not written
ScheduleFn = Callable[[int, str], Schedule]


@dataclass(frozen=True)
class OpDesc:
    """What an op kind computes and how its tensors are laid out.

    Rows: an op's tensors are [rows, *inner] with rows = m times a factor of the world size
    (``in_rows``/``out_rows``); the schedules cut the input into chunks: ``world_chunks`` ops cut one
    tensor into world chunks of ceil(bytes / world) (16-byte aligned, the last ones short or
    empty); otherwise a chunk is m rows (so the input has in_rows(world) chunks)."""

    kind: str
    summary: str
    in_rows: Callable[[int], int]
    out_rows: Callable[[int], int]
    expected: Callable[[int, int, int, int], Sources]  # (world, parts, rank, output slot) -> sources
    schedules: dict[str, ScheduleFn] = field(default_factory=dict)
    world_chunks: bool = False
    reduces: bool = False
    rooted: bool = False  # takes a root rank; schedules are written for root 0, ranks relative to it
    root_only_input: bool = False  # only the root's input is read (other ranks may pass None)
    alias: Literal["none", "whole", "own_chunk"] = "none"  # the input may be exactly this part of the output
    own_chunk_out: bool = False  # the output is this rank's chunk only (output slot k is unit rank * parts + k)
    busbw: Callable[[int], float] = lambda w: 1.0  # nccl-tests' bus bandwidth factor
    bench_counts: Literal["in", "out"] = "in"  # which tensor nccl-tests' message size counts
    nccl: Optional[Callable] = None  # (torch.distributed, x, out, root, reduce op): the same op through NCCL
    nccl_in_place: bool = False  # nccl reads and writes `out` (the caller copies x into it first)
    comm: Optional[str] = None  # GEMM ops: the collective that moves their data
    gemm: Literal[None, "consume", "produce"] = (
        None  # GEMM ops: the compute stream reads gathered chunks / makes the input
    )

    @property
    def chunks(self) -> str:
        """How the input is cut into chunks: 'one' chunk, one 'per_rank' of m rows, or a 'split' tensor
        (include/tilegen/layout.cuh's Chunks)."""
        return "split" if self.world_chunks else ("per_rank" if self.in_rows(2) == 2 else "one")

    def in_chunks(self, world: int) -> int:
        return world if self.world_chunks else self.in_rows(world)

    def out_chunks(self, world: int) -> int:
        return world if self.world_chunks else self.out_rows(world)

    def out_unit(self, rank: int, slot: int, parts: int) -> int:
        """The unit (whose length applies) of output slot ``slot`` on ``rank``."""
        return rank * parts + slot if self.own_chunk_out else slot


def _ag(w, P, r, slot):
    return [divmod(slot, P)]


def _rs(w, P, r, slot):
    return [(s, r * P + slot % P) for s in range(w)]


def _ar(w, P, r, slot):
    return [(s, slot) for s in range(w)]


def _a2a(w, P, r, slot):
    c, h = divmod(slot, P)
    return [(c, r * P + h)]


def _bc(w, P, r, slot):
    return [(0, slot)]


def _reduce(w, P, r, slot):
    return [(s, slot) for s in range(w)] if r == 0 else None


def _nccl_reduce(dist, x, out, root, red):
    dist.reduce(out, dst=root, op=red)


_COLLECTIVES = [
    OpDesc(
        "allgather",
        "every rank's [m, ...] shard, concatenated in rank order on every rank",
        lambda w: 1,
        lambda w: w,
        _ag,
        {"direct": S.ag_direct, "ring": S.ag_ring, "bidir_ring": S.ag_bidir, "ll_direct": S.ag_ll},
        alias="own_chunk",
        busbw=lambda w: (w - 1) / w,
        bench_counts="out",
        nccl=lambda dist, x, out, root, red: dist.all_gather_into_tensor(out, x),
    ),
    OpDesc(
        "reduce_scatter",
        "block r of every rank's [world * m, ...] input, reduced, on rank r",
        lambda w: w,
        lambda w: 1,
        _rs,
        {"direct": S.rs_direct, "ring": S.rs_ring, "bidir_ring": S.rs_bidir, "ll_direct": S.rs_ll},
        reduces=True,
        own_chunk_out=True,
        busbw=lambda w: (w - 1) / w,
        nccl=lambda dist, x, out, root, red: dist.reduce_scatter_tensor(out, x, op=red),
    ),
    OpDesc(
        "allreduce",
        "every rank's [m, ...] tensor, reduced, on every rank",
        lambda w: 1,
        lambda w: 1,
        _ar,
        {"one_shot": S.ar_one_shot, "two_shot": S.ar_two_shot, "ring": S.ar_ring, "bidir_ring": S.ar_bidir,
         "ll_one_shot": S.ar_ll_one_shot, "ll_two_shot": S.ar_ll_two_shot},
        world_chunks=True,
        reduces=True,
        busbw=lambda w: 2 * (w - 1) / w,
        nccl=lambda dist, x, out, root, red: dist.all_reduce(out, op=red),
        nccl_in_place=True,
    ),
    OpDesc(
        "all_to_all",
        "block r of every rank's [world * m, ...] input, concatenated in rank order, on rank r",
        lambda w: w,
        lambda w: w,
        _a2a,
        {"direct": S.a2a_direct, "ll_direct": S.a2a_ll},
        busbw=lambda w: (w - 1) / w,
        nccl=lambda dist, x, out, root, red: dist.all_to_all_single(out, x),
    ),
    OpDesc(
        "broadcast",
        "the root's [m, ...] tensor on every rank (root: a call argument)",
        lambda w: 1,
        lambda w: 1,
        _bc,
        {"direct": S.bc_direct, "chain": S.bc_chain},
        rooted=True,
        root_only_input=True,
        alias="whole",
        nccl=lambda dist, x, out, root, red: dist.broadcast(out, src=root),
        nccl_in_place=True,
    ),
    OpDesc(
        "reduce",
        "every rank's [m, ...] tensor, reduced, on the root only (root: a call argument)",
        lambda w: 1,
        lambda w: 1,
        _reduce,
        {"direct": S.reduce_direct},
        reduces=True,
        rooted=True,
        nccl=_nccl_reduce,
        nccl_in_place=True,
    ),
]
_GEMMS = [
    OpDesc(
        "ag_gemm",
        "C = allgather(A) @ B: A [m, k] per rank, C [world * m, n]",
        lambda w: 1,
        lambda w: w,
        _ag,
        comm="allgather",
        gemm="consume",
    ),
    OpDesc(
        "gemm_rs",
        "C = reduce_scatter(A @ B): A [world * m, k] per rank (k sharded), C [m, n]",
        lambda w: w,
        lambda w: 1,
        _rs,
        reduces=True,
        own_chunk_out=True,
        comm="reduce_scatter",
        gemm="produce",
    ),
]
OPS: dict[str, OpDesc] = {d.kind: d for d in _COLLECTIVES + _GEMMS}
COLLECTIVE_OPS = tuple(d.kind for d in _COLLECTIVES)
GEMM_OPS = tuple(d.kind for d in _GEMMS)  # the overlap family's ops: they move data by these schedules


def comm_op(op: str) -> OpDesc:
    """The descriptor of the collective that moves an op's data (itself for collectives)."""
    return OPS[OPS[op].comm or op]


def comm_kind(op: str) -> str:
    return comm_op(op).kind


def algorithms_for(op: str) -> list[str]:
    """The schedules an op can use. GEMM ops leave out the LL ones: their compute stream waits on
    the per-tile flags that LL schedules do without."""
    return [a for a in comm_op(op).schedules if not (OPS[op].gemm and S.is_ll(a))]


def all_schedule_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for d in OPS.values() for name in d.schedules))


def expected_output(op: str, world: int, parts: int, rank: int, slot: int) -> Sources:
    """The (source rank, input slot) pairs whose data output slot ``slot`` of ``rank`` must hold
    (summed when there are several), or None where the op writes nothing. Ranks are absolute;
    rooted ops' root is rank 0."""
    return OPS[op].expected(world, parts, rank, slot)


@lru_cache(maxsize=None)
def make_schedule(op: str, algorithm: str, world: int, sync: str, fused: bool = False,
                  premul: bool = False) -> Schedule:
    """An op's schedule by name (schedules are pure functions of these: each is built once). GEMM
    ops get their collective's schedule with the compute stream's signals added; premul: the
    contributions are scaled by the call's scale (reduce: avg / premul_sum). Reductions of raw inputs
    add them in ascending rank order (schedules.in_canonical_order)."""
    desc, comm = OPS[op], comm_op(op)
    if algorithm not in algorithms_for(op):
        raise ValueError(f"op {op} has no schedule {algorithm!r}; it has {', '.join(algorithms_for(op))}")
    s = comm.schedules[algorithm](world, sync)
    if comm.reduces:
        s = S.in_canonical_order(s)
    if premul:
        s = S.with_premul(s)
    if desc.gemm == "produce":
        return S.with_input_waits(s)
    return S.with_local_signals(s) if desc.gemm == "consume" and fused else s


def order_problems(op: str, s: Schedule) -> list[str]:
    """Why some output of ``s`` is not reduced in the canonical order ([]: every one is)."""
    return S.order_problems(s, lambda r, k: expected_output(op, s.world, s.parts, r, k))


def compute_order(op: str, s: Schedule, rank: int) -> tuple[int, ...]:
    """GEMM ops: the chunks in the order the compute stream visits them."""
    return S.arrival_order(s, rank) if OPS[op].gemm == "consume" else S.production_order(s, rank)
