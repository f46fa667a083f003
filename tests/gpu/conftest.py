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
