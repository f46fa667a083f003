"""The same kind of spec as a Python config: an odd row size (2002 bytes, not a multiple of 16),
NVSHMEM put calls instead of peer stores, and one signal per chunk after all CTAs (barrier)."""
from tilegen.spec import DynamicDim, KernelSpec

SPEC = KernelSpec(
    name="allgather_f16_nvshmem",
    op="allgather",
    dtype="f16",
    world_sizes=[2, 4, 8],
    shape=[DynamicDim(name="m", max=4096), 1001],
    tile_bytes=64 * 1024,
    transport="nvshmem",
    sync="barrier",
    schedule="ring",
    ctas=64,
    threads=256,
    arch="sm_90",
    description="exercises the NVSHMEM lowering, barrier signalling and unaligned rows",
)
