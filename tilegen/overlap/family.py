"""The overlap family: ag_gemm and gemm_rs, a GEMM overlapped with the collective that feeds it or
takes its output. It extends the collective family: the decomposed and fused styles run a
collective's kernel (its schedules with the compute stream's signals), the copy-engine style runs
a program of copies and GEMMs on streams (tilegen.overlap.ce_program).

Lowered: per world size, the collective's Plan (with each rank's compute order) and the copy-engine
(style, splits) choices by size from the calibration. Checked: the schedules with the compute
stream on the SMs left to it, and the copy-engine programs in every style.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..collective.family import TEMPLATES, CollectiveFamily
from ..collective.ops import GEMM_OPS, OPS
from ..collective.plan import Plan
from ..core.verdict import entry, from_entry
from .spec import GemmSpec

FUSED_GEMM_TEMPLATE = ("fused_gemm.cu.j2", "{name}_gemm.cu")  # the CUTLASS kernel of a fused op


@dataclass(frozen=True)
class GemmPlan:
    """A GEMM op lowered at one world size."""

    plan: Plan
    ce_choices: tuple = ()  # copy_engine: (largest m, style, splits) rows, by m; () -> the default
    ce_default: tuple = ()  # copy_engine: the (style, splits) of sizes no row covers

    @property
    def world(self) -> int:
        return self.plan.world


def deterministic_misfits(op: str, g: GemmPlan) -> list[str]:
    """The copy-engine styles a deterministic op's plan would run that are not its one style."""
    from .ce_program import DETERMINISTIC_STYLE
    styles = dict.fromkeys([g.ce_default[0], *(st for _, st, _ in g.ce_choices)])
    return [st for st in styles if st != DETERMINISTIC_STYLE[op]]


class OverlapFamily(CollectiveFamily):
    name = "overlap"
    ops = {k: OPS[k].summary for k in GEMM_OPS}
    spec_model = GemmSpec
    calibrated = True

    def lower(self, spec, world, calibration):
        from ..core.calibration import ce_choices
        from .ce_program import CE_DEFAULT, DETERMINISTIC_STYLE
        ce = spec.overlap_style == "copy_engine"
        choices, default = (tuple(ce_choices(calibration, spec.op, world)), CE_DEFAULT[spec.op]) if ce else ((), ())
        if ce and spec.deterministic:  # one style at every size, the measured splits kept (they split rows only)
            style = DETERMINISTIC_STYLE[spec.op]
            choices, default = tuple((top, style, sp) for top, _, sp in choices), (style, default[1])
        return GemmPlan(super().lower(spec, world, calibration), choices, default)

    def check(self, spec, lowered, remember):
        from .ce_program import DETERMINISTIC_STYLE
        from .check import copy_engine_verdict
        problems = super().check(spec, [g.plan for g in lowered], remember)
        if spec.overlap_style == "copy_engine":
            for g in lowered:
                if spec.deterministic:
                    problems += [f"world {g.world}: copy-engine style {st} is not deterministic (it takes "
                                 f"{DETERMINISTIC_STYLE[spec.op]} only)" for st in deterministic_misfits(spec.op, g)]
                question = f"copy_engine|{spec.op}|{g.world}"
                verdict = from_entry(remember(question, lambda: entry(copy_engine_verdict(spec.op, g.world))))
                if not verdict.ok:
                    problems.append(f"world {g.world}: the checker rejected the copy-engine program:\n{verdict}")
        return problems

    def templates(self, spec):
        return TEMPLATES + ((FUSED_GEMM_TEMPLATE,) if spec.fused else ())

    def context(self, spec, lowered):
        from .render import copy_engine_record, fused_gemm_context
        gemm = lowered[0].plan.op.gemm
        ce = copy_engine_record(spec, lowered)
        return {**super().context(spec, [g.plan for g in lowered]),
                "gemm": True, "gemm_ag": gemm == "consume", "gemm_rs": gemm == "produce",
                "gemm_nk": [(w, spec.gemm_nk(w)) for w in spec.world_sizes], "fused": spec.fused,
                "overlap": spec.overlap_style, "fg": fused_gemm_context(spec) if spec.fused else None,
                "b_layout_kn": spec.b_layout == "kn", "runtime_module": "tilegen.overlap.runtime",
                "runtime_class": "GemmRsOp" if gemm == "produce" else "AgGemmOp",
                "ce_choices": repr({w: tuple(map(tuple, rows)) for w, rows in ce["choices"].items()}) if ce else None}

    def manifest(self, spec, lowered):
        from ..core.toolchain import gemm_flags
        from .render import copy_engine_record
        ce = copy_engine_record(spec, lowered)
        return {
            **super().manifest(spec, [g.plan for g in lowered]),
            "overlap": spec.overlap_style,
            "fused_gemm": ({"file": f"{spec.name}_gemm.cu", "library": "CUTLASS (nvidia-cutlass headers)",
                            "kernel": ("KernelTmaWarpSpecializedPingpong" if spec.gemm_schedule == "pingpong"
                                       else "KernelTmaWarpSpecializedCooperative") + " + tilegen ChunkScheduler",
                            "tile": list(spec.gemm_tile_shape), "cluster": list(spec.gemm_cluster_shape),
                            "stages": spec.stages, "nvcc_flags": gemm_flags(spec.arch)} if spec.fused else None),
            "copy_engine": ({"default": ce["default"], "choices": {str(w): rows for w, rows in ce["choices"].items()}}
                            if ce else None),
        }

    def summary(self, spec, lowered):
        if spec.overlap_style == "copy_engine":
            return f"copy_engine: {', '.join(str(g.world) for g in lowered)}"
        return f"{spec.overlap_style}: " + super().summary(spec, [g.plan for g in lowered])

    def describe(self, spec, world, calibration, svg=None):
        from .check import copy_engine_verdict
        text, ok = super().describe(spec, world, calibration, svg)
        if spec.overlap_style == "copy_engine":
            verdict = copy_engine_verdict(spec.op, world)
            text += f"\ncopy-engine program (the overlap this op runs): {verdict}"
            ok &= verdict.ok
        return text, ok


FAMILY = OverlapFamily()
