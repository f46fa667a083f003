"""The collective family: allgather, reduce_scatter, allreduce, all_to_all, broadcast, reduce.

Lowered: one Plan per world size (tilegen.collective.plan), its variants' schedules with the sizes
they run at. Checked: every variant's schedule by the simulation of tilegen.collective.check.
"""
from __future__ import annotations

from ..core.family import Family
from ..core.verdict import entry, from_entry
from .ops import COLLECTIVE_OPS, OPS
from .spec import CollectiveSpec

TEMPLATES = (("collective.cu.j2", "{name}.cu"), ("steps.inc.j2", "{name}_steps.inc"),
             ("binding.cc.j2", "{name}_binding.cc"), ("op.py.j2", "op.py"))


class CollectiveFamily(Family):
    name = "collective"
    ops = {k: OPS[k].summary for k in COLLECTIVE_OPS}
    spec_model = CollectiveSpec
    calibrated = True

    def lower(self, spec, world, calibration):
        from .plan import plan
        return plan(spec, world, calibration)

    def check(self, spec, lowered, remember):
        from .check import verdict_of
        from .ops import order_problems
        problems = []
        for p in lowered:
            for v in p.variants:
                s = v.schedule
                # the kernel reads only its own rank's memory (push schedules)
                if any(g.rank != r for r, steps in enumerate(s.ranks) for st in steps for g in st.srcs):
                    problems.append(f"world {p.world}: {s.algorithm} reads another rank's memory")
                    continue
                if spec.deterministic and spec.order_matters:
                    problems += [f"world {p.world}: {s.algorithm} is not deterministic: {e}"
                                 for e in order_problems(spec.op, s)]
                barrier = spec.epilogue is not None  # (its CTAs all resident: a cooperative launch)
                question = f"schedule|{spec.op}|{v.spare_sms}|{'grid barrier|' if barrier else ''}{s!r}"
                verdict = from_entry(remember(question, lambda: entry(verdict_of(s, spec.op, v.spare_sms, barrier))))
                if not verdict.ok:
                    problems.append(f"world {p.world}: the checker rejected the {s.algorithm} schedule:\n{verdict}")
        return problems

    def templates(self, spec):
        return TEMPLATES

    def context(self, spec, lowered):
        from .render import render_context
        return render_context(spec, lowered)

    def manifest(self, spec, lowered):
        return {"plans": {str(p.world): [{"max_in_bytes": v.max_bytes, "algorithm": v.schedule.algorithm,
                                          "parts": v.schedule.parts, "ctas": v.ctas, "tile_bytes": v.tile_bytes,
                                          "reason": v.reason} for v in p.variants]
                          for p in lowered}}

    def summary(self, spec, lowered):
        return ", ".join(f"{p.world}: {'/'.join(v.schedule.algorithm for v in p.variants)}" for p in lowered)

    def describe(self, spec, world, calibration, svg=None):
        from .check import verdict_of
        from .plan import format_plan, plan
        p = plan(spec, world, calibration)
        lines, ok = [format_plan(p)], True
        for i, v in enumerate(p.variants):
            verdict = verdict_of(v.schedule, spec.op, v.spare_sms, spec.epilogue is not None)
            lines.append(f"variant {i}: {verdict}")
            ok &= verdict.ok
        if svg:  # (path, shard bytes or None)
            from ..draw import draw_plan
            draw_plan(p, svg[0], shard_bytes=svg[1])
            lines.append(f"wrote {svg[0]}")
        return "\n".join(lines), ok


FAMILY = CollectiveFamily()
