"""An allreduce with max, forced onto the bidirectional ring with one signal per chunk (barrier):
covers the ring schedules, chunk-level signalling and max on the GPU tests' two ranks."""
from tilegen.spec import DynamicDim, KernelSpec

SPEC = KernelSpec(
    name="allreduce_f32_max_ring",
    op="allreduce",
    dtype="f32",
    reduce="max",
    world_sizes=[2, 4, 8],
    shape=[DynamicDim(name="m", max=4096), 999],
    schedule="bidir_ring",
    sync="barrier",
    tile_bytes=65536,
    ctas=32,
    threads=256,
)
