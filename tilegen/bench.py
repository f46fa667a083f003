"""Benchmarks of generated ops against NCCL (torch.distributed) and torch symmetric memory.

`tilegen bench generated:allreduce_bf16 --out r.json --plot r.png`, launched with
`torchrun --nproc-per-node N -m tilegen.cli bench ...`. Sizes follow nccl-tests (allgather counts
the output, reduce_scatter the input, allreduce/broadcast the buffer, all_to_all one rank's
buffer); times are medians over batches of back-to-back calls between CUDA events, reported as the
slowest rank's; busbw uses nccl-tests' factors. Results are checked against NCCL where it runs.
"""
from __future__ import annotations

import importlib
import json
import statistics

from .registry import OPS

MiB = 1 << 20
DEFAULT_SIZES_KIB = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)


def time_batches(fn, calls: int, reps: int, warmup: int = 5) -> float:
    """Median over `reps` batches of `calls` back-to-back calls, us per call, slowest rank's."""
    import torch
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(calls):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    med = torch.tensor([statistics.median(times)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return med.item()


def busbw_GBps(kind: str, size_bytes: int, us: float, world: int) -> float:
    """nccl-tests' bus bandwidth (the registry holds each op's factor)."""
    return size_bytes / (us * 1e-6) * OPS[kind].busbw(world) / 1e9


def calls_for(size_bytes: int) -> int:
    return 50 if size_bytes <= 16 * MiB else 10


def resolve(ref: str) -> list:
    """'package:op' -> [op]; 'package:*' -> every op of the package."""
    pkg, _, name = ref.partition(":")
    if not name:
        raise ValueError(f"expected package:op or package:* (e.g. generated:allreduce_bf16), got {ref!r}")
    mod = importlib.import_module(pkg)
    return [getattr(mod, n) for n in (mod.OPS if name == "*" else [name])]


def nccl_result(kind: str, x, out, root: int = 0):
    """The op through NCCL (torch.distributed) into `out`, as the registry describes it."""
    import torch.distributed as dist
    desc = OPS[kind]
    if desc.nccl_in_place:
        out.copy_(x.reshape(out.shape))
    desc.nccl(dist, x, out, root)
    return out


def baselines(kind: str, x, out, world: int) -> dict:
    """name -> callable for the reference implementations of one op on input x (outputs like `out`)."""
    import torch
    import torch.distributed as dist
    if dist.get_backend() != "nccl" or OPS[kind].nccl is None:
        return {}
    desc = OPS[kind]
    y = nccl_result(kind, x, torch.empty_like(out))  # sets y up (in-place ops: the input) and warms NCCL
    fns = {"nccl": lambda: desc.nccl(dist, x, y, 0)}  # in-place ops reduce y again each call: timing only
    if kind == "allreduce":  # torch symmetric memory's one-shot / two-shot kernels, the small-message bar
        try:
            import torch.distributed._symmetric_memory as symm_mem
            group = dist.group.WORLD.group_name
            buf = symm_mem.empty(x.numel(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group)
            buf.copy_(x.flatten())
            fns["torch_symm_one_shot"] = lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group)
            fns["torch_symm_two_shot"] = lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group)
        except Exception as e:  # reported, and the table shows n/a
            if dist.get_rank() == 0:
                print(f"torch symmetric memory unavailable: {type(e).__name__}: {e}")
    return fns


def matches_nccl(kind: str, ours, x) -> bool | None:
    import torch
    import torch.distributed as dist
    if dist.get_backend() != "nccl" or OPS[kind].nccl is None:
        return None
    ref = nccl_result(kind, x, torch.empty_like(ours))
    return bool(torch.allclose(ours.float(), ref.float(), rtol=1e-2, atol=1e-2))


def bench_op(op, sizes_kib=DEFAULT_SIZES_KIB, reps: int = 20, bounded_ms: float = 0.0) -> list[dict]:
    """Time `op` and its baselines at each size it accepts; with bounded_ms also the op in bounded
    mode (every wait limited, the call synchronised to read the wait-error record)."""
    import torch
    import torch.distributed as dist
    world = dist.get_world_size()
    kind = op.kind
    inner = 1
    for d in op.inner_shape:
        inner *= d
    dtype = getattr(torch, op.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    k_in, k_out = OPS[kind].in_rows(world), OPS[kind].out_rows(world)
    k_size = k_out if OPS[kind].bench_counts == "out" else k_in  # rows the nccl-tests size counts
    rows = []
    for kib in sizes_kib:
        m = kib * 1024 // (k_size * inner * elem)
        if m < 1 or m > op.max_rows():
            continue
        size = m * k_size * inner * elem
        x = torch.randn((k_in * m,) + op.inner_shape, device="cuda").to(dtype)
        out = op.empty_output(m)
        impls = {op.name: lambda: op(x, out, timeout_ms=0)}
        if bounded_ms:
            impls[op.name + "+bounded"] = lambda: op(x, out, timeout_ms=bounded_ms)
        impls.update(baselines(kind, x, out, world))
        res = {"op": op.name, "kind": kind, "bytes": size, "rows": m, "times_us": {}, "busbw_GBps": {}}
        for name, fn in impls.items():
            us = time_batches(fn, calls_for(size), reps)
            res["times_us"][name] = us
            res["busbw_GBps"][name] = busbw_GBps(kind, size, us, world)
        op(x, out)
        res["matches_nccl"] = matches_nccl(kind, out, x)
        rows.append(res)
        op.free_outputs()
    return rows


def _role(row: dict, impl: str) -> str:
    """Column of an implementation: the row's own op is 'tilegen', baselines keep their names."""
    return impl.replace(row["op"], "tilegen", 1) if impl.startswith(row["op"]) else impl


def format_table(rows: list[dict], world: int, device: str, shared_gpu: bool) -> str:
    rows = [{**r, "times_us": {_role(r, k): v for k, v in r["times_us"].items()},
             "busbw_GBps": {_role(r, k): v for k, v in r["busbw_GBps"].items()}} for r in rows]
    impls = list(dict.fromkeys(n for r in rows for n in r["times_us"]))
    lines = [f"{world} ranks on {device}: median us per call | busbw GB/s"
             + (" -- RANKS SHARE ONE GPU: no baselines, not link bandwidth" if shared_gpu else "")]
    lines.append(f"{'op':<24}{'size MiB':>10}" + "".join(f"{n[:22]:>24}" for n in impls) + f"{'nccl/ours':>10} ok")
    for r in rows:
        cells = "".join(f"{r['times_us'].get(n, float('nan')):>11.1f} |{r['busbw_GBps'].get(n, float('nan')):>9.1f} "
                        for n in impls)
        ratio = r["times_us"]["nccl"] / r["times_us"]["tilegen"] if "nccl" in r["times_us"] else float("nan")
        ok = {True: "yes", False: "NO", None: "-"}[r["matches_nccl"]]
        lines.append(f"{r['op']:<24}{r['bytes'] / MiB:>10.3f}{cells}{ratio:>9.2f}x {ok}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, world: int) -> None:
    from .draw import pyplot
    plt = pyplot()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.4 * len(ops), 3.6), squeeze=False)
    for ax, name in zip(axes[0], ops):
        rs = [r for r in rows if r["op"] == name]
        for impl in dict.fromkeys(n for r in rs for n in r["busbw_GBps"]):
            pts = [(r["bytes"], r["busbw_GBps"][impl]) for r in rs if impl in r["busbw_GBps"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{name} ({world} ranks)", fontsize=9)
        ax.set_xlabel("bytes (nccl-tests convention)")
        ax.set_ylabel("busbw GB/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(refs: list[str], sizes_kib=DEFAULT_SIZES_KIB, reps: int = 20, out: str | None = None,
        plot_path: str | None = None, bounded_ms: float = 0.0) -> int:
    """Entry point of `tilegen bench` (under torchrun)."""
    import torch
    import torch.distributed as dist

    import tilegen
    rank, world = tilegen.init()
    rows = []
    for ref in refs:
        for op in resolve(ref):
            rows += bench_op(op, sizes_kib, reps, bounded_ms)
    if rank == 0:
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
        print(format_table(rows, world, device, dist.get_backend() != "nccl"))
        if out:
            with open(out, "w") as f:
                json.dump({"device": device, "world": world, "backend": dist.get_backend(), "rows": rows}, f, indent=2)
        if plot_path:
            plot(rows, plot_path, world)
    tilegen.finalize()
    dist.destroy_process_group()
    return 0
