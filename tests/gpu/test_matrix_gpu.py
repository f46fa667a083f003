"""Every generated op, at shapes drawn at random from its spec's admissible range (seeded; the seed
and the shape are in every failure message), eager and replayed in a CUDA graph.

Rows are drawn per (op, world size): 1, the spec's maximum, and random counts (odd, so rarely a
multiple of any tile), every rank drawing the same. References are computed locally in float64
(reductions, held to the ulp rules of _refs.py) or exactly (data movement); GEMM ops against the
fp32 product of their bf16/f16 inputs.
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch
import torch.distributed as dist

import generated
from tilegen.collective.ops import OPS

from ._refs import (TORCH_DTYPES, all_inputs, assert_reduction, gemm_operands, gemm_reference, nccl, rel_err)

GEMM_KINDS = ("ag_gemm", "gemm_rs")
# GEMM cases multiply [world * m, k] by [k, n]: keep the largest draws to a few GFLOP-seconds
GEMM_MAX_ROWS = 4096
MAX_CASE_BYTES = 256 << 20  # per-rank input of one case: every rank's input is made on every rank


def _op(name):
    return getattr(generated, name)


def _seed(name: str, world: int, salt: str = "") -> int:
    return zlib.crc32(f"{name}/{world}/{salt}".encode())


def _row_bytes(op) -> int:
    """Bytes of one row of the op's (per-rank) input."""
    n = 1
    for d in op.inner_shape:
        n *= d if isinstance(d, int) else d["full"]
    return n * torch.tensor([], dtype=TORCH_DTYPES[op.dtype]).element_size()


def draw_rows(op, world: int, count: int = 5) -> list[int]:
    """1, the largest admissible (within the memory cap), and random odd counts in between."""
    rng = random.Random(_seed(op.name, world))
    hi = op.max_rows()
    if op.kind in GEMM_KINDS:
        hi = min(hi, GEMM_MAX_ROWS)
    per_m = _row_bytes(op) * (world if op.kind in ("reduce_scatter", "all_to_all") else 1)
    hi = max(1, min(hi, MAX_CASE_BYTES // max(per_m, 1)))
    rows = {1, hi}
    while len(rows) < min(count, hi):
        r = int(round(2 ** rng.uniform(0, max(1.0, hi.bit_length() - 1))))
        rows.add(min(hi, max(1, r | 1)))
    return sorted(rows)


def _case_id(name, rows, seed):
    return f"{name} rows={rows} seed={seed} world={dist.get_world_size()}"


# ------------------------------------------------------------------------------ collectives
def call_scale(op, seed: int) -> dict:
    """A premul_sum op's call-time scale (the same on every rank: it comes from the seed), else none."""
    return {"scale": 0.25 + (seed % 7) / 4} if op.manifest["spec"]["reduce"] == "premul_sum" else {}


def run_collective(op, rows: int, seed: int, root: int = 0):
    """(output, expected, inputs) of one eager call; expected None for reductions (checked separately)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = TORCH_DTYPES[op.dtype]
    k_in = world if op.kind in ("reduce_scatter", "all_to_all") else 1
    xs = all_inputs((k_in * rows,) + op.inner_shape, dtype, seed)
    out = op.empty_output(rows)
    out.fill_(0 if not dtype.is_floating_point else float("nan"))  # poison: every element must be written
    if OPS[op.kind].rooted:  # broadcast's other ranks pass no input; reduce's pass theirs
        op(xs[rank] if rank == root or not OPS[op.kind].root_only_input else None, out, root=root,
           **call_scale(op, seed))
    else:
        op(xs[rank], out, **call_scale(op, seed))
    return out, xs


def scaled(op, xs, seed: int):
    """(reduction, inputs) the op's output is the reduction of: avg and premul_sum sum every rank's
    input times 1 / world or the call's scale (in float64)."""
    how = op.manifest["spec"]["reduce"]
    factor = {"avg": 1 / dist.get_world_size(), "premul_sum": call_scale(op, seed).get("scale")}.get(how)
    return ("sum", [x.double() * factor for x in xs]) if factor is not None else (how, xs)


def check_collective(op, out, xs, rows: int, what: str, root: int = 0, seed: int = 0) -> None:
    rank = dist.get_rank()
    how, xs = scaled(op, xs, seed)
    plain = op.manifest["spec"]["reduce"] == "sum"  # what NCCL's default reduction computes
    mine = slice(rank * rows, (rank + 1) * rows)
    if op.kind == "allgather":
        want = torch.cat(xs)
    elif op.kind == "all_to_all":
        want = torch.cat([x[mine] for x in xs])
    elif op.kind == "broadcast":
        want = xs[root]
    elif op.kind == "allreduce":
        ref_nccl = None
        if nccl() and plain:
            ref_nccl = xs[rank].clone()
            dist.all_reduce(ref_nccl)
        assert_reduction(out, xs, how, ref_nccl, what)
        return
    elif op.kind == "reduce":
        ref_nccl = None
        if nccl() and plain:
            ref_nccl = xs[rank].clone()
            dist.reduce(ref_nccl, dst=root)
        if rank == root:
            assert_reduction(out, xs, how, ref_nccl, what)
        else:  # other ranks' outputs are left alone: still the poison
            untouched = out.isnan().all() if out.dtype.is_floating_point else (out == 0).all()
            assert untouched, f"{what}: non-root output written"
        return
    elif op.kind == "reduce_scatter":
        ref_nccl = None
        if nccl() and plain:
            ref_nccl = torch.empty_like(out)
            dist.reduce_scatter_tensor(ref_nccl, xs[rank])
        assert_reduction(out, [x[mine] for x in xs], how, ref_nccl, what)
        return
    else:
        raise AssertionError(f"unknown op kind {op.kind}")
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[out.element_size()]
    assert torch.equal(out.view(bits), want.view(bits)), f"{what}: output differs from the expected data"


COLLECTIVES = [n for n in generated.OPS if _op(n).kind in OPS and _op(n).kind not in GEMM_KINDS]  # MoE: test_moe_gpu
GEMMS = [n for n in generated.OPS if _op(n).kind in GEMM_KINDS]


@pytest.mark.parametrize("name", COLLECTIVES)
def test_collective_random_shapes(dist_env, name):
    rank, world = dist_env
    op = _op(name)
    for i, rows in enumerate(draw_rows(op, world)):
        seed = _seed(name, world, str(rows))
        root = seed % world if OPS[op.kind].rooted else 0
        out, xs = run_collective(op, rows, seed, root)
        check_collective(op, out, xs, rows, _case_id(name, rows, seed), root, seed)
    dist.barrier()


# ------------------------------------------------------------------------------ GEMM ops
def run_gemm(op, m: int, seed: int):
    rank = dist.get_rank()
    a, bs = gemm_operands(op, m, seed)
    c = op(a[rank], bs[rank])
    return c, a, bs


@pytest.mark.parametrize("name", GEMMS)
def test_gemm_random_shapes(dist_env, name):
    rank, world = dist_env
    op = _op(name)
    for m in draw_rows(op, world, count=4):
        seed = _seed(name, world, str(m))
        c, a, bs = run_gemm(op, m, seed)
        ref = gemm_reference(op, a, bs, m)
        torch.cuda.synchronize()
        err = rel_err(c, ref)
        assert err < 1e-2, f"{_case_id(name, m, seed)}: relative error {err:.3g}"
    dist.barrier()


# ------------------------------------------------------------------------------ CUDA graphs
REPLAYS = 4


def _graph_rows(op, world: int) -> int:
    rows = draw_rows(op, world)
    return rows[len(rows) // 2]  # a middle draw: not the trivial 1, not the slowest maximum


@pytest.mark.parametrize("name", COLLECTIVES + GEMMS)
def test_cuda_graph_replay(dist_env, name):
    """Capture one call, replay it with new data copied into the captured inputs: every replay must
    give the reference (the epochs the kernels wait for advance on the device, not in the capture)."""
    rank, world = dist_env
    op = _op(name)
    rows = _graph_rows(op, world)
    gemm = op.kind in GEMM_KINDS
    seed0 = _seed(name, world, "graph")
    if gemm:
        c, a, bs = run_gemm(op, rows, seed0)  # warm-up: loads the op, allocates its symmetric buffers
        x, b = a[rank].clone(), bs[rank].clone()
    else:
        out, xs = run_collective(op, rows, seed0)
        x = xs[rank].clone()
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            y = op(x, b) if gemm else op(x, **call_scale(op, seed0))  # (the scale is captured)
    torch.cuda.current_stream().wait_stream(side)
    for i in range(REPLAYS):
        seed = seed0 + 17 * (i + 1)
        what = f"{_case_id(name, rows, seed)} replay {i}"
        if gemm:
            a, bs = gemm_operands(op, rows, seed)
            x.copy_(a[rank])
            b.copy_(bs[rank])
            graph.replay()
            ref = gemm_reference(op, a, bs, rows)
            torch.cuda.synchronize()
            err = rel_err(y, ref)
            assert err < 1e-2, f"{what}: relative error {err:.3g}"
        else:
            dtype = TORCH_DTYPES[op.dtype]
            k_in = world if op.kind in ("reduce_scatter", "all_to_all") else 1
            xs = all_inputs((k_in * rows,) + op.inner_shape, dtype, seed)
            x.copy_(xs[rank])
            y.fill_(0 if not dtype.is_floating_point else float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            check_collective(op, y, xs, rows, what, seed=seed0)
        dist.barrier()
    del graph
    torch.cuda.synchronize()
    dist.barrier()


def test_capture_refuses_what_it_cannot_replay(dist_env):
    """Bounded waits and first-time symmetric allocations cannot be captured: clear errors instead."""
    rank, world = dist_env
    op = generated.allreduce_bf16
    x = torch.zeros((8, *op.inner_shape), dtype=torch.bfloat16, device="cuda")
    op(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    for call, match in ((lambda: op(x, timeout_ms=100), "cannot be captured"),
                        (lambda: op(torch.zeros((9, *op.inner_shape), dtype=torch.bfloat16, device="cuda")),
                         "before capturing")):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match=match):
            with torch.cuda.stream(side):
                with torch.cuda.graph(graph):
                    call()
        del graph
    torch.cuda.synchronize()
    dist.barrier()


# ------------------------------------------------------------------------------ real models
@pytest.mark.parametrize("model", ["llama3-8b", "llama3-70b"])
@pytest.mark.parametrize("fused", [False, True])
def test_tensor_parallel_llama_mlp_matches_one_gpu(dist_env, model, fused):
    """The TP MLP block (SwiGLU, gate+up fused) of examples/tp_mlp.py at this world size."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "examples" / "tp_mlp.py"
    spec = importlib.util.spec_from_file_location("tp_mlp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    err = mod.check_against_single_gpu(model, tokens_per_rank=333, seed=3, fused=fused)
    assert err < 2e-2, f"{model} {'fused' if fused else 'decomposed'} at TP {dist.get_world_size()}: {err:.3g}"
    dist.barrier()
