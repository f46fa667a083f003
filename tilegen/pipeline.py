"""The pipeline: spec -> plan -> check -> render. Code is rendered only from plans the checker
accepted; `tilegen generate` and `tilegen plan` both come through here.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from . import check
from .check import Verdict, check_copy_engine, check_schedule
from .codegen import CodegenError, render_op, render_package_files
from .ir import Schedule
from .calibration import manifest_record, resolve
from .plan import Plan, plan, spare_sms
from .registry import MOE_OPS, OPS, compute_order
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


@lru_cache(maxsize=None)
def copy_engine_verdict(op: str, world: int) -> Verdict:
    """The checker's verdict on the copy-engine overlap's programs (tilegen.ce_program) of a GEMM op."""
    return check_copy_engine(op, world)


@lru_cache(maxsize=1)
def checker_version() -> str:
    """The checker's source: a verdict remembered under another version is checked again."""
    return hashlib.sha256(Path(check.__file__).read_bytes()).hexdigest()[:16]


class VerdictCache:
    """Verdicts remembered across runs (a JSON file beside the generated package), keyed by the
    schedule's content, the op, the SMs modelled and the checker's version: a `tilegen generate`
    that changes nothing re-checks nothing, and a changed spec re-checks only its new schedules."""

    def __init__(self, path: Path | None = None, writable: bool = True):
        self.path, self.writable, self.hits, self.misses = path, writable, 0, 0
        self.entries: dict[str, dict] = {}
        if path is not None and path.exists():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):  # unreadable or half-written: start afresh
                self.entries = {}
        self._dirty = False

    @staticmethod
    def key(s: Schedule, op: str, spare: int | None) -> str:
        return hashlib.sha256(f"{checker_version()}|{op}|{spare}|{s!r}".encode()).hexdigest()

    def verdict(self, s: Schedule, op: str, spare: int | None) -> Verdict:
        k = self.key(s, op, spare)
        if k in self.entries:
            self.hits += 1
            e = self.entries[k]
            return Verdict(e["ok"], e["problems"], e["configs"], e["ops"])
        self.misses += 1
        v = verdict_of(s, op, spare)
        self.entries[k] = {"ok": v.ok, "problems": v.problems, "configs": v.configs, "ops": v.ops}
        self._dirty = True
        return v

    def save(self) -> None:
        if self.path is None or not self.writable or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".verdicts.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f, sort_keys=True)
        os.replace(tmp, self.path)
        self._dirty = False


def plan_verdicts(p: Plan, cache: VerdictCache | None = None) -> list[Verdict]:
    """The verdict on every variant of a plan."""
    get = cache.verdict if cache is not None else verdict_of
    return [get(v.schedule, p.spec.op, spare_sms(p.spec, v.ctas)) for v in p.variants]


@lru_cache(maxsize=None)
def moe_problems(world: int, experts: int, topk: int, mode: str = "normal") -> tuple[str, ...]:
    """tilegen.moe's checks of the layout arithmetic the MoE kernels implement (the deduplicated push
    into staging rows and its expansion; low_latency: the fixed segments it expands into; random /
    dropped / one-expert / sparse routings, 0..max tokens) and of their flag protocol across calls:
    () or the problems. Token counts are small: the arithmetic does not depend on them."""
    from .moe import MoeShape, check_moe, check_moe_protocol
    shape = MoeShape(world, experts, topk, max_tokens=12)
    layout = check_moe(shape, "normal", push="token")
    if mode == "low_latency":
        layout += check_moe(shape, "low_latency")
    return tuple(layout + check_moe_protocol(world, mode))


def checked_plans(spec: KernelSpec, calibration="auto", check: bool = True,
                  cache: VerdictCache | None = None) -> list[Plan]:
    """Plan every world size and refuse a schedule the checker rejects (check=False: plan only, for
    tests of the renderer itself). MoE ops have no schedules: their layout and protocol are checked."""
    if spec.op in MOE_OPS:
        for w in spec.world_sizes if check else ():
            problems = moe_problems(w, spec.experts, spec.topk, spec.moe_mode)
            if problems:
                raise CodegenError(f"{spec.name}: world {w}: the MoE check failed:\n" + "\n".join(problems[:10]))
        return []
    plans = []
    calibration = resolve(calibration, spec.arch)
    for w in spec.world_sizes:
        p = plan(spec, w, calibration)
        for v in p.variants:
            s = v.schedule
            for r, steps in enumerate(s.ranks):  # the kernel reads only its own rank's memory (push schedules)
                if any(g.rank != r for st in steps for g in st.srcs):
                    raise CodegenError(f"{spec.name}: world {w}: {s.algorithm} reads another rank's memory")
        if check:
            for v, verdict in zip(p.variants, plan_verdicts(p, cache)):
                if not verdict.ok:
                    raise CodegenError(f"{spec.name}: world {w}: the checker rejected the {v.schedule.algorithm} "
                                       f"schedule:\n{verdict}")
            if spec.overlap_style == "copy_engine":
                verdict = copy_engine_verdict(spec.op, w)
                if not verdict.ok:
                    raise CodegenError(f"{spec.name}: world {w}: the checker rejected the copy-engine "
                                       f"program:\n{verdict}")
        plans.append(p)
    return plans


def generate_op(spec: KernelSpec, nvshmem_headers: str | None, calibration="auto",
                check: bool = True, cache: VerdictCache | None = None) -> dict[str, str]:
    """All files of one op (relative to its directory), from checked plans. calibration: 'auto' (the
    committed measurements of the spec's arch), None, a path, or loaded (tilegen.calibration)."""
    calibration = None if spec.op in MOE_OPS else resolve(calibration, spec.arch)  # MoE: nothing measured to use
    return render_op(spec, checked_plans(spec, calibration, check, cache), nvshmem_headers,
                     manifest_record(calibration))


def generate_package(specs: list[LoadedSpec], nvshmem_headers: str | None, calibration="auto",
                     cache: VerdictCache | None = None, kept: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file of a generated package, relative to its root; `kept`: ops already in the package
    that this run leaves as they are (its __init__ lists them too)."""
    ops = {ls.spec.name: generate_op(ls.spec, nvshmem_headers, calibration, cache=cache) for ls in specs}
    return render_package_files(ops, kept)
