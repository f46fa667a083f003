"""Timing helpers shared by the benchmark scripts (run under torchrun)."""
import statistics

import torch
import torch.distributed as dist

MiB = 1 << 20
# nccl-tests' bus-bandwidth factors (size: AG output, RS input, AR/BC buffer, A2A per-rank buffer)
BUSBW = {"allgather": lambda w: (w - 1) / w, "reduce_scatter": lambda w: (w - 1) / w,
         "allreduce": lambda w: 2 * (w - 1) / w, "all_to_all": lambda w: (w - 1) / w, "broadcast": lambda w: 1.0}


def time_batches(fn, calls, reps, warmup=5):
    """Median over `reps` batches of `calls` back-to-back calls timed with CUDA events, in us per
    call; every rank returns the slowest rank's median (a collective ends when its last rank does)."""
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


def busbw_GBps(kind, size_bytes, us, world):
    return size_bytes / (us * 1e-6) * BUSBW[kind](world) / 1e9


def calls_for(size_bytes):
    return 50 if size_bytes <= 16 * MiB else 10
