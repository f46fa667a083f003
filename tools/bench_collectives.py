"""The collective family against NCCL (torch.distributed) and torch symmetric memory, same run.

    torchrun --nproc-per-node 2 tools/bench_collectives.py --out results.json --plot collectives.png

Sizes follow nccl-tests: allgather counts the output, reduce_scatter the input, allreduce and
broadcast the buffer, all_to_all one rank's buffer. Times are medians (benchlib.time_batches); busbw
uses nccl-tests' factors. Results are checked against NCCL where NCCL can run (one GPU per rank).
"""
import argparse
import json

import torch
import torch.distributed as dist

import generated
import tilegen
from benchlib import MiB, busbw_GBps, calls_for, time_batches

OPS = {"allgather": "allgather_bf16", "reduce_scatter": "reduce_scatter_bf16", "allreduce": "allreduce_bf16",
       "all_to_all": "all_to_all_bf16", "broadcast": "broadcast_f32"}


def baselines(kind, x, out, world):
    """name -> callable for the reference implementations of one op on these buffers."""
    fns = {}
    if dist.get_backend() != "nccl":
        return fns
    if kind == "allgather":
        fns["nccl"] = lambda: dist.all_gather_into_tensor(out, x)
    elif kind == "reduce_scatter":
        fns["nccl"] = lambda: dist.reduce_scatter_tensor(out, x)
    elif kind == "allreduce":
        y = x.clone()
        fns["nccl"] = lambda: dist.all_reduce(y)
        try:
            import torch.distributed._symmetric_memory as symm_mem
            group = dist.group.WORLD.group_name
            buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group)
            buf.copy_(x.flatten())
            fns["torch_symm_one_shot"] = lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)
            fns["torch_symm_two_shot"] = lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group)
        except Exception as e:  # report, do not hide: the table says n/a
            if dist.get_rank() == 0:
                print(f"torch symmetric memory unavailable: {type(e).__name__}: {e}")
    elif kind == "all_to_all":
        fns["nccl"] = lambda: dist.all_to_all_single(out, x)
    elif kind == "broadcast":
        y = x.clone()
        fns["nccl"] = lambda: dist.broadcast(y, src=0)
    return fns


def check(kind, ours, x, world):
    """Our result against NCCL's on the same input (bf16 sums within fp32-accumulation tolerance)."""
    if dist.get_backend() != "nccl":
        return None
    ref = torch.empty_like(ours)
    if kind == "allgather":
        dist.all_gather_into_tensor(ref, x)
    elif kind == "reduce_scatter":
        dist.reduce_scatter_tensor(ref, x)
    elif kind == "allreduce":
        ref.copy_(x)
        dist.all_reduce(ref)
    elif kind == "all_to_all":
        dist.all_to_all_single(ref, x)
    else:
        ref.copy_(x)
        dist.broadcast(ref, src=0)
    return bool(torch.allclose(ours.float(), ref.float(), rtol=1e-2, atol=1e-2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-kib", default="16,64,256,1024,4096,16384,65536,262144")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args()
    rank, world = tilegen.init()
    rows = []
    for kind in args.ops.split(","):
        op = getattr(generated, OPS[kind])
        inner = 1
        for d in op.inner_shape:
            inner *= d
        elem = torch.finfo(getattr(torch, op.dtype)).bits // 8
        k_in = world if kind in ("reduce_scatter", "all_to_all") else 1
        k_size = world if kind == "allgather" else 1  # size counted in output rows for allgather
        for kib in [int(s) for s in args.sizes_kib.split(",")]:
            size = kib * 1024
            m = size // (k_size * k_in * inner * elem) if kind != "all_to_all" else size // (world * inner * elem)
            if m < 1 or m > op.max_rows():
                continue
            size = m * k_size * k_in * inner * elem
            x = torch.randn((k_in * m,) + op.inner_shape, device="cuda").to(getattr(torch, op.dtype))
            out = op.empty_output(m)
            impls = {"tilegen": lambda: op(x, out)}
            impls.update(baselines(kind, x, torch.empty_like(out) if kind != "allreduce" else None, world))
            res = {"op": kind, "bytes": size, "rows": m}
            for name, fn in impls.items():
                us = time_batches(fn, calls_for(size), args.reps)
                res[f"{name}_us"] = us
                res[f"{name}_busbw"] = busbw_GBps(kind, size, us, world)
            op(x, out)
            res["matches_nccl"] = check(kind, out, x, world)
            rows.append(res)
            op.free_outputs()
    if rank == 0:
        impl_names = sorted({k[:-3] for r in rows for k in r if k.endswith("_us")}, key=lambda n: (n != "tilegen", n))
        print(f"\ncollectives, {world} ranks on {torch.cuda.device_count()} x {torch.cuda.get_device_name()}, "
              f"median us per call and busbw GB/s" + ("" if dist.get_backend() == "nccl" else
                                                       " -- RANKS SHARE ONE GPU: no baselines, not link bandwidth"))
        head = f"{'op':<15}{'size':>10}" + "".join(f"{n + ' us':>24}{'busbw':>8}" for n in impl_names) + f"{'vs nccl':>9} ok"
        print(head)
        for r in rows:
            line = f"{r['op']:<15}{r['bytes'] / MiB:>9.3f}M"
            for n in impl_names:
                line += f"{r.get(n + '_us', float('nan')):>24.1f}{r.get(n + '_busbw', float('nan')):>8.1f}"
            ratio = r["nccl_us"] / r["tilegen_us"] if "nccl_us" in r else float("nan")
            line += f"{ratio:>8.2f}x {dict([(True, 'yes'), (False, 'NO'), (None, '-')])[r['matches_nccl']]}"
            print(line)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "world": world, "rows": rows}, f, indent=2)
        if args.plot:
            plot(rows, impl_names, args.plot, world)
    tilegen.finalize()
    dist.destroy_process_group()


def plot(rows, impls, path, world):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = [r for r in rows if r["op"] == kind]
        for n in impls:
            pts = [(r["bytes"], r[n + "_busbw"]) for r in rs if n + "_busbw" in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{kind} ({world} ranks)")
        ax.set_xlabel("bytes")
        ax.set_ylabel("busbw GB/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
