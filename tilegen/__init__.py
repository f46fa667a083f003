"""tilegen: declarative generator of multi-GPU communication kernels.

Stages, one module each: spec -> plan -> check -> codegen -> build -> runtime; cli drives them.
"""
__version__ = "0.1.0"

from .runtime import empty, finalize, free, init, is_initialized, rank, world_size  # noqa: E402
from .spec import KernelSpec, load_spec  # noqa: E402

__all__ = ["KernelSpec", "load_spec", "init", "finalize", "empty", "free", "rank", "world_size", "is_initialized",
           "__version__"]
