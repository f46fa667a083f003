"""Allgather (issue 2): tilegen against NCCL at 1 MiB .. 1 GiB of output, same run, with the CTA/tile
variants of the allgather sweep when they were built (python3 -m bench sweep: sweep_allgather) and the
bounded-wait mode.

    torchrun --nproc-per-node 2 bench/scripts/bench_allgather.py [--ops generated:allgather_bf16,sweep_allgather:*]
"""
import argparse

from tilegen.bench import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="generated:allgather_bf16")
    ap.add_argument("--sizes-mib", default="1,8,64,256,1024", help="output sizes")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--bounded-ms", type=float, default=1000.0, help="also time bounded-wait mode (0: skip)")
    ap.add_argument("--out")
    ap.add_argument("--plot")
    a = ap.parse_args()
    sizes = [int(float(s) * 1024) for s in a.sizes_mib.split(",")]
    raise SystemExit(run(a.ops.split(","), sizes, a.reps, a.out, a.plot, a.bounded_ms))
