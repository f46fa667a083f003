"""The names a spec config imports: ``from tilegen.spec import KernelSpec, DynamicDim, ShardedDim``
(tilegen.core.spec and spec_files define them; the op families define the fields each op takes)."""
from .core.spec import DynamicDim, KernelSpec, ShardedDim
from .core.spec_files import load_spec

__all__ = ["DynamicDim", "KernelSpec", "ShardedDim", "load_spec"]
