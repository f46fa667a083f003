"""The pipeline: spec -> plan -> check -> render. Code is rendered only from plans the checker
accepted; `tilegen generate` and `tilegen plan` both come through here.
"""
from __future__ import annotations

from functools import lru_cache

from .check import Verdict, check_schedule
from .codegen import CodegenError, render_op, render_package_files
from .ir import Schedule
from .plan import Plan, plan, spare_sms
from .registry import OPS, compute_order
from .spec import KernelSpec, LoadedSpec


@lru_cache(maxsize=None)
def verdict_of(s: Schedule, op: str = "", spare: int | None = None) -> Verdict:
    """The checker's verdict on a schedule (schedules are immutable values: check each once), with
    the compute stream of a GEMM op: consuming gathered chunks (ag_gemm) or producing inputs (gemm_rs),
    on the SMs the communication kernel leaves free (``spare``, see plan.spare_sms)."""
    if not op or OPS[op].gemm is None:
        return check_schedule(s)
    orders = tuple(compute_order(op, s, r) for r in range(s.world))
    return check_schedule(s, compute_orders=orders, produces=OPS[op].gemm == "produce", spare_sms=spare)


def plan_verdicts(p: Plan) -> list[Verdict]:
    """The verdict on every variant of a plan."""
    return [verdict_of(v.schedule, p.spec.op, spare_sms(p.spec, v.ctas)) for v in p.variants]


def checked_plans(spec: KernelSpec, calibration: dict | None = None, check: bool = True) -> list[Plan]:
    """Plan every world size and refuse a schedule the checker rejects (check=False: plan only, for
    tests of the renderer itself)."""
    plans = []
    for w in spec.world_sizes:
        p = plan(spec, w, calibration)
        for v in p.variants:
            s = v.schedule
            for r, steps in enumerate(s.ranks):  # the kernel reads only its own rank's memory (push schedules)
                if any(g.rank != r for st in steps for g in st.srcs):
                    raise CodegenError(f"{spec.name}: world {w}: {s.algorithm} reads another rank's memory")
        if check:
            for v, verdict in zip(p.variants, plan_verdicts(p)):
                if not verdict.ok:
                    raise CodegenError(f"{spec.name}: world {w}: the checker rejected the {v.schedule.algorithm} "
                                       f"schedule:\n{verdict}")
        plans.append(p)
    return plans


def generate_op(spec: KernelSpec, nvshmem_headers: str | None, calibration: dict | None = None,
                check: bool = True) -> dict[str, str]:
    """All files of one op (relative to its directory), from checked plans."""
    return render_op(spec, checked_plans(spec, calibration, check), nvshmem_headers, calibration)


def generate_package(specs: list[LoadedSpec], package: str, nvshmem_headers: str | None,
                     calibration: dict | None = None) -> dict[str, str]:
    """Every file of a generated package, relative to its root."""
    ops = {ls.spec.name: generate_op(ls.spec, nvshmem_headers, calibration) for ls in specs}
    return render_package_files(ops, package)
