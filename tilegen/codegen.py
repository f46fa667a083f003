"""Stage 4: code generation (model -> render context -> files).

Sources are rendered from jinja2 templates under templates/ and written through one FileManager
that only touches files whose content changed, so builds downstream stay incremental. Output is
deterministic: no timestamps, no absolute paths, sorted JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2

from . import __version__
from .check import check_schedule
from .plan import (MIN_TILE_BYTES, OPS, Plan, Schedule, Seg, Step, arrival_order, comm_kind, layout, plan,
                   production_order, spare_sms, tile_bytes_for)
from .spec import IO_SHARDS, DynamicDim, KernelSpec, LoadedSpec, ShardedDim

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
DEVICE_HEADERS = ("device/tilegen/chunk_sync.cuh", "device/tilegen/device.cuh", "device/tilegen/fused_gemm.cuh")
_COLLECTIVE = (("collective.cu.j2", "{name}.cu"), ("binding.cc.j2", "{name}_binding.cc"), ("op.py.j2", "op.py"))
OP_TEMPLATES = {kind: _COLLECTIVE for kind in list(OPS) + ["ag_gemm", "gemm_rs"]}  # op kind -> (template, file)
FUSED_GEMM_TEMPLATE = ("fused_gemm.cu.j2", "{name}_gemm.cu")  # fused GEMM ops: the CUTLASS kernel
CUTLASS_TYPES = {"bf16": "cutlass::bfloat16_t", "f16": "cutlass::half_t"}
STEP_KIND = {"entry": 0, "move": 1, "wait": 2}
BUF_CODE = {"in": 0, "out": 1, "scr": 2}
REDUCE_CODE = {"sum": 0, "max": 1, "min": 2}
DL_CODES = {"bf16": (4, 16), "f16": (2, 16), "f32": (2, 32), "i32": (0, 32), "u8": (1, 8)}


class CodegenError(Exception):
    pass


@dataclass
class FileManager:
    """Writes files atomically, and only when their content changed."""

    root: Path
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)

    def write(self, rel: str | Path, content: str) -> Path:
        path = self.root / rel
        data = content.encode()
        if path.exists() and path.read_bytes() == data:
            self.unchanged.append(path)
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)  # readers see the old or the new file, never half of one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.written.append(path)
        return path


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def op_templates(spec: KernelSpec) -> tuple[tuple[str, str], ...]:
    return OP_TEMPLATES[spec.op] + ((FUSED_GEMM_TEMPLATE,) if spec.fused else ())


def template_files(spec: KernelSpec) -> list[str]:
    return sorted([t for t, _ in op_templates(spec)] + list(DEVICE_HEADERS))


def template_hash(spec: KernelSpec) -> str:
    h = hashlib.sha256()
    for rel in template_files(spec):
        h.update(rel.encode() + b"\0" + (TEMPLATES_DIR / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _mask(ranks) -> int:
    m = 0
    for r in ranks:
        m |= 1 << r
    return m


def _segs(segs: tuple[Seg, ...]) -> str:
    return "{ " + ", ".join(f"{{ {g.rank}, {BUF_CODE[g.buf]}, {g.slot} }}" for g in segs) + " }" if segs else "{}"


def encode_step(st: Step) -> str:
    """C++ aggregate of a StepDesc (templates/collective.cu.j2)."""
    return (f"{{ {STEP_KIND[st.kind]}, {len(st.srcs)}, {len(st.dests)}, {len(st.waits)}, {st.unit}, "
            f"{_mask(st.notify)}u, {_mask(st.await_ranks)}u, {_segs(st.srcs)}, {_segs(st.dests)}, {_segs(st.waits)} }}")


def step_table(s: Schedule) -> list[list[str]]:
    return [[encode_step(st) for st in steps] for steps in s.ranks]


def compute_order(op: str, s: Schedule, rank: int) -> tuple[int, ...]:
    return arrival_order(s, rank) if op == "ag_gemm" else production_order(s, rank)


@lru_cache(maxsize=None)
def verdict_of(s: Schedule, op: str = "", spare: int | None = None):
    """The checker's verdict on a schedule (schedules are immutable values: check each once), with
    the compute stream of a GEMM op: consuming gathered chunks (ag_gemm) or producing inputs (gemm_rs),
    on the SMs the communication kernel leaves free (``spare``, see plan.spare_sms)."""
    if op not in ("ag_gemm", "gemm_rs"):
        return check_schedule(s)
    orders = tuple(compute_order(op, s, r) for r in range(s.world))
    return check_schedule(s, compute_orders=orders, produces=op == "gemm_rs", spare_sms=spare)


def checked_plans(spec: KernelSpec, calibration: dict | None = None, check: bool = True) -> list[Plan]:
    """Plan every world size and refuse to emit code for a schedule the checker rejects
    (check=False: plan only, for tests of the renderer itself)."""
    plans = []
    for w in spec.world_sizes:
        p = plan(spec, w, calibration)
        for v in p.variants:
            s = v.schedule
            for r, steps in enumerate(s.ranks):  # the kernel reads only its own rank's memory (push schedules)
                if any(g.rank != r for st in steps for g in st.srcs):
                    raise CodegenError(f"{spec.name}: world {w}: {s.algorithm} reads another rank's memory")
            if not check:
                continue
            verdict = verdict_of(s, spec.op, spare_sms(spec, v.ctas))
            if not verdict.ok:
                raise CodegenError(f"{spec.name}: world {w}: the checker rejected the {s.algorithm} schedule:\n{verdict}")
        plans.append(p)
    return plans


def _op_id(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:7], 16)


def _dim_text(d) -> str:
    if isinstance(d, DynamicDim):
        return f"{d.name}<={d.max}"
    return f"{d.full}/world" if isinstance(d, ShardedDim) else str(d)


def _shape_text(spec: KernelSpec) -> str:
    return ", ".join(_dim_text(d) for d in spec.shape)


def _max_tiles(spec: KernelSpec, p: Plan) -> int:
    n = 1
    for v in p.variants:
        _, part = layout(v.schedule.op, p.world, v.max_bytes, spec.elem_bytes, v.schedule.parts)
        tile = tile_bytes_for(part, v.tile_bytes, v.ctas)
        n = max(n, -(-part // tile), v.ctas)
    return n + 1


def render_context(spec: KernelSpec, plans: list[Plan]) -> dict:
    worlds = []
    scr_bytes, max_tiles, out_slots, in_slots, scr_slots, max_ctas, stage = 0, 1, 1, 1, 0, 1, 16
    max_src = max_dst = max_wait = max_steps = 1
    out_symmetric = False
    for p in plans:
        variants = []
        for i, v in enumerate(p.variants):
            s = v.schedule
            shard, _ = layout(s.op, p.world, v.max_bytes, spec.elem_bytes, s.parts)
            nscr = s.slots("scr")
            scr_bytes = max(scr_bytes, -(-nscr // s.parts) * shard)
            scr_slots = max(scr_slots, nscr)
            out_slots = max(out_slots, OPS[s.op].out_chunks(p.world) * s.parts)
            in_slots = max(in_slots, OPS[s.op].in_chunks(p.world) * s.parts)
            max_ctas = max(max_ctas, v.ctas)
            max_steps = max(max_steps, s.max_steps)
            for r, steps in enumerate(s.ranks):
                for st in steps:
                    max_src, max_dst, max_wait = max(max_src, len(st.srcs)), max(max_dst, len(st.dests)), max(max_wait, len(st.waits))
                    out_symmetric |= any(d.buf == "out" and d.rank != r for d in st.dests)
            if OPS[s.op].reduces and spec.transport != "nvlink":
                stage = max(stage, v.tile_bytes)
            variants.append({"index": i, "max_bytes": v.max_bytes, "algorithm": s.algorithm, "parts": s.parts,
                             "ctas": v.ctas, "tile_bytes": v.tile_bytes, "nsteps": s.max_steps, "table": step_table(s),
                             "order": [compute_order(spec.op, s, r) for r in range(p.world)]})
        max_tiles = max(max_tiles, _max_tiles(spec, p))
        worlds.append({"world": p.world, "variants": variants})
    code, bits = DL_CODES[spec.dtype]
    alias = {"allgather": "this rank's chunk of the output", "broadcast": "the output"}
    return {
        "tilegen_version": __version__,
        "spec": spec,
        "spec_hash": spec.spec_hash(),
        "shape_text": _shape_text(spec),
        "py_shape": repr([d.model_dump() if isinstance(d, (DynamicDim, ShardedDim)) else d for d in spec.shape]),
        "op_id": _op_id(spec.name),
        "reduces": OPS[comm_kind(spec.op)].reduces,
        "comm_op": comm_kind(spec.op),
        "gemm": spec.op in ("ag_gemm", "gemm_rs"),
        "gemm_ag": spec.op == "ag_gemm",
        "gemm_rs": spec.op == "gemm_rs",
        "gemm_nk": [(w, spec.gemm_nk(w)) for w in spec.world_sizes] if spec.op in ("ag_gemm", "gemm_rs") else [],
        "fused": spec.fused,
        "fg": fused_gemm_context(spec) if spec.fused else None,
        "in_slots": in_slots,
        "comm_shape": [spec.max_shape[0]] + list(spec.comm_inner),
        "reduce_op": REDUCE_CODE[spec.reduce],
        "max_world": max(spec.world_sizes),
        "max_steps": max_steps,
        "max_src": max_src,
        "max_dst": max_dst,
        "max_wait": max_wait,
        "max_tiles": max_tiles,
        "out_slots": out_slots,
        "scr_slots": max(scr_slots, 1),
        "scr_bytes": scr_bytes,
        "stage_bytes": stage,
        "max_ctas": max_ctas,
        "max_variants": max(len(w["variants"]) for w in worlds),
        "max_in_bytes": spec.max_in_bytes(max(spec.world_sizes)),
        "min_tile_bytes": MIN_TILE_BYTES,
        "worlds": worlds,
        "in_world_shards": IO_SHARDS[spec.op][0](2) == 2,
        "out_world_shards": IO_SHARDS[spec.op][1](2) == 2,
        "out_symmetric": out_symmetric,
        "alias_ok": spec.op in alias,
        "alias_what": alias.get(spec.op, ""),
        "dl_code": code,
        "dl_bits": bits,
    }


def fused_gemm_context(spec: KernelSpec) -> dict:
    m, n, k = spec.gemm_tile_shape
    stages = 0 if spec.stages == "auto" else spec.stages
    return {"tile_m": m, "tile_n": n, "tile_k": k, "stages": stages, "stages_text": str(spec.stages),
            "cutlass_type": CUTLASS_TYPES[spec.dtype]}


def gemm_arch(arch: str) -> str:
    """The fused GEMM uses wgmma/TMA: Hopper's arch-specific target (sm_90a)."""
    return arch if arch.endswith("a") else arch + "a"


def nvcc_arch_flags(arch: str) -> list[str]:
    num = re.sub(r"^sm_", "", arch)
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]


def manifest(spec: KernelSpec, plans: list[Plan], files: dict[str, str], nvshmem_headers: str | None,
             calibration: dict | None = None) -> dict:
    """What the sources are and where they came from (toolchain used to build: build.json)."""
    return {
        "tilegen_version": __version__,
        "name": spec.name,
        "op": spec.op,
        "spec": json.loads(spec.canonical_json()),
        "spec_hash": spec.spec_hash(),
        "template_hash": template_hash(spec),
        "templates": template_files(spec),
        "arch": spec.arch,
        "nvcc_flags": ["-O3", "-std=c++17", "-rdc=true"] + nvcc_arch_flags(spec.arch),
        "fused_gemm": ({"file": f"{spec.name}_gemm.cu", "library": "CUTLASS (nvidia-cutlass headers)",
                        "kernel": "KernelTmaWarpSpecializedCooperative + tilegen ChunkScheduler",
                        "tile": list(spec.gemm_tile_shape), "stages": spec.stages,
                        "nvcc_flags": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DTILEGEN_NO_NVSHMEM"]
                        + nvcc_arch_flags(gemm_arch(spec.arch))} if spec.fused else None),
        "nvshmem_headers": nvshmem_headers,
        "calibration": calibration,
        "plans": {str(p.world): [{"max_in_bytes": v.max_bytes, "algorithm": v.schedule.algorithm, "parts": v.schedule.parts,
                                  "ctas": v.ctas, "tile_bytes": v.tile_bytes, "reason": v.reason} for v in p.variants]
                  for p in plans},
        "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())},
    }


def render_op(spec: KernelSpec, nvshmem_headers: str | None, calibration: dict | None = None,
              check: bool = True) -> dict[str, str]:
    """All files of one op, relative to its directory."""
    plans = checked_plans(spec, calibration, check)
    env = _env()
    ctx = render_context(spec, plans)
    files = {}
    for tmpl, pattern in op_templates(spec):
        files[pattern.format(name=spec.name)] = env.get_template(tmpl).render(**ctx)
    files["manifest.json"] = json.dumps(manifest(spec, plans, files, nvshmem_headers, calibration), indent=2,
                                        sort_keys=True) + "\n"
    return files


def render_package(specs: list[LoadedSpec], package: str, nvshmem_headers: str | None,
                   calibration: dict | None = None) -> dict[str, str]:
    """Every file of a generated package, relative to its root."""
    out: dict[str, str] = {}
    names = sorted(ls.spec.name for ls in specs)
    env = _env()
    out["__init__.py"] = env.get_template("package_init.py.j2").render(
        tilegen_version=__version__, ops=names, package=package)
    for rel in DEVICE_HEADERS:
        out[f"_include/{rel.removeprefix('device/')}"] = (TEMPLATES_DIR / rel).read_text()
    for ls in sorted(specs, key=lambda s: s.spec.name):
        for name, text in render_op(ls.spec, nvshmem_headers, calibration).items():
            out[f"{ls.spec.name}/{name}"] = text
    return out


def write_package(files: dict[str, str], root: Path) -> FileManager:
    fm = FileManager(root)
    for rel, text in sorted(files.items()):
        fm.write(rel, text)
    return fm
