"""Where a MoE op's time goes, on rank 0 (every rank runs the calls). Normal mode: per-kernel GPU times
(torch.profiler, CUPTI) of eager dispatch and combine and the host time of each part of a dispatch.
Low-latency mode: dispatch and combine captured in CUDA graphs and replayed in turn, as a decode step
runs them; CUPTI's record of each replayed kernel gives the in-graph timeline: per kernel its median
duration and the gap before it (launch and drain between nodes, included in the op's time). With
--trace the graphs are captured with the op's phase stamps on (MoeOp.trace) and, after the replays,
every rank prints when its CTAs reached each phase of the last replay (us from the dispatch's first
stamp: earliest, median and latest CTA), so a kernel's time splits into waits, copies and its tail.

    torchrun --nproc-per-node 4 bench/scripts/profile_moe.py [--tokens 4096] [--op moe_bf16]
"""
import argparse
import json
import os
import statistics
import tempfile
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


def kernel_spans(prof) -> list[tuple[str, float, float]]:
    """(short name, start us, end us) of every GPU kernel the profiler recorded, in start order."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    spans = []
    for e in events:
        if e.get("cat") == "kernel" and e.get("ph") == "X":
            name = e["name"]
            short = name.split("tilegen::moe::")[1].split("<")[0] if "tilegen::moe::" in name else name[:40]
            spans.append((short, float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return sorted(spans, key=lambda s: s[1])


def graph_timeline(op, x, idx, w, y, calls: int, rank: int, world: int) -> None:
    """Low-latency mode: the replayed graphs' kernels, per kernel the median duration and gap before it."""
    g_dispatch, g_combine = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_dispatch):
        _, _, h = op.dispatch(x, idx, w)
    with torch.cuda.graph(g_combine):
        op.combine(y, h)
    for _ in range(3):
        g_dispatch.replay()
        g_combine.replay()
    torch.cuda.synchronize()
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            g_dispatch.replay()
            g_combine.replay()
        torch.cuda.synchronize()
    spans = kernel_spans(prof)
    per_call = len(spans) // calls
    rows: dict[str, dict[str, list[float]]] = {}
    totals = {"dispatch": [], "combine": []}
    for c in range(1, calls):  # (the first replay waits for the other ranks' start)
        call = spans[c * per_call:(c + 1) * per_call]
        prev_end = spans[c * per_call - 1][2]
        for i, (name, t0, t1) in enumerate(call):
            r = rows.setdefault(f"{i}:{name}", {"dur": [], "gap": []})
            r["dur"].append(t1 - t0)
            r["gap"].append(t0 - prev_end)
            prev_end = t1
        cut = next(i for i, s in enumerate(call) if s[0].startswith("combine"))
        totals["dispatch"].append(call[cut - 1][2] - spans[c * per_call - 1][2])
        totals["combine"].append(call[-1][2] - call[cut - 1][2])
    med = statistics.median
    lines = [f"rank {rank}: in-graph timeline of {op.name} ({x.shape[0]} tokens, {world} ranks, {calls - 1} "
             f"replays; us, medians; a half's time runs from the previous kernel's end): dispatch "
             f"{med(totals['dispatch']):.1f}, combine {med(totals['combine']):.1f}"]
    lines += [f"  {key.split(':', 1)[1]:<16} gap {med(r['gap']):6.1f}  kernel {med(r['dur']):6.1f}"
              for key, r in rows.items()]
    print_in_rank_order(lines, rank, world)


def print_in_rank_order(lines: list[str], rank: int, world: int) -> None:
    """Every rank's lines, rank 0's first (the ranks take turns between barriers)."""
    for q in range(world):
        if q == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()


def print_phases(op, rank: int, world: int) -> None:
    """The last replay's phase stamps, per kernel and phase: earliest / median / latest CTA, us from the
    dispatch's first stamp, on this rank's clock. Every replay stamps the same slots (one per CTA), so a
    phase only some CTAs reach (the last CTA's) keeps slots of earlier replays: stamps before the last
    replay's start are left out."""
    stamps = op.read_trace()
    t0 = min(min(ph[0]) for ph in stamps.values() if ph and ph[0])  # the first kernel's first start
    lines = [f"rank {rank}: phase stamps of {op.name}'s last replay (us from the dispatch's start; "
             f"earliest / median / latest CTA; CTAs)"]
    for kernel, phases in stamps.items():
        for name, ts in zip(op.TRACE_PHASES[kernel], phases):
            us = sorted(u for u in ((t - t0) / 1e3 for t in ts) if u >= 0)
            if us:
                lines.append(f"  {kernel:<15} {name:<30} {us[0]:7.1f} {statistics.median(us):7.1f} {us[-1]:7.1f}"
                             f"  {len(us)}")
    print_in_rank_order(lines, rank, world)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--op", default="moe_bf16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--plain", action="store_true", help="the calls alone (for ncu: python3 -m bench profile)")
    ap.add_argument("--trace", action="store_true", help="low-latency ops: each CTA's phase stamps too")
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
    if op.mode != "normal":
        if a.trace:
            op.trace(True)  # (before the capture: a graph keeps the trace buffer it was captured with)
        graph_timeline(op, x, idx, w, y, a.calls, rank, world)
        if a.trace:
            print_phases(op, rank, world)
            op.trace(False)
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
