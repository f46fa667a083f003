"""The collective family against NCCL and torch symmetric memory, same run (see tilegen/bench.py).

    torchrun --nproc-per-node 2 tools/bench_collectives.py [--out r.json] [--plot r.png]
"""
import argparse

from tilegen.bench import DEFAULT_SIZES_KIB, run

OPS = ["generated:allgather_bf16", "generated:reduce_scatter_bf16", "generated:allreduce_bf16",
       "generated:all_to_all_bf16", "generated:broadcast_f32"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--plot")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    raise SystemExit(run(OPS, DEFAULT_SIZES_KIB, a.reps, a.out, a.plot))
