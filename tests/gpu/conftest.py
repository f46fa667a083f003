"""GPU tests run under torchrun (python3 -m bench tests): every rank runs the same tests in the same order.

Without torch (CI) they are not collected; without torchrun/GPUs they are skipped."""
import os

import pytest

try:
    import torch
except ImportError:  # CPU-only machine: nothing here can run
    torch = None

collect_ignore_glob = ["test_*.py"] if torch is None else []


# The GPU modules in the order every rank runs them. The bounded-wait tests go last: the ops they
# use are unusable on rank 0 afterwards. A module not named here runs before them.
GPU_ORDER = ("test_allgather_gpu", "test_collectives_gpu", "test_epilogue_gpu", "test_downstream_gpu", "test_gemm_gpu",
             "test_matrix_gpu", "test_moe_gpu", "test_groups_gpu", "test_timeout_gpu")


def gpu_order(items):
    """`items` sorted by GPU_ORDER (stably: the tests of a module keep their order)."""
    last = GPU_ORDER.index("test_timeout_gpu")

    def rank(item):
        name = os.path.splitext(os.path.basename(str(item.fspath)))[0]
        return GPU_ORDER.index(name) if name in GPU_ORDER else last - 0.5
    return sorted(items, key=rank)


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if "tests/gpu" in str(item.fspath).replace(os.sep, "/")]
    if gpu:
        first = items.index(gpu[0])
        others = [item for item in items if item not in gpu]
        items[:] = others[:first] + gpu_order(gpu) + others[first:]
    runnable = torch is not None and "WORLD_SIZE" in os.environ and torch.cuda.is_available()
    for item in items:
        if "tests/gpu" not in str(item.fspath).replace(os.sep, "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        if not runnable:
            item.add_marker(pytest.mark.skip(reason="needs GPUs and torchrun (python3 -m bench tests)"))


@pytest.fixture(scope="session")
def dist_env():
    import tilegen
    rank, world = tilegen.init()
    yield rank, world
    tilegen.finalize()
    import torch.distributed as dist
    dist.destroy_process_group()


_failed_here = set()  # this rank's failed GPU tests (node ids)


def pytest_runtest_logreport(report):
    """A GPU test that fails on one rank often leaves the others waiting in a collective (the suite then
    hangs until the lab step's time limit, and pytest's summary is never printed): write the failure to the
    log as it happens, with the rank; at the test's end, see that every rank finished it too."""
    if "tests/gpu" not in report.nodeid.replace(os.sep, "/"):
        return
    if report.failed:
        import sys
        _failed_here.add(report.nodeid)
        sys.stderr.write(f"\nFAILED (rank {os.environ.get('RANK', '?')}, {report.when}) {report.nodeid}:\n"
                         f"{report.longreprtext[-4000:]}\n")
        sys.stderr.flush()
    if report.when == "teardown":
        _count_finished(report.nodeid)


def _count_finished(nodeid):
    """Every rank counts the test as finished in the process group's store; a rank where it failed waits
    (GPU_TEST_STRAND_S, default 90 s) for all to finish it. Ranks still inside it wait in a kernel for
    a call this rank skipped: end the run (torchrun then stops every rank) rather than hang."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    from torch.distributed.distributed_c10d import _get_default_store
    import sys
    import time
    store, world = _get_default_store(), dist.get_world_size()
    key = f"tilegen-test-finished/{nodeid}"
    done = store.add(key, 1)
    if nodeid not in _failed_here:
        return
    deadline = time.monotonic() + float(os.environ.get("GPU_TEST_STRAND_S", "90"))
    while done < world and time.monotonic() < deadline:
        time.sleep(0.5)
        done = store.add(key, 0)
    if done < world:
        sys.stderr.write(f"\nrank {os.environ.get('RANK', '?')}: {world - done} rank(s) never finished {nodeid}, "
                         f"which failed here (they wait for a call this rank skipped): ending the run\n")
        sys.stderr.flush()
        os._exit(3)
