"""Host cost of one eager call of a generated op: the Python wrapper (`op(x, out, timeout_ms=0)`), the
TVM-FFI binding + launch alone (`op.load().run(...)`), and NCCL's call (torch.distributed) beside them.

    torchrun --nproc-per-node 2 bench/scripts/bench_host.py [--op generated:allgather_bf16] [--rows 8] [--out h.json]

Each: `--warmup` calls, then `--calls` back-to-back calls timed with time.perf_counter() up to a
torch.cuda.synchronize() after the last; us per call, median of `--repeats`, slowest rank's. Back-to-back
calls are bounded by the slower of host and GPU: when a call's kernels take longer than its launch, the
launch queue fills and that number is the GPU's. So each is also timed as a burst of `--burst` calls on
an idle GPU, clocked before the synchronize (host time alone: far fewer calls than the launch queue holds).
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import tilegen
from tilegen.bench import nccl_reduce_op, resolve
from tilegen.collective.ops import OPS

NCCL_NAMES = {"allgather": "all_gather_into_tensor", "reduce_scatter": "reduce_scatter_tensor",
              "allreduce": "all_reduce", "all_to_all": "all_to_all_single", "broadcast": "broadcast"}


def slowest(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def per_call_us(fn, calls: int, repeats: int, through_gpu: bool) -> float:
    """us per call of `calls` back-to-back calls on an idle GPU, clocked up to the synchronize after them
    (through_gpu) or before it (what issuing them costs the host); the slowest rank's median."""
    per = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if through_gpu:
            torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) * 1e6 / calls)
        torch.cuda.synchronize()
    return slowest(statistics.median(per))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", default="generated:allgather_bf16", help="package:name")
    ap.add_argument("--rows", type=int, default=8, help="m: rows of a shard (the input is [in_rows * m, *inner])")
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--out", help="results as JSON")
    a = ap.parse_args()

    rank, world = tilegen.init()
    op = resolve(a.op)[0]
    desc = OPS[op.kind]
    x = torch.randn((desc.in_rows(world) * a.rows,) + op.inner_shape, device="cuda").to(getattr(torch, op.dtype))
    out = op.empty_output(a.rows)
    op(x, out, timeout_ms=0)  # loads the op (collective, allocates) before anything is timed
    mod = op.load()
    impls = {op.name: lambda: op(x, out, timeout_ms=0),
             f"{op.name}.mod.run": lambda: mod.run(x, out, 0, 1.0, -1, 0, False),
             # where a binding call's time goes: a TVM-FFI call, one tensor through DLPack, a bare launch
             "ffi call, no tensor (mod.world)": lambda: mod.world(),
             "ffi call, one tensor (mod.is_symmetric)": lambda: mod.is_symmetric(out),
             "torch kernel launch (torch.cuda._sleep(0))": lambda: torch.cuda._sleep(0)}
    if dist.get_backend() == "nccl" and desc.nccl is not None:
        y = torch.empty_like(out)
        if desc.nccl_in_place:
            y.copy_(x.reshape(y.shape))
        red = nccl_reduce_op(op)
        impls[f"nccl.{NCCL_NAMES.get(op.kind, op.kind)}"] = lambda: desc.nccl(dist, x, y, 0, red)
    elif rank == 0:
        print(f"no NCCL comparison (backend {dist.get_backend()})")
    us, burst = {}, {}
    for name, fn in impls.items():
        for _ in range(a.warmup):
            fn()
        us[name] = per_call_us(fn, a.calls, a.repeats, through_gpu=True)
        burst[name] = per_call_us(fn, a.burst, a.repeats, through_gpu=False)
    torch.cuda.synchronize()

    dlpack_api = hasattr(torch.Tensor, "__dlpack_c_exchange_api__")
    shape = "x".join(str(d) for d in (a.rows,) + tuple(op.inner_shape))
    if rank == 0:
        for name in impls:
            print(f"host cost: {name} {shape}: {us[name]:.2f} us per call at {world} ranks "
                  f"(burst of {a.burst} on an idle GPU: {burst[name]:.2f} us per call)")
        print(f"torch.Tensor has __dlpack_c_exchange_api__: {dlpack_api} (torch {torch.__version__}, "
              f"TVM_FFI_DISABLE_TORCH_C_DLPACK={os.environ.get('TVM_FFI_DISABLE_TORCH_C_DLPACK', '')!r})")
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"op": op.name, "kind": op.kind, "rows": a.rows, "inner_shape": list(op.inner_shape),
                           "world": world, "device": torch.cuda.get_device_name(), "backend": dist.get_backend(),
                           "torch": torch.__version__, "dlpack_c_exchange_api": dlpack_api,
                           "TVM_FFI_DISABLE_TORCH_C_DLPACK": os.environ.get("TVM_FFI_DISABLE_TORCH_C_DLPACK"),
                           "calls": a.calls, "repeats": a.repeats, "burst_calls": a.burst,
                           "us_per_call": us, "burst_us_per_call": burst}, f, indent=2)
    tilegen.finalize()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
