"""Diagnostic: does a lone rank's bounded copy-engine call time out? (2-rank anomaly of issue 14)

    torchrun --nproc-per-node 2 bench/scripts/diag_ce_timeout.py
"""
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import generated
import tilegen


def main():
    rank, world = tilegen.init()
    gloo = dist.new_group(backend="gloo")
    bar = lambda: dist.monitored_barrier(gloo, timeout=timedelta(seconds=60))  # noqa: E731
    op = generated.gemm_rs_bf16_ce
    n, k = op.gemm_nk[world]
    g = torch.Generator(device="cuda").manual_seed(rank)
    a = torch.randn((world * 64, k), device="cuda", generator=g).bfloat16()
    b = (torch.randn((k, n), device="cuda", generator=g) / k ** 0.5).bfloat16()
    variants = [v.split(":") for v in os.environ.get("VARIANTS", "ring:2:library,direct:1:library").split(",")]
    for style, splits, executor in variants:
        os.environ.update(TILEGEN_CE_STYLE=style, TILEGEN_CE_SPLITS=splits, TILEGEN_CE_EXECUTOR=executor)
        op(a, b)
        torch.cuda.synchronize()
        bar()
        mod = op.load()
        print(f"rank {rank} words after the shared call: {list(mod.ce_words())}", flush=True)
        bar()
        outcome = "-"
        if rank == 0:
            t0 = time.monotonic()
            try:
                op(a, b, timeout_ms=300)
                outcome = f"returned in {1e3 * (time.monotonic() - t0):.1f} ms (no timeout)"
            except Exception as e:
                outcome = f"{type(e).__name__} after {1e3 * (time.monotonic() - t0):.1f} ms: {str(e)[:160]}"
        bar()
        print(f"rank {rank} {style} x{splits} {executor}: lone bounded call: {outcome}; words now "
              f"{list(mod.ce_words())}", flush=True)
        flags = [None] * world
        dist.all_gather_object(flags, outcome, group=gloo)
        if flags[0].startswith("TimeoutError") or flags[0].startswith("RuntimeError"):
            break
        if rank == 1:  # re-align: rank 1 makes its matching call
            t0 = time.monotonic()
            try:
                op(a, b, timeout_ms=2000)
                print(f"rank 1 catch-up call returned in {1e3 * (time.monotonic() - t0):.1f} ms", flush=True)
            except Exception as e:
                print(f"rank 1 catch-up: {type(e).__name__}: {str(e)[:160]}", flush=True)
        torch.cuda.synchronize()
        bar()
    os._exit(0)  # a poisoned op's queued waits would hold a clean shutdown


if __name__ == "__main__":
    main()
