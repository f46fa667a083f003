"""The overlap family's rendering: the collective's context with the GEMM's (its compute stream or
fused CUTLASS kernel) and the copy-engine choices the op runs by."""
from __future__ import annotations

from .spec import GemmSpec

CUTLASS_TYPES = {"bf16": "cutlass::bfloat16_t", "f16": "cutlass::half_t"}


def fused_gemm_context(spec: GemmSpec) -> dict:
    m, n, k = spec.gemm_tile_shape
    cm, cn = spec.gemm_cluster_shape
    stages = 0 if spec.stages == "auto" else spec.stages
    return {"tile_m": m, "tile_n": n, "tile_k": k, "cluster_m": cm, "cluster_n": cn, "stages": stages,
            "stages_text": str(spec.stages), "pingpong": spec.gemm_schedule == "pingpong",
            "cutlass_type": CUTLASS_TYPES[spec.dtype]}


def copy_engine_record(spec: GemmSpec, lowered: list) -> dict | None:
    """A copy-engine op's (style, splits) choices, from its lowering (GemmPlan): the default and, per
    world size, (largest m, style, splits) rows (none: the default at every size)."""
    if spec.overlap_style != "copy_engine":
        return None
    return {"default": list(lowered[0].ce_default),
            "choices": {g.world: [list(r) for r in g.ce_choices] for g in lowered}}
