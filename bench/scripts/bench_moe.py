"""MoE dispatch and combine: tilegen's generated op (generated.moe_bf16, normal mode) against the NCCL
baseline (tilegen.moe.nccl: all_to_all_single with counts). The baseline is first checked against
tilegen.moe.check's reference layout on a small problem; at each timed size tilegen's dispatch must equal
the baseline's bit for bit (tokens, counts, handle) and its combine agree within bf16 rounding. Times:
CUDA events, medians of batches, slowest rank, eager (normal mode synchronises with the host once per
dispatch: not graph-capturable); a call is the whole op (dispatch: routing, push, counts to the host,
expansion into the caller's tensors). GB/s = the items' token bytes that go to other ranks (rows of
hidden x 2 bytes per (token, expert) on another rank, as DeepEP counts) per second; tilegen sends each
token once per destination rank, so it moves fewer bytes than that.

    torchrun --nproc-per-node 4 bench/scripts/bench_moe.py [--out r.json] [--op moe_bf16] [--tokens 128]
"""
import argparse
import json
import statistics

import numpy as np
import torch
import torch.distributed as dist

from tilegen.moe import check as moe

from tilegen.moe import nccl as moe_nccl
from tilegen.moe.runtime import filled_rows
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
    combine equal tilegen.moe.check's references (bitwise for dispatch)."""
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
        print(f"NCCL baseline matches tilegen.moe.check's reference at {world} ranks (combine max error {err:.2e})")


def check_tilegen(op, x, idx, w, label: str) -> dict:
    """tilegen's dispatch equals the baseline bit for bit; its combine (of y = 2 * recv + 1, as the
    baseline's) agrees with the baseline's within bf16 rounding. Raises on a difference."""
    got_x, got_counts, h = op.dispatch(x, idx, w)
    want_x, want_counts, want_handle = moe_nccl.dispatch(x, idx, op.experts)
    same = (torch.equal(got_counts.long(), want_counts.long()) and torch.equal(h.handle.long(), want_handle.long())
            and torch.equal(got_x.view(torch.int16), want_x.view(torch.int16)))
    if not same:
        raise AssertionError(f"{label}: rank {dist.get_rank()}: tilegen's dispatch differs from the NCCL baseline")
    y = (got_x.float() * 2 + 1).to(torch.bfloat16)
    out, ref = op.combine(y, h), moe_nccl.combine(y, want_handle, idx, w)
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    if err > 2 ** -6 * max(1.0, ref.float().abs().max().item() if out.numel() else 1.0):
        raise AssertionError(f"{label}: rank {dist.get_rank()}: combine differs from the baseline by {err}")
    return {"recv_rows": int(got_x.shape[0]), "combine_max_diff_vs_nccl": err}


def time_ll_halves(op, x, idx, w, reps: int, calls: int = 20, prefix: str = "tilegen_ll_") -> dict:
    """Low-latency op: dispatch and combine each captured in a CUDA graph of its own, replayed in turn
    (dispatch, combine, dispatch, ...: the order the mode needs), each replay between CUDA events; also
    the eager pair. Medians over `reps` batches of `calls` alternations, us per call, slowest rank."""
    from tilegen.bench import _slowest
    recv, _, h = op.dispatch(x, idx, w)
    # combine takes the token dtype: an fp8 dispatch's experts would dequantize; zeros stand in for them.
    # (The op's outputs are fixed buffers: the captured dispatch fills the same recv, so y serves every call.)
    y = torch.zeros(recv[0].shape, dtype=x.dtype, device="cuda") if isinstance(recv, tuple) else recv
    op.combine(y, h)
    torch.cuda.synchronize()
    g_dispatch, g_combine = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_dispatch):
        _, _, h = op.dispatch(x, idx, w)
    with torch.cuda.graph(g_combine):
        op.combine(y, h)
    halves = {"dispatch": [], "combine": []}
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * calls + 1)]
        ev[0].record()
        for i in range(calls):
            g_dispatch.replay()
            ev[2 * i + 1].record()
            g_combine.replay()
            ev[2 * i + 2].record()
        ev[-1].synchronize()
        halves["dispatch"].append(sum(ev[2 * i].elapsed_time(ev[2 * i + 1]) for i in range(calls)) * 1e3 / calls)
        halves["combine"].append(sum(ev[2 * i + 1].elapsed_time(ev[2 * i + 2]) for i in range(calls)) * 1e3 / calls)
    out = {f"{prefix}graph_{k}": _slowest(statistics.median(v)) for k, v in halves.items()}

    def pair():
        _, _, hh = op.dispatch(x, idx, w)
        op.combine(y, hh)
    out[f"{prefix}eager_pair"] = time_batches(pair, CALLS, reps)
    return out


def check_ll(op, x, idx, w, label: str) -> None:
    """The low-latency op's filled rows equal the NCCL baseline's dispatch bit for bit."""
    recv, counts, h = op.dispatch(x, idx, w)
    got = filled_rows(recv, counts)
    want, _, _ = moe_nccl.dispatch(x, idx, op.experts)
    op.combine(recv, h)
    if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
        raise AssertionError(f"{label}: rank {dist.get_rank()}: the low-latency dispatch differs from the baseline")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out")
    ap.add_argument("--op", default="moe_bf16", help="generated MoE op (hidden 7168, 256 experts, top-8)")
    ap.add_argument("--ll-op", default="moe_bf16_ll", help="generated low-latency MoE op, for the sizes it takes")
    ap.add_argument("--fp8-op", default="moe_bf16_fp8", help="generated MoE op with fp8 dispatch")
    ap.add_argument("--tokens", type=int, nargs="*", help="only the cases of these tokens per rank (e.g. 128)")
    ap.add_argument("--fp8-ll-op", default="moe_bf16_fp8_ll", help="generated low-latency MoE op with fp8 dispatch")
    a = ap.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    check_against_reference(rank, world)
    op = ll_op = fp8_op = fp8_ll_op = None
    try:
        import generated
        import tilegen
        tilegen.init()
        op = getattr(generated, a.op)
        ll_op = getattr(generated, a.ll_op, None)
        fp8_op = getattr(generated, a.fp8_op, None)
        fp8_ll_op = getattr(generated, a.fp8_ll_op, None)
    except Exception as e:  # the baseline still runs
        if rank == 0:
            print(f"tilegen op {a.op} unavailable: {type(e).__name__}: {e}")
    rows = []
    for label, m, hidden, k, experts in CASES:
        if a.tokens and m not in a.tokens:
            continue
        idx, w = routing(m, k, experts, 7 + rank)
        x = torch.randn((m, hidden), device="cuda").to(torch.bfloat16)
        rx, _, handle = moe_nccl.dispatch(x, idx, experts)
        L = experts // world
        sent = int(((idx >= 0) & (idx // L != rank)).sum()) * hidden * 2
        us = {"nccl_dispatch": time_batches(lambda: moe_nccl.dispatch(x, idx, experts), CALLS, a.reps),
              "nccl_combine": time_batches(lambda: moe_nccl.combine(rx, handle, idx, w), CALLS, a.reps)}
        res = {"case": label, "world": world, "tokens": m, "hidden": hidden, "topk": k, "experts": experts,
               "bytes_to_peers": sent, "us": us}
        if op is not None:
            res["check"] = check_tilegen(op, x, idx, w, label)
            trx, _, th = op.dispatch(x, idx, w)
            us["tilegen_dispatch"] = time_batches(lambda: op.dispatch(x, idx, w), CALLS, a.reps)
            us["tilegen_combine"] = time_batches(lambda: op.combine(trx, th), CALLS, a.reps)
            us["tilegen_dispatch_unchecked"] = time_batches(lambda: op.dispatch(x, idx, w, validate=False), CALLS,
                                                            a.reps)
        if fp8_op is not None and m <= fp8_op.max_rows():  # fp8 dispatch (e4m3 + scales), combine in bf16
            (q, _), _, fh = fp8_op.dispatch(x, idx, w)
            y8 = torch.zeros((q.shape[0], hidden), dtype=torch.bfloat16, device="cuda")
            us["tilegen_fp8_dispatch"] = time_batches(lambda: fp8_op.dispatch(x, idx, w), CALLS, a.reps)
            us["tilegen_fp8_combine"] = time_batches(lambda: fp8_op.combine(y8, fh), CALLS, a.reps)
        if ll_op is not None and m <= ll_op.max_rows():
            check_ll(ll_op, x, idx, w, label)
            us.update(time_ll_halves(ll_op, x, idx, w, a.reps))
        if fp8_ll_op is not None and m <= fp8_ll_op.max_rows():
            us.update(time_ll_halves(fp8_ll_op, x, idx, w, a.reps, prefix="tilegen_fp8_ll_"))
        rows.append(res)
        if rank == 0:
            line = "; ".join(f"{name} {t:.1f} us ({sent / t / 1e3:.0f} GB/s)" for name, t in us.items())
            print(f"{label}, {world} ranks: {line}")
            if op is not None:
                print(f"  tilegen vs NCCL: dispatch {us['nccl_dispatch'] / us['tilegen_dispatch']:.2f}x, "
                      f"combine {us['nccl_combine'] / us['tilegen_combine']:.2f}x")
    if rank == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)
    if op is not None:
        import tilegen
        tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
