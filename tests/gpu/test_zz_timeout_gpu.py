"""Bounded waits: runs last (the op it uses is unusable on rank 0 afterwards)."""
import pytest
import torch
import torch.distributed as dist

from .test_allgather_gpu import _ops, _random


def test_bounded_wait_reports_a_missing_peer(dist_env):
    """Rank 0 calls, rank 1 skips its call: rank 0 gets a TimeoutError naming rank and signal, no hang.

    Runs last: the op is unusable on rank 0 afterwards (its epochs no longer match rank 1's)."""
    rank, world = dist_env
    _, op = _ops()
    x = _random((4, 1001), torch.float16, seed=5)
    out = op.empty_output(4)
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        import time
        t0 = time.monotonic()
        # small messages take the LL schedule (flags in the data), larger ones wait on the entry signal
        with pytest.raises(TimeoutError, match=r"rank 0 timed out .* waiting for (entry signal 1 >= \d+|the LL lines "
                                                r"of scratch slot 1 to hold flag \d+)"):
            op(x, out, timeout_ms=300)
        assert time.monotonic() - t0 < 30
        with pytest.raises(RuntimeError, match="timed out"):
            op(x, out)
    dist.barrier()
