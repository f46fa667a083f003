"""Reduce-scatter (min) of f16 through NVSHMEM puts on a ring: reduced tiles are staged and sent
with putmem_signal, the path used where peers are not load/store reachable."""
from tilegen.spec import DynamicDim, KernelSpec

SPEC = KernelSpec(
    name="reduce_scatter_f16_min_nvshmem",
    op="reduce_scatter",
    dtype="f16",
    reduce="min",
    world_sizes=[2, 4, 8],
    shape=[DynamicDim(name="m", max=2048), 1000],
    schedule="ring",
    transport="nvshmem",
    tile_bytes=32768,
    ctas=48,
    threads=256,
)
