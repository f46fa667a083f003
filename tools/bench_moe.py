"""MoE dispatch and combine, the NCCL baseline (tilegen.moe_nccl: all_to_all_single with counts),
first checked against tilegen.moe's reference layout on a small problem, then timed at the issue's
sizes (CUDA events, medians of batches, slowest rank). GB/s = bytes this rank sends to other ranks
per second (token rows of hidden x 2 bytes; metadata not counted).

    torchrun --nproc-per-node 4 tools/bench_moe.py [--out r.json]

tilegen's own dispatch/combine columns join here once its kernels exist (issue 15).
"""
import argparse
import json

import numpy as np
import torch
import torch.distributed as dist

from tilegen import moe, moe_nccl
from tilegen.bench import time_batches

CASES = [  # (label, tokens per rank, hidden, topk, experts)
    ("normal: 4096 tokens", 4096, 7168, 8, 256),
    ("low latency: 128 tokens", 128, 7168, 8, 256),
]
CALLS = 5


def routing(m: int, k: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_idx [m, k] (distinct experts per token, from random scores) and softmaxed weights."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand((m, experts), device="cuda", generator=g)
    w, idx = torch.topk(scores, k, dim=1)
    return idx, torch.softmax(w, dim=1)


def check_against_reference(rank: int, world: int) -> None:
    """Small problem, dropped slots and one empty rank: the NCCL baseline's layout, counts, handle and
    combine equal tilegen.moe's references (bitwise for dispatch)."""
    experts, k, hidden = 4 * world, 3, 16
    shape = moe.MoeShape(world, experts, k, 16)
    m = 0 if rank == world - 1 else 5 + rank
    idx, w = routing(m, k, experts, 100 + rank)
    idx[idx % 5 == 0] = -1
    x = torch.randn((m, hidden), device="cuda").to(torch.bfloat16)
    got_x, got_counts, got_handle = moe_nccl.dispatch(x, idx, experts)
    ms = [None] * world
    dist.all_gather_object(ms, (x.float().cpu().numpy(), idx.cpu().numpy(), w.cpu().numpy()))
    want = moe.reference_dispatch(shape, [a for a, _, _ in ms], [b for _, b, _ in ms])[rank]
    assert np.array_equal(got_counts.cpu().numpy(), want.counts), (got_counts, want.counts)
    assert np.array_equal(got_handle.cpu().numpy(), want.handle)
    assert np.array_equal(got_x.float().cpu().numpy(), want.x)
    y = (got_x.float() * 2 + 1).to(torch.bfloat16)
    out = moe_nccl.combine(y, got_handle, idx, w)
    ys = [None] * world
    dist.all_gather_object(ys, (y.float().cpu().numpy(), got_handle.cpu().numpy()))
    ref = moe.reference_combine(shape, [a for a, _ in ys], [b for _, b in ys], [b for _, b, _ in ms],
                                [c for _, _, c in ms])[rank]
    err = np.abs(out.float().cpu().numpy() - ref).max() if m else 0.0
    assert err <= 1e-2 * max(1.0, np.abs(ref).max() if m else 1.0), err
    if rank == 0:
        print(f"NCCL baseline matches tilegen.moe's reference at {world} ranks (combine max error {err:.2e})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out")
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    check_against_reference(rank, world)
    rows = []
    for label, m, hidden, k, experts in CASES:
        idx, w = routing(m, k, experts, 7 + rank)
        x = torch.randn((m, hidden), device="cuda").to(torch.bfloat16)
        rx, _, handle = moe_nccl.dispatch(x, idx, experts)
        L = experts // world
        sent = int(((idx >= 0) & (idx // L != rank)).sum()) * hidden * 2
        us_d = time_batches(lambda: moe_nccl.dispatch(x, idx, experts), CALLS, a.reps)
        us_c = time_batches(lambda: moe_nccl.combine(rx, handle, idx, w), CALLS, a.reps)
        res = {"case": label, "world": world, "tokens": m, "hidden": hidden, "topk": k, "experts": experts,
               "bytes_to_peers": sent, "us": {"nccl_dispatch": us_d, "nccl_combine": us_c}}
        rows.append(res)
        if rank == 0:
            print(f"{label}, {world} ranks: NCCL dispatch {us_d:.1f} us ({sent / us_d / 1e3:.0f} GB/s to peers), "
                  f"combine {us_c:.1f} us ({sent / us_c / 1e3:.0f} GB/s)")
    if rank == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
