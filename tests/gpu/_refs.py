"""References for the GPU tests: every rank's inputs made locally from per-rank seeds, expected
outputs in float64, and the error rules the ops are held to.

Reductions: tilegen accumulates in fp32 and rounds once, so every element must lie within one ulp
(of the output dtype) of the float64 sum, and no further from it than NCCL's answer plus one ulp.
NCCL rounds after every step of its ring, so at 4 ranks it may differ from tilegen by an ulp or two:
matching NCCL's rounding is not the goal, being at least as close to the exact sum is.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "int32": torch.int32, "uint8": torch.uint8}


def rank_input(shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    hi = 256 if dtype == torch.uint8 else 1 << 20
    return torch.randint(0, hi, shape, device="cuda", generator=g, dtype=torch.int64).to(dtype)


def all_inputs(shape, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Every rank's input: rank r's is made from seed + r, so each rank can compute the reference."""
    return [rank_input(shape, dtype, seed + r) for r in range(dist.get_world_size())]


def nccl() -> bool:
    return dist.get_backend() == "nccl"


def reduce64(xs: list[torch.Tensor], how: str) -> torch.Tensor:
    acc = xs[0].double()
    for x in xs[1:]:
        acc = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[how](acc, x.double())
    return acc


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the magnitude of x (float64 in, float64 out)."""
    fi = torch.finfo(dtype)
    mag = x.abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def assert_reduction(out: torch.Tensor, parts: list[torch.Tensor], how: str, nccl_out: torch.Tensor | None = None,
                     what: str = "") -> None:
    """out (tilegen's reduction of ``parts``) against the float64 reference, and no worse than
    NCCL's answer (+1 ulp)."""
    ref64 = reduce64(parts, how)
    if how != "sum" or not out.dtype.is_floating_point:  # max/min and integer sums are exact
        want = ref64.to(out.dtype)
        assert torch.equal(out, want), f"{what}: {(out.double() - ref64).abs().max().item()} off an exact reduction"
        return
    err = (out.double() - ref64).abs()
    # one rounding to the output type (each fp32 step too, for f32), plus what fp32 accumulation of
    # len(parts) terms can lose where they cancel
    steps = len(parts) if out.dtype == torch.float32 else 1
    acc = len(parts) * torch.finfo(torch.float32).eps * reduce64([x.abs() for x in parts], "sum")
    bound = steps * torch.maximum(ulp(ref64, out.dtype), ulp(out.double(), out.dtype)) + acc
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {out.numel()} elements further than {steps} ulp from the "
                           f"exact sum (worst {err.max().item():.4g})")
    if nccl_out is not None:
        nerr = (nccl_out.double() - ref64).abs()
        worse = err > nerr + ulp(ref64, out.dtype) + acc
        assert not worse.any(), (f"{what}: {int(worse.sum())} elements further from the exact sum than NCCL's + 1 ulp "
                                 f"(tilegen worst {err.max().item():.4g}, NCCL worst {nerr.max().item():.4g})")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def gemm_operands(op, m: int, seed: int):
    """ag_gemm / gemm_rs operands of every rank at this world size: A shards and B shards."""
    world = dist.get_world_size()
    dtype = TORCH_DTYPES[op.dtype]
    n, k = op.gemm_nk[world]
    rows = m if op.kind == "ag_gemm" else world * m
    a = all_inputs((rows, k), dtype, seed)
    b_shape = (k, n) if op.b_layout == "kn" else (n, k)
    bs = [(x.float() / k ** 0.5).to(dtype) for x in all_inputs(b_shape, dtype, seed + 1000)]
    return a, bs


def as_kn(b: torch.Tensor, layout: str) -> torch.Tensor:
    return b if layout == "kn" else b.t()


def gemm_reference(op, a, bs, m: int) -> torch.Tensor:
    """Expected C on this rank, in fp32 (inputs as given, fp32 products)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if op.kind == "ag_gemm":
        return torch.cat(a).float() @ as_kn(bs[rank], op.b_layout).float()
    return sum((a[s].float() @ as_kn(bs[s], op.b_layout).float())[rank * m:(rank + 1) * m] for s in range(world))
