"""The collective family against NCCL and torch symmetric memory, same run (see tilegen/bench.py):
each implementation eager and replayed from a CUDA graph (--no-graph: eager only).

    torchrun --nproc-per-node 2 bench/scripts/bench_collectives.py [--out r.json] [--plot r.png] [--no-graph]

Combine the JSONs of several world sizes with bench/scripts/plot_collectives.py.
"""
import argparse

from tilegen.bench import DEFAULT_SIZES_KIB, GRAPH_REPS, run

OPS = ["generated:allgather_bf16", "generated:reduce_scatter_bf16", "generated:allreduce_bf16",
       "generated:all_to_all_bf16", "generated:broadcast_f32"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--plot")
    ap.add_argument("--reps", type=int, default=20, help="eager batches per size")
    ap.add_argument("--no-graph", dest="graph", action="store_false", help="skip the CUDA-graph replayed timing")
    ap.add_argument("--graph-reps", type=int, default=GRAPH_REPS, help="replays of a captured batch per size")
    a = ap.parse_args()
    raise SystemExit(run(OPS, DEFAULT_SIZES_KIB, a.reps, a.out, a.plot, graph=a.graph, graph_reps=a.graph_reps))
