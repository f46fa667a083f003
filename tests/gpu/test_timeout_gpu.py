"""Bounded waits: runs last (the ops it uses are unusable on rank 0 afterwards).

Rank 0's calls are made first and checked after a barrier both ranks reach: a failed check on rank 0
must not leave rank 1 waiting in a barrier (the suite would hang instead of reporting it). The
barrier is gloo's (CPU only, bounded): NCCL's waits on the GPU's queued work, so a stream left
waiting by a bounded call would hang it; each rank then checks that its GPU drains."""
import re
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .test_allgather_gpu import _ops, _random


_GLOO = []


def _cpu_barrier() -> None:
    """Every rank here within 60 s, or an error naming the missing ranks (never a hang)."""
    if not _GLOO:
        _GLOO.append(dist.new_group(backend="gloo"))
    dist.monitored_barrier(_GLOO[0], timeout=timedelta(seconds=60))


def _gpu_drains(seconds: float) -> bool:
    """Whether everything queued on this rank's GPU finishes within `seconds` (a thread waits, so a
    stream left waiting forever is reported instead of hanging the test)."""
    done, device = threading.Event(), torch.cuda.current_device()  # (a new thread starts on device 0)
    threading.Thread(target=lambda: (torch.cuda.synchronize(device), done.set()), daemon=True).start()
    return done.wait(seconds)


def _rank0_calls(rank: int, *calls) -> list:
    """On rank 0: each call's exception (or None) and seconds taken; then a barrier on every rank."""
    outcomes = []
    if rank == 0:
        for call in calls:
            t0 = time.monotonic()
            try:
                call()
                outcomes.append((None, time.monotonic() - t0))
            except Exception as e:
                outcomes.append((e, time.monotonic() - t0))
    _cpu_barrier()
    return outcomes


def _check_timed_out_then_refused(outcomes: list, pattern: str) -> None:
    """Rank 0's bounded call raised a TimeoutError matching `pattern` within 30 s, and its next call
    was refused with a message saying an earlier call timed out."""
    (first, seconds), (second, _) = outcomes
    assert isinstance(first, TimeoutError), repr(first)
    assert re.search(pattern, str(first)), str(first)
    assert seconds < 30
    assert isinstance(second, RuntimeError) and "timed out" in str(second), repr(second)


def test_bounded_wait_reports_a_missing_peer(dist_env):
    """Rank 0 calls, rank 1 skips its call: rank 0 gets a TimeoutError naming rank and signal, no hang;
    its next call fails clearly (its epochs no longer match rank 1's)."""
    rank, world = dist_env
    _, op = _ops()
    x = _random((4, 1001), torch.float16, seed=5)
    out = op.empty_output(4)
    # a call on every rank first: loading the op's library is collective (NVSHMEM allocations), so
    # a first call on rank 0 alone would wait in the load for rank 1 (this file run alone hung there)
    op(x, out)
    torch.cuda.synchronize()
    dist.barrier()
    outcomes = _rank0_calls(rank, lambda: op(x, out, timeout_ms=300), lambda: op(x, out))
    if rank == 0:  # small messages take the LL schedule (flags in the data), larger ones wait on the entry signal
        _check_timed_out_then_refused(outcomes, r"rank 0 timed out .* waiting for (entry signal 1 >= \d+|the LL lines "
                                                r"of scratch slot 1 to hold flag \d+)")


def test_copy_engine_overlap_reports_a_missing_peer(dist_env):
    """The copy-engine GEMM op's entry handshake is bounded too: rank 0 calls alone and gets a
    TimeoutError naming the rank it waited for, then a clear error on the next call."""
    import generated
    from ._refs import gemm_operands

    rank, world = dist_env
    op = generated.gemm_rs_bf16_ce
    a, bs = gemm_operands(op, 64, 11)
    try:  # a failure here must still reach the barrier below (or the other rank would wait there)
        op(a[rank], bs[rank])  # loads the op and allocates its buffers on every rank (collective)
        torch.cuda.synchronize()
        setup_error = None
    except Exception as e:
        setup_error = e
    dist.barrier()
    outcomes = _rank0_calls(rank, lambda: op(a[rank], bs[rank], timeout_ms=300), lambda: op(a[rank], bs[rank]))
    drained = _gpu_drains(20)
    _cpu_barrier()
    assert setup_error is None, repr(setup_error)  # checked after the last barrier: no rank is left waiting
    if rank == 0:
        _check_timed_out_then_refused(outcomes, r"rank 0 timed out .* waiting for entry signal 1 >= \d+")
    # At 2 ranks this test once hung: the bounded call's ExternalStream(0).synchronize() returned before
    # the call's waits finished (no TimeoutError), so the next, unbounded, call waited forever. Each rank
    # checks that its GPU drains, so a stream left waiting is named instead of hanging the suite.
    assert drained, f"rank {rank}: the GPU still has queued work 20 s after rank 0's bounded call"


def test_moe_low_latency_dispatch_reports_a_missing_peer(dist_env):
    """Rank 0 dispatches in low-latency mode, the others do not: the expansion (launched early, reading
    each source's head lines as they land) gives up with a TimeoutError naming the first missing rank,
    the call and the epoch its line held, no hang; rank 0's next call is refused."""
    import generated
    from .test_moe_gpu import _ll_expert_fn, _routing, _tokens

    rank, world = dist_env
    op = generated.moe_bf16_ll
    x = _tokens(op, 8, 3 + rank)
    idx, w = _routing(8, op.topk, op.experts, "random", 4 + rank)
    try:  # one call pair on every rank first (loading the op is collective)
        recv, _, h = op.dispatch(x, idx, w)
        op.combine(_ll_expert_fn(recv), h)
        torch.cuda.synchronize()
        setup_error = None
    except Exception as e:
        setup_error = e
    dist.barrier()
    outcomes = _rank0_calls(rank, lambda: op.dispatch(x, idx, w, timeout_ms=300), lambda: op.dispatch(x, idx, w))
    drained = _gpu_drains(20)
    _cpu_barrier()
    assert setup_error is None, repr(setup_error)
    if rank == 0:  # (rank 1's head lines hold the epoch of the last call it made, the pair above)
        _check_timed_out_then_refused(outcomes, r"rank 0 timed out waiting for rank 1's dispatch lines of call \d+ "
                                                r"\(a line held \d+\)")
        called, saw = map(int, re.search(r"of call (\d+) \(a line held (\d+)\)", str(outcomes[0][0])).groups())
        assert saw == called - 1, str(outcomes[0][0])
    assert drained, f"rank {rank}: the GPU still has queued work 20 s after rank 0's bounded call"
