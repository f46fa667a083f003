"""The decode hot path: allreduce + residual add + RMSNorm at decode sizes (rows 1-64, hidden 4096 and
8192, bf16), tilegen's fused op against the same three steps on tilegen's plain allreduce, NCCL and
torch symmetric memory's one_shot / two_shot, all in one run; then the allreduce alone at every size,
fast against deterministic (allreduce_bf16 vs allreduce_det, with NCCL and symmetric memory beside
them). Every implementation eager and replayed from a CUDA graph; medians of the slowest rank.

    torchrun --nproc-per-node 2 bench/scripts/bench_hot_path.py [--out r.json] [--reps 20]

One GPU per rank for figures: ranks sharing a GPU (MPS) check that it runs, nothing more.
"""
import argparse
import json

import torch
import torch.distributed as dist

import generated
import tilegen
from tilegen.bench import GRAPH_REPS, bench_op, time_graph, time_interleaved

ROWS = (1, 2, 4, 8, 16, 32, 64)
HIDDEN = (4096, 8192)
SIZES_KIB = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


def rms_norm(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def fused_impls(m: int, hidden: int) -> tuple[dict, dict]:
    """name -> callable, each computing h = RMSNorm(res += allreduce(y)) * w on the same operands (their
    own copies: each updates its residual), and name -> the result tensor after one call."""
    ar_norm, ar = generated.allreduce_rmsnorm, generated.allreduce_bf16
    eps = ar_norm.epilogue["rmsnorm"]
    g = torch.Generator(device="cuda").manual_seed(dist.get_rank())
    y = torch.randn((m, hidden), device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn((hidden,), device="cuda", generator=g)).bfloat16()
    res0 = torch.randn((m, hidden), device="cuda", generator=g).bfloat16()
    res = {k: res0.clone() for k in ("tilegen_fused", "tilegen_unfused", "nccl", "symm_one_shot", "symm_two_shot")}
    out = torch.empty_like(y)
    rows4k = m * hidden // 4096  # allreduce_bf16's rows are 4096 wide: the sum is element-wise
    ar_out = ar.empty_output(rows4k)
    y4k = y.view(rows4k, 4096)
    nccl_buf = torch.empty_like(y)
    fns = {
        "tilegen_fused": lambda: ar_norm(y, out, residual=res["tilegen_fused"], weight=w),
        "tilegen_unfused": lambda: rms_norm(res["tilegen_unfused"].add_(ar(y4k, ar_out).view(m, hidden)), w, eps),
        "nccl": lambda: rms_norm(res["nccl"].add_(_nccl_ar(nccl_buf, y)), w, eps),
    }
    try:
        import torch.distributed._symmetric_memory as symm_mem
        group = dist.group.WORLD.group_name
        buf = symm_mem.empty((m, hidden), dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(buf, group)

        def one_shot():
            buf.copy_(y)
            return rms_norm(res["symm_one_shot"].add_(torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)),
                            w, eps)

        def two_shot():
            buf.copy_(y)
            return rms_norm(res["symm_two_shot"].add_(torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group)),
                            w, eps)
        fns["symm_one_shot"], fns["symm_two_shot"] = one_shot, two_shot
    except Exception as e:  # reported; the table shows what ran
        if dist.get_rank() == 0:
            print(f"torch symmetric memory unavailable: {type(e).__name__}: {e}")
    results = {}
    for name, fn in fns.items():
        r = fn()
        results[name] = (out if r is None else r).clone()
    return fns, results


def _nccl_ar(buf, y):
    buf.copy_(y)
    dist.all_reduce(buf)
    return buf


def bench_fused(reps: int, graph_reps: int) -> list[dict]:
    rows = []
    for hidden in HIDDEN:
        for m in ROWS:
            fns, results = fused_impls(m, hidden)
            ref = results["nccl"].float()
            row = {"rows": m, "hidden": hidden, "bytes": m * hidden * 2, "times_us": time_interleaved(fns, 20, reps),
                   "times_graph_us": {}, "max_diff_vs_nccl": {
                       k: (v.float() - ref).abs().max().item() for k, v in results.items()}}
            for name, fn in fns.items():
                us, _ = time_graph(fn, 20, graph_reps)
                if us is not None:
                    row["times_graph_us"][name] = us
            rows.append(row)
            if dist.get_rank() == 0:
                t, tg = row["times_us"], row["times_graph_us"]
                print(f"m {m:3d} hidden {hidden}: " + "  ".join(
                    f"{k} {t[k]:.1f}/{tg.get(k, float('nan')):.1f}" for k in t) + "  (us eager/graph)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--graph-reps", type=int, default=GRAPH_REPS)
    ap.add_argument("--skip-sizes", action="store_true", help="only the fused decode sizes")
    a = ap.parse_args()
    rank, world = tilegen.init()
    fast, det = generated.allreduce_bf16, generated.allreduce_det
    result = {"world": world, "device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
              "backend": dist.get_backend(), "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version())), "fast_op": fast.name, "deterministic_op": det.name,
              "fused": bench_fused(a.reps, a.graph_reps)}
    if not a.skip_sizes:
        result["sizes"] = (bench_op(fast, SIZES_KIB, a.reps, graph_reps=a.graph_reps)
                           + bench_op(det, SIZES_KIB, a.reps, graph_reps=a.graph_reps))
    if rank == 0 and a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
