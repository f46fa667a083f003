"""tilegen: declarative generator of multi-GPU communication kernels.

One core (tilegen.core: spec loading, the pipeline spec -> lowered -> check -> render, the build,
the runtime) and one package per op family behind its interface (tilegen.core.family):
tilegen.collective, tilegen.overlap (GEMM + communication), tilegen.moe. The cli drives the
pipeline. Importing tilegen (and a generated op) loads only the runtime: the spec machinery
(pydantic, ruamel) loads on first use of KernelSpec / load_spec.
"""
__version__ = "0.1.0"

from .core.group import Group  # noqa: E402
from .core.runtime import (  # noqa: E402
    empty, finalize, free, group, init, is_initialized, rank, world_group, world_size,
)

__all__ = ["KernelSpec", "load_spec", "init", "finalize", "empty", "free", "rank", "world_size", "is_initialized",
           "group", "world_group", "Group", "__version__"]


def __getattr__(name: str):
    if name == "KernelSpec":
        from .core.spec import KernelSpec
        return KernelSpec
    if name == "load_spec":
        from .core.spec_files import load_spec
        return load_spec
    raise AttributeError(f"module 'tilegen' has no attribute {name!r}")
