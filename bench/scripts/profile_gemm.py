"""Timeline of one GEMM-overlap call per rank (torch.profiler / CUPTI): each kernel and copy with its
stream, start and duration in us from the call's first GPU activity. To see where an overlapped
op's time goes (which stream waits, how long the copies take beside the GEMMs).

    torchrun --nproc-per-node 2 bench/scripts/profile_gemm.py --op gemm_rs_bf16_ce --M 4096 [--trace-dir d]
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import generated
import tilegen


def operands(op, M: int, world: int):
    """(a, b) of one rank for the full problem M x N x K the op serves at this world size."""
    n, k = op.n, op.k
    if op.kind == "ag_gemm":
        a = torch.randn((M // world, k), device="cuda").bfloat16()
    else:
        a = torch.randn((M, k), device="cuda").bfloat16()
    b = (torch.randn((k, n) if op.b_layout == "kn" else (n, k), device="cuda") / 64).bfloat16()
    return a, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="gemm_rs_bf16_ce")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--trace-dir")
    args = ap.parse_args()
    rank, world = tilegen.init()
    op = getattr(generated, args.op)
    a, b = operands(op, args.M, world)
    for _ in range(5):
        op(a, b)
    torch.cuda.synchronize()
    dist.barrier()
    for _ in range(2):  # host cost of issuing the calls, against their GPU time (host-bound if larger)
        dist.barrier()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        t0 = time.perf_counter()
        for _ in range(20):
            op(a, b)
        host_us = (time.perf_counter() - t0) * 1e6 / 20
        e1.record()
        e1.synchronize()
        gpu_us = e0.elapsed_time(e1) * 1e3 / 20
    print(f"rank {rank}: host {host_us:.1f} us to issue a call, {gpu_us:.1f} us per call on the GPU (20 calls)",
          flush=True)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            op(a, b)
        torch.cuda.synchronize()
    dist.barrier()
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.trace_dir, f"{args.op}_M{args.M}_rank{rank}.json"))
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu.sort(key=lambda e: e.time_range.start)
    begins = [i for i, e in enumerate(gpu) if "begin" in e.name]
    for i0, i1 in zip(begins, begins[1:]):  # GPU span of each call and the idle gap before the next
        span = max(e.time_range.end for e in gpu[i0:i1]) - gpu[i0].time_range.start
        gap = gpu[i1].time_range.start - gpu[i0].time_range.start - span
        print(f"rank {rank}: call span {span:.1f} us, next begins {gap:.1f} us later", flush=True)
    # the last call: from its begin kernel on
    last = gpu[begins[-1]:] if begins else gpu
    t0 = last[0].time_range.start
    lines = [f"rank {rank}: {args.op} M={args.M}, world {world}, last of {args.calls} calls"]
    for e in last:
        name = e.name if len(e.name) < 60 else e.name[:57] + "..."
        lines.append(f"  {e.time_range.start - t0:9.1f} +{e.time_range.elapsed_us():8.1f}  "
                     f"stream {getattr(e, 'device_resource_id', '?'):>4}  {name}")
    lines.append(f"  end {max(e.time_range.end for e in last) - t0:.1f} us")
    for r in range(world):
        if r == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
