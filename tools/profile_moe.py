"""Where a MoE op's time goes: per-kernel GPU times (torch.profiler, CUPTI) of dispatch and combine at
one size (low-latency ops: eager calls, the kernels a graph replays), and in normal mode the host time
of each part of a dispatch call, on rank 0 (every rank runs the calls).

    torchrun --nproc-per-node 4 tools/profile_moe.py [--tokens 4096] [--op moe_bf16]
"""
import argparse
import time

import torch
import torch.distributed as dist

import generated
import tilegen


def host_parts(op, x, idx, w, rank, world, a):
    """Normal mode: host time of each part of a dispatch (its counts come back to the host)."""
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--op", default="moe_bf16")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--plain", action="store_true", help="the calls alone (for ncu: tools/ncu_rank0.sh)")
    a = ap.parse_args()
    rank, world = tilegen.init()
    op = getattr(generated, a.op)
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn((a.tokens, op.hidden), device="cuda", generator=g).to(getattr(torch, op.dtype))
    scores = torch.rand((a.tokens, op.experts), device="cuda", generator=g)
    w, idx = torch.topk(scores, op.topk, dim=1)
    w = torch.softmax(w, dim=1).float()
    recv, _, h = op.dispatch(x, idx, w)
    # what combine takes: the experts' outputs in the received layout, in the token dtype (fp8 dispatch too)
    y = torch.zeros((recv[0] if isinstance(recv, tuple) else recv).shape, dtype=x.dtype, device="cuda")
    op.combine(y, h)
    torch.cuda.synchronize()
    if op.mode == "normal":
        host_parts(op, x, idx, w, rank, world, a)
    dist.barrier()
    if a.plain:
        for _ in range(a.calls):
            recv, _, h = op.dispatch(x, idx, w)
            op.combine(y, h)
        torch.cuda.synchronize()
        tilegen.finalize()
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.calls):
            recv, _, h = op.dispatch(x, idx, w)
            op.combine(y, h)
        torch.cuda.synchronize()
    if rank == 0:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    tilegen.finalize()


if __name__ == "__main__":
    main()
