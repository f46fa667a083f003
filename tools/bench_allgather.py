"""Allgather benchmark: tilegen's generated op against NCCL (torch.distributed), same run, same data.

    torchrun --nproc-per-node 2 tools/bench_allgather.py [--out results.json]

Sizes are the total output bytes (as nccl-tests counts them). Each measurement times `--calls`
back-to-back calls between CUDA events and divides; the median over `--reps` such batches is
reported. busbw = size / time * (world - 1) / world.
"""
import argparse
import importlib
import json
import os

import torch
import torch.distributed as dist

import tilegen
from benchlib import MiB, busbw_GBps, calls_for, time_batches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="1,8,64,256,1024", help="total output sizes in MiB")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--out")
    ap.add_argument("--ops", default="generated:allgather_bf16",
                    help="package:op[,package:op...]; package:* takes every op of a package")
    args = ap.parse_args()
    rank, world = tilegen.init()
    ops = []
    for item in args.ops.split(","):
        pkg, _, name = item.partition(":")
        mod = importlib.import_module(pkg)
        ops += [(n, getattr(mod, n)) for n in (mod.OPS if name == "*" else [name])]
    inner = 8192
    rows_all = []
    for mib in [float(s) for s in args.sizes_mib.split(",")]:
        total = int(mib * MiB)
        rows = total // (world * inner * 2)
        nbytes = rows * world * inner * 2
        x = torch.randn((rows, inner), device="cuda").to(torch.bfloat16)
        ref = torch.empty((world * rows, inner), device="cuda", dtype=torch.bfloat16)
        calls = calls_for(nbytes)
        nccl = dist.get_backend() == "nccl"  # not when ranks share a GPU (multi-process-per-GPU mode)
        t_nccl = time_batches(lambda: dist.all_gather_into_tensor(ref, x), calls, args.reps) if nccl else float("nan")
        bus = lambda t: busbw_GBps("allgather", nbytes, t, world)
        for name, op in ops:
            out = op.empty_output(rows)
            t_tg = time_batches(lambda: op(x, out), calls, args.reps)
            torch.cuda.synchronize()
            ok = torch.equal(out.view(torch.int16), ref.view(torch.int16)) if nccl else None
            rows_all.append({"op": name, "bytes": nbytes, "rows_per_rank": rows, "tilegen_us": t_tg, "nccl_us": t_nccl,
                             "tilegen_busbw_GBps": bus(t_tg), "nccl_busbw_GBps": bus(t_nccl),
                             "latency_ratio": t_tg / t_nccl, "bitwise_equal": ok})
            op.free_outputs()
    if rank == 0:
        dev = torch.cuda.get_device_name()
        shared = dist.get_backend() != "nccl"
        print(f"\nallgather bf16, {world} ranks on {torch.cuda.device_count()} x {dev}, medians of {args.reps} batches"
              + (" -- RANKS SHARE ONE GPU: not a link-bandwidth figure, no NCCL baseline" if shared else ""))
        print(f"{'op':<28} {'size':>10} {'tilegen us':>11} {'NCCL us':>9} {'tilegen busbw':>14} {'NCCL busbw':>11} {'time ratio':>10} ok")
        for r in rows_all:
            print(f"{r['op']:<28} {r['bytes'] / MiB:8.1f}Mi {r['tilegen_us']:11.1f} {r['nccl_us']:9.1f} "
                  f"{r['tilegen_busbw_GBps']:11.1f}GB/s {r['nccl_busbw_GBps']:8.1f}GB/s {r['latency_ratio']:10.2f} "
                  f"{ {True: 'yes', False: 'NO', None: '-'}[r['bitwise_equal']] }")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": dev, "world": world, "rows": rows_all}, f, indent=2)
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
