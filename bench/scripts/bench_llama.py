"""Llama-3-8B-shaped decoder stack (examples/llama.py) on tilegen, NCCL and torch symmetric memory, in
one run: decode step latency (batch 1, 8, 64 at KV length 2048, the compiled step captured in a CUDA
graph) and prefill throughput (tokens per rank, compiled), medians, slowest rank's.

    torchrun --nproc-per-node 4 bench/scripts/bench_llama.py [--layers 4] [--tp 4] [--batches 1,8,64]
             [--prefill 2048] [--out llama.json]

--tp 2 on 4 ranks runs TP 2 x DP 2 (two TP groups at once). Each model is checked against the
unsharded one on one GPU first (examples/llama.check). With --profile, rank 0's decode step at the
first batch is traced with torch.profiler (where the step's time goes, per kernel) for each backend.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples"))
import llama  # noqa: E402

import tilegen  # noqa: E402
from tilegen.bench import time_graph, time_interleaved  # noqa: E402


def decode_us(backend: str, args, batch: int) -> float | None:
    model, _, _ = llama.build(backend, llama.LLAMA3_8B, args.layers, args.tp, batch, 2048, max(batch, args.prefill))
    step = torch.compile(model.decode, fullgraph=True)
    x = torch.randn((batch, llama.LLAMA3_8B.d), device="cuda").bfloat16()
    pos = torch.tensor([2047], device="cuda")
    step(x, pos)  # compiles; allocates
    us, err = time_graph(lambda: step(x, pos), calls=1, reps=args.reps)
    if err and dist.get_rank() == 0:
        print(f"{backend} batch {batch}: graph capture failed: {err}", flush=True)
    if args.profile and batch == args.batches[0]:
        profile(step, x, pos, f"{backend}_decode_b{batch}", args)
    return us


def prefill_ms(backend: str, args) -> float:
    model, _, _ = llama.build(backend, llama.LLAMA3_8B, args.layers, args.tp, 1, 16, args.prefill)
    run = torch.compile(model.prefill, fullgraph=True)
    x = torch.randn((args.prefill, llama.LLAMA3_8B.d), device="cuda").bfloat16()
    return time_interleaved({"p": lambda: run(x)}, calls=1, reps=args.reps, warmup=3)["p"] / 1e3


def profile(step, x, pos, name: str, args) -> None:
    from torch.profiler import ProfilerActivity, profile as prof
    if dist.get_rank() != 0:
        return
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            step(x, pos)
        torch.cuda.synchronize()
    table = p.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(f"--- profile {name} (5 steps, eager replay of the compiled step)\n{table}", flush=True)
    if args.out:
        p.export_chrome_trace(os.path.splitext(args.out)[0] + f"_{name}.trace.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tp", type=int, default=0, help="TP group size (default: the world)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens per rank")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--backends", default="tilegen,nccl,symm_mem")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    rank, world = tilegen.init()
    args.tp = args.tp or world
    args.batches = [int(b) for b in args.batches.split(",")]
    backends = [b for b in args.backends.split(",") if b == "tilegen" or dist.get_backend() == "nccl"]
    result = {"world": world, "tp": args.tp, "layers": args.layers, "device": torch.cuda.get_device_name(),
              "decode_us": {}, "prefill_ms": {}, "check": {}}
    for backend in backends:
        result["check"][backend] = llama.check(backend, min(args.layers, 2), args.tp)
        for b in args.batches:
            result["decode_us"].setdefault(str(b), {})[backend] = decode_us(backend, args, b)
        if backend != "symm_mem":
            result["prefill_ms"][backend] = prefill_ms(backend, args)
    if rank == 0:
        print(json.dumps(result, indent=1), flush=True)
        for b, row in result["decode_us"].items():
            base = row.get("nccl")
            print(f"decode batch {b}: " + ", ".join(
                f"{k} {v:.1f} us" + (f" ({base / v:.2f}x NCCL)" if base and v else "") for k, v in row.items() if v),
                flush=True)
        if result["prefill_ms"]:
            print("prefill: " + ", ".join(f"{k} {v:.2f} ms ({args.prefill * args.tp / v:.0f} tokens/ms per TP group)"
                                          for k, v in result["prefill_ms"].items()), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
