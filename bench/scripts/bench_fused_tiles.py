"""The fused GEMM kernel alone (CUTLASS Hopper, tilegen/fused_gemm.cuh) at several tile shapes, on
every SM and on the SMs an overlapped call leaves it, against cuBLAS (torch.mm) on the same problem
in the same run: issue 14's goal 2 (the fused kernel within 5% of cuBLAS on the same SMs).

    python3 -m bench sweep --sweep fused --build-only     (the variants, into sweep_fused)
    torchrun --nproc-per-node 2 bench/scripts/bench_fused_tiles.py [--pkg sweep_fused] [--M 8192] [--ops a,b]

Each op is called once (it gathers A and sets every flag), then its GEMM is timed alone on the
gathered rows (no waiting): C[M, N / world] = A[M, K] @ B, bf16, fp32 accumulation. The fused kernel
and cuBLAS are timed in turns (tilegen.bench.time_interleaved): the clock drifts under sustained GEMMs.
"""
import argparse
import importlib
import json

import torch
import torch.distributed as dist

import tilegen
from tilegen.bench import time_interleaved

CALLS = 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pkg", default="sweep_fused")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--ops", help="comma-separated op names (default: every op of the package), e.g. for ncu")
    ap.add_argument("--out")
    a = ap.parse_args()
    rank, world = tilegen.init()
    pkg = importlib.import_module(a.pkg)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    stream = torch.cuda.current_stream().cuda_stream
    rows = []
    for name in a.ops.split(",") if a.ops else pkg.OPS:
        op = getattr(pkg, name)
        n, k = op.gemm_nk[world]
        m = a.M // world
        g = torch.Generator(device="cuda").manual_seed(rank)
        x = torch.randn((m, k), device="cuda", generator=g).bfloat16()
        b = (torch.randn((k, n), device="cuda", generator=g) / k ** 0.5).bfloat16()
        c = torch.empty((a.M, n), device="cuda", dtype=torch.bfloat16)
        op(x, b, c)
        mod, gathered = op.load(), op.empty_output(m)
        full = torch.randn((a.M, k), device="cuda", generator=g).bfloat16()
        def fused(on_sms: int):  # on_sms 0: the SMs an overlapped call leaves the GEMM
            return lambda: mod.fused_gemm(gathered, b, c, on_sms, stream, 0)

        us = time_interleaved({"fused_all_sms": fused(sms), "fused_overlap_sms": fused(0),
                               "cublas": lambda: torch.mm(full, b, out=c)}, CALLS, a.reps)
        res = {"op": name, "tile": op.manifest["fused_gemm"]["tile"], "M": a.M, "N": n, "K": k, "world": world,
               "us": us}
        rows.append(res)
        if rank == 0:
            u = res["us"]
            print(f"{name} tile {res['tile']}: fused {u['fused_all_sms']:.1f} us on {sms} SMs "
                  f"({u['fused_all_sms'] / u['cublas']:.3f}x cuBLAS {u['cublas']:.1f} us), "
                  f"{u['fused_overlap_sms']:.1f} us on the overlap's SMs", flush=True)
    if rank == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "sms": sms, "rows": rows}, f, indent=2)
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
