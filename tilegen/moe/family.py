"""The MoE family: expert-parallel dispatch and combine (op: moe).

Its rows are data-dependent, so it has no schedules: lowered, an op is its symmetric layout at each
world size (MoeSpec.symmetric_bytes, what tilegen/include/tilegen/moe.cuh allocates); checked, the
layout arithmetic and the flag protocol of tilegen.moe.check at each world size.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.family import Family
from .spec import MOE_OPS, MoeSpec

TEMPLATES = (("moe.cu.j2", "{name}.cu"), ("moe_binding.cc.j2", "{name}_binding.cc"), ("moe_op.py.j2", "op.py"))


@dataclass(frozen=True)
class MoeLayout:
    """A MoE op lowered at one world size."""

    world: int
    experts: int
    topk: int
    mode: str
    symmetric_bytes: int


class MoeFamily(Family):
    name = "moe"
    ops = MOE_OPS
    spec_model = MoeSpec
    calibrated = False  # nothing measured to choose between

    def lower(self, spec, world, calibration):
        return MoeLayout(world, spec.experts, spec.topk, spec.mode, spec.symmetric_bytes(world))

    def check(self, spec, lowered, remember):
        from .check import moe_problems
        problems = []
        for lo in lowered:
            question = f"moe|{lo.world}|{lo.experts}|{lo.topk}|{lo.mode}"
            got = remember(question, lambda: {"problems": list(moe_problems(lo.world, lo.experts, lo.topk, lo.mode))})
            if got["problems"]:
                problems.append(f"world {lo.world}: the MoE check failed:\n" + "\n".join(got["problems"][:10]))
        return problems

    def templates(self, spec):
        return TEMPLATES

    def context(self, spec, lowered):
        from .render import moe_context
        return moe_context(spec)

    def manifest(self, spec, lowered):
        return {"moe": {"mode": spec.mode, "experts": spec.experts, "topk": spec.topk,
                        "dispatch_dtype": spec.dispatch_dtype or spec.dtype, "fp8_group": spec.fp8_group,
                        "symmetric_bytes": {str(lo.world): lo.symmetric_bytes for lo in lowered},
                        "checked": "tilegen.moe.check: check_moe (push token) + check_moe_protocol at every world "
                                   "size"}}

    def summary(self, spec, lowered):
        return f"{spec.mode}: top-{spec.topk} of {spec.experts} experts"

    def describe(self, spec, world, calibration, svg=None):
        from .check import moe_problems
        s = spec
        tokens, hidden = s.max_shape
        into = ("rows per local expert, source, token, slot" if s.mode == "normal"
                else f"fixed segments of {tokens} rows per (local expert, source)")
        wait = "wait for the counts on the host, " if s.mode == "normal" else ""
        problems = moe_problems(world, s.experts, s.topk, s.mode)
        lines = [
            f"op {s.name}: moe {s.dtype}, {s.mode} mode, world {world}: {s.experts} experts, "
            f"{s.experts // world} per rank, top-{s.topk}, up to {tokens} tokens of {hidden} per rank",
            f"  dispatch: route, push each token once per destination rank into its staging segment there, "
            f"{wait}expand into {into}",
            "  combine: per staging row, the weighted sum of its local items (fp32, slot order) sent back in "
            f"{s.dtype}; each token's rank sums them in rank order",
            f"  symmetric memory: {s.symmetric_bytes(world)} bytes",
            "MoE check (layout, random/dropped/one-expert/sparse routings, flag protocol over 3 calls): "
            + ("ok" if not problems else "FAILED\n  " + "\n  ".join(problems[:10])),
        ]
        return "\n".join(lines), not problems


FAMILY = MoeFamily()
