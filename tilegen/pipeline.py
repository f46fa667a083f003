"""The pipeline: spec -> plan -> check -> render. Code is rendered only from plans the checker
accepted; `tilegen generate` and `tilegen plan` both come through here.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .check import Verdict, check_copy_engine, check_schedule
from .codegen import CodegenError, render_op, render_package_files
from .ir import Schedule
from .calibration import ce_choices, manifest_record, resolve
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


PACKAGE_DIR = Path(__file__).resolve().parent
# The modules whose verdicts are cached (the schedule checker, the copy-engine and MoE checks);
# what they import from tilegen is found by reading them (semantic_modules).
CHECKERS = ("check", "ce_program", "moe")


def _tilegen_imports(name: str) -> set[str]:
    """The tilegen modules one module imports, anywhere in it (function-level imports too)."""
    tree = ast.parse((PACKAGE_DIR / f"{name}.py").read_bytes())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and mod:
                found.add(mod.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(a.name for a in node.names)
            elif mod.startswith("tilegen."):
                found.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tilegen."))
    return {m for m in found if (PACKAGE_DIR / f"{m}.py").exists()}


def semantic_modules(roots=CHECKERS) -> list[str]:
    """`roots` and every tilegen module they import, transitively: the code a verdict depends on."""
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_tilegen_imports(m) - seen)
    return sorted(seen)


@lru_cache(maxsize=1)
def checker_version() -> str:
    """A hash of the source of every module the checkers' verdicts depend on (the checkers, the op
    registry's expectations, the layout, the schedules, ...): a verdict remembered under other
    sources is checked again."""
    h = hashlib.sha256()
    for m in semantic_modules():
        h.update(f"{m}\0".encode() + (PACKAGE_DIR / f"{m}.py").read_bytes())
    for f in (verdict_of, copy_engine_verdict, moe_problems):  # what this module asks the checkers
        h.update(inspect.getsource(f).encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def generator_version() -> str:
    """A hash of everything in the tilegen package that can shape a generated file: its modules,
    templates, library headers and committed calibrations."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DIR.rglob("*")):
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(f"{f.relative_to(PACKAGE_DIR)}\0".encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


class VerdictCache:
    """What `tilegen generate` remembers beside a generated package (a JSON file), so that a run
    that changes nothing re-checks and re-renders nothing:
    - verdicts: the checker's, keyed by what was checked (a schedule's content with the op and the
      SMs modelled; an op's copy-engine programs; a MoE layout) and checker_version();
    - ops: per op, the key of everything its files are made from (spec, calibration, NVSHMEM
      headers, generator_version()) and the hash of each file written. A hit is served only when
      every file on disk still has that hash; anything else is generated afresh."""

    FORMAT = 2

    def __init__(self, path: Path | None = None, writable: bool = True):
        self.path, self.writable, self.hits, self.misses = path, writable, 0, 0
        self.verdicts: dict[str, dict] = {}
        self.ops: dict[str, dict] = {}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and data.get("format") == self.FORMAT:
                    self.ops = dict(data["ops"])
                    if data.get("checker") == checker_version():  # others can never hit again: dropped
                        self.verdicts = dict(data["verdicts"])
            except (OSError, ValueError, KeyError, TypeError):  # unreadable or half-written: start afresh
                self.verdicts, self.ops = {}, {}
        self._dirty = False

    @staticmethod
    def key(s: Schedule, op: str, spare: int | None) -> str:
        return _sha(f"{checker_version()}|{op}|{spare}|{s!r}")

    def _remembered(self, key: str, compute):
        if key in self.verdicts:
            self.hits += 1
            return self.verdicts[key]
        self.misses += 1
        entry = compute()
        self.verdicts[key] = entry
        self._dirty = True
        return entry

    @staticmethod
    def _entry(v: Verdict) -> dict:
        return {"ok": v.ok, "problems": v.problems, "configs": v.configs, "ops": v.ops}

    def verdict(self, s: Schedule, op: str, spare: int | None) -> Verdict:
        e = self._remembered(self.key(s, op, spare), lambda: self._entry(verdict_of(s, op, spare)))
        return Verdict(e["ok"], e["problems"], e["configs"], e["ops"])

    def copy_engine_verdict(self, op: str, world: int) -> Verdict:
        key = _sha(f"{checker_version()}|copy_engine|{op}|{world}")
        e = self._remembered(key, lambda: self._entry(copy_engine_verdict(op, world)))
        return Verdict(e["ok"], e["problems"], e["configs"], e["ops"])

    def moe_problems(self, world: int, experts: int, topk: int, mode: str) -> tuple[str, ...]:
        key = _sha(f"{checker_version()}|moe|{world}|{experts}|{topk}|{mode}")
        return tuple(self._remembered(key, lambda: {"problems": list(moe_problems(world, experts, topk, mode))})
                     ["problems"])

    def op_files(self, name: str, key: str, root: Path | None) -> dict[str, str] | None:
        """The files remembered for op `name` made from `key`, read back from `root` when every one
        still has the hash it was written with; else None."""
        e = self.ops.get(name)
        if root is None or e is None or e["key"] != key:
            return None
        files = {}
        for rel, digest in e["files"].items():
            try:
                data = (root / name / rel).read_bytes()
            except OSError:
                return None
            if _sha(data) != digest:
                return None
            files[rel] = data.decode()
        self.hits += 1
        return files

    def remember_op(self, name: str, key: str, files: dict[str, str]) -> None:
        self.ops[name] = {"key": key, "files": {rel: _sha(text) for rel, text in sorted(files.items())}}
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self.writable or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".verdicts.")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": self.FORMAT, "checker": checker_version(), "verdicts": self.verdicts,
                       "ops": self.ops}, f, sort_keys=True)
        os.chmod(tmp, 0o644)  # like every file tilegen writes (mkstemp creates 0600)
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
        get = cache.moe_problems if cache is not None else moe_problems
        for w in spec.world_sizes if check else ():
            problems = get(w, spec.experts, spec.topk, spec.moe_mode)
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
                verdict = (cache.copy_engine_verdict if cache is not None else copy_engine_verdict)(spec.op, w)
                if not verdict.ok:
                    raise CodegenError(f"{spec.name}: world {w}: the checker rejected the copy-engine "
                                       f"program:\n{verdict}")
        plans.append(p)
    return plans


def generation_key(spec: KernelSpec, nvshmem_headers: str | None, calibration, check: bool) -> str:
    """Everything an op's files are made from: the spec, the calibration the planner read, the
    NVSHMEM headers named in the manifest, and the generator's (and checker's) own sources."""
    import jinja2
    import pydantic
    record = json.dumps(manifest_record(calibration), sort_keys=True, default=str)
    tools = f"python {sys.version_info[:2]}, jinja2 {jinja2.__version__}, pydantic {pydantic.VERSION}"
    return _sha(f"{generator_version()}|{checker_version()}|{tools}|{check}|{nvshmem_headers}|{record}|"
                f"{spec.canonical_json()}")


def generate_op(spec: KernelSpec, nvshmem_headers: str | None, calibration="auto",
                check: bool = True, cache: VerdictCache | None = None, root: Path | None = None) -> dict[str, str]:
    """All files of one op (relative to its directory), from checked plans. calibration: 'auto' (the
    committed measurements of the spec's arch), None, a path, or loaded (tilegen.calibration).
    With a cache and the package's folder `root`, files made from the same inputs before and
    unchanged there since are read back instead of planned, checked and rendered again."""
    calibration = None if spec.op in MOE_OPS else resolve(calibration, spec.arch)  # MoE: nothing measured to use
    key = generation_key(spec, nvshmem_headers, calibration, check) if cache is not None else ""
    files = cache.op_files(spec.name, key, root) if cache is not None else None
    if files is None:
        files = render_op(spec, checked_plans(spec, calibration, check, cache), nvshmem_headers,
                          manifest_record(calibration),
                          {w: ce_choices(calibration, spec.op, w) for w in spec.world_sizes})
        if cache is not None:
            cache.remember_op(spec.name, key, files)
    return files


def generate_package(specs: list[LoadedSpec], nvshmem_headers: str | None, calibration="auto",
                     cache: VerdictCache | None = None, kept: tuple[str, ...] = (),
                     root: Path | None = None, check: bool = True) -> dict[str, str]:
    """Every file of a generated package, relative to its root; `kept`: ops already in the package
    that this run leaves as they are (its __init__ lists them too); `root`: the package's folder,
    where a cache may find an op's current files; check=False: plan and render only (tests of the
    renderer)."""
    ops = {ls.spec.name: generate_op(ls.spec, nvshmem_headers, calibration, check, cache, root) for ls in specs}
    return render_package_files(ops, kept)
