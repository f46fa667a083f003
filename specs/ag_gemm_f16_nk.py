"""AllGather+GEMM with B as a torch Linear weight ([n, k]), odd sizes (rows of 1000 halves are not
16-byte multiples), gathered round a ring with one signal per chunk."""
from tilegen.spec import DynamicDim, KernelSpec

SPEC = KernelSpec(
    name="ag_gemm_f16_nk",
    op="ag_gemm",
    dtype="f16",
    world_sizes=[2, 4, 8],
    shape=[DynamicDim(name="m", max=2048), 1000],
    n=999,
    b_layout="nk",
    schedule="ring",
    sync="barrier",
    ctas=8,
    threads=256,
)
