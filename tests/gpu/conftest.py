"""GPU tests run under torchrun (tools/gpu_check.sh): every rank runs the same tests in the same order.

Without torch (CI) they are not collected; without torchrun/GPUs they are skipped."""
import os

import pytest

try:
    import torch
except ImportError:  # CPU-only machine: nothing here can run
    torch = None

collect_ignore_glob = ["test_*.py"] if torch is None else []


def pytest_collection_modifyitems(config, items):
    runnable = torch is not None and "WORLD_SIZE" in os.environ and torch.cuda.is_available()
    for item in items:
        if "tests/gpu" not in str(item.fspath).replace(os.sep, "/"):
            continue
        item.add_marker(pytest.mark.gpu)
        if not runnable:
            item.add_marker(pytest.mark.skip(reason="needs GPUs and torchrun (tools/gpu_check.sh)"))


@pytest.fixture(scope="session")
def dist_env():
    import tilegen
    rank, world = tilegen.init()
    yield rank, world
    tilegen.finalize()
    import torch.distributed as dist
    dist.destroy_process_group()


def pytest_runtest_logreport(report):
    """A GPU test that fails on one rank often leaves the others waiting in a collective (the suite then
    hangs until gpu_check's timeout, and pytest's summary is never printed): write the failure to the
    log as it happens, with the rank."""
    if report.failed and "tests/gpu" in report.nodeid.replace(os.sep, "/"):
        import sys
        sys.stderr.write(f"\nFAILED (rank {os.environ.get('RANK', '?')}, {report.when}) {report.nodeid}:\n"
                         f"{report.longreprtext[-4000:]}\n")
        sys.stderr.flush()
