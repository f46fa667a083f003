"""Where a MoE op's time goes: per-kernel GPU times (torch.profiler, CUPTI) of dispatch and combine at
one size, and the host time of each part of a dispatch call, on rank 0 (every rank runs the calls).

    torchrun --nproc-per-node 4 tools/profile_moe.py [--tokens 4096] [--op moe_bf16]
"""
import argparse
import time

import torch
import torch.distributed as dist

import generated
import tilegen


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--op", default="moe_bf16")
    ap.add_argument("--calls", type=int, default=10)
    a = ap.parse_args()
    rank, world = tilegen.init()
    op = getattr(generated, a.op)
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn((a.tokens, op.hidden), device="cuda", generator=g).to(getattr(torch, op.dtype))
    scores = torch.rand((a.tokens, op.experts), device="cuda", generator=g)
    w, idx = torch.topk(scores, op.topk, dim=1)
    w = torch.softmax(w, dim=1).float()
    recv, _, h = op.dispatch(x, idx, w)
    torch.cuda.synchronize()
    parts = {"check_routing": [], "dispatch_send": [], "dispatch_recv(+alloc)": [], "sync round trip": []}
    for _ in range(a.calls):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        op.check_routing(x, idx, w)
        t1 = time.perf_counter()
        op._mod.dispatch_send(x, idx, w, op._counts, -1, 0)
        t2 = time.perf_counter()
        op.dispatch(x, idx, w, validate=False)  # (after the send above: a whole second call, send + recv)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        parts["check_routing"].append(t1 - t0)
        parts["dispatch_send"].append(t2 - t1)
        parts["dispatch_recv(+alloc)"].append(t3 - t2)
        parts["sync round trip"].append(t4 - t3)
    if rank == 0:
        print(f"host times, {world} ranks, {a.tokens} tokens (median us): "
              + ", ".join(f"{k} {sorted(v)[len(v) // 2] * 1e6:.0f}" for k, v in parts.items()))
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.calls):
            recv, _, h = op.dispatch(x, idx, w)
            op.combine(recv, h)
        torch.cuda.synchronize()
    if rank == 0:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    tilegen.finalize()


if __name__ == "__main__":
    main()
