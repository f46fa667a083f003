"""Stage 4: code generation. Renders only: checked plans (tilegen.pipeline) -> render context -> files.

The kernels and the host code live in the library headers (tilegen/include/tilegen, copied into every
generated package); a generated op holds its traits (constants), its step tables (one step per line,
decoded in a comment), the TVM-FFI binding's constants and a Python wrapper. Output is deterministic:
no timestamps, no absolute paths, sorted JSON.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2

from . import __version__
from .ir import Schedule, Seg, Step
from .layout import layout, tile_bytes_for
from .plan import Plan
from .registry import MOE_OPS, OPS, comm_op, compute_order
from .spec import DynamicDim, KernelSpec, ShardedDim
from .ce_program import CE_DEFAULT
from .files import LIBRARY_COPY
from .toolchain import gemm_flags, kernel_flags

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
INCLUDE_DIR = PACKAGE_DIR / "include"
LIBRARY_HEADERS = tuple(sorted(p.relative_to(INCLUDE_DIR).as_posix() for p in (INCLUDE_DIR / "tilegen").iterdir()
                               if p.suffix in (".cuh", ".h")))
OP_TEMPLATES = (("collective.cu.j2", "{name}.cu"), ("steps.inc.j2", "{name}_steps.inc"),
                ("binding.cc.j2", "{name}_binding.cc"), ("op.py.j2", "op.py"))
FUSED_GEMM_TEMPLATE = ("fused_gemm.cu.j2", "{name}_gemm.cu")  # fused GEMM ops: the CUTLASS kernel
MOE_TEMPLATES = (("moe.cu.j2", "{name}.cu"), ("moe_binding.cc.j2", "{name}_binding.cc"), ("moe_op.py.j2", "op.py"))
CUTLASS_TYPES = {"bf16": "cutlass::bfloat16_t", "f16": "cutlass::half_t"}
REDUCE_CODE = {"sum": 0, "max": 1, "min": 2}
DL_CODES = {"bf16": (4, 16), "f16": (2, 16), "f32": (2, 32), "i32": (0, 32), "u8": (1, 8)}
SEG_NAMES = {"in": "In", "out": "Out", "scr": "Scr"}
CHUNKS = {"one": "Chunks::kOne", "per_rank": "Chunks::kPerRank", "split": "Chunks::kSplit"}
GEMM_CODE = {None: "Gemm::kNone", "consume": "Gemm::kConsume", "produce": "Gemm::kProduce"}
ALIAS_CODE = {"none": 0, "whole": 1, "own_chunk": 2}


class CodegenError(Exception):
    pass


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    """One environment per process: it compiles each template once."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["fixed"] = lambda text, width: str(text).ljust(width)  # aligns the decoded-step comments
    return env


def op_templates(spec: KernelSpec) -> tuple[tuple[str, str], ...]:
    if spec.op in MOE_OPS:
        return MOE_TEMPLATES
    return OP_TEMPLATES + ((FUSED_GEMM_TEMPLATE,) if spec.fused else ())


MOE_ONLY_HEADERS = ("tilegen/moe.cuh", "tilegen/moe_binding.h")
MOE_HEADERS = ("tilegen/binding_common.h", "tilegen/device.cuh", "tilegen/host_msg.h") + MOE_ONLY_HEADERS


def op_headers(spec: KernelSpec) -> tuple[str, ...]:
    """The library headers an op's sources include (its build hash covers these, so editing the MoE
    kernels rebuilds the MoE ops only, and the other way round)."""
    if spec.op in MOE_OPS:
        return MOE_HEADERS
    return tuple(h for h in LIBRARY_HEADERS if h not in MOE_ONLY_HEADERS)


def template_files(spec: KernelSpec) -> list[str]:
    return sorted([t for t, _ in op_templates(spec)] + [f"include/{h}" for h in op_headers(spec)])


def template_hash(spec: KernelSpec) -> str:
    return _files_hash(tuple(template_files(spec)))


@lru_cache(maxsize=None)
def _files_hash(rels: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for rel in rels:
        path = PACKAGE_DIR / rel if rel.startswith("include/") else TEMPLATES_DIR / rel
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------ steps
def _mask(ranks) -> str:
    return f"0x{sum(1 << r for r in ranks):x}u"


def _segs(segs: tuple[Seg, ...]) -> str:
    return "{" + ", ".join(f"{SEG_NAMES[g.buf]}({g.rank}, {g.slot})" for g in segs) + "}"


def step_code(st: Step) -> str:
    """A step as the C++ expression that builds it (tilegen/collective.cuh's Step)."""
    if st.kind == "entry":
        return f"St::entry({_mask(st.notify)}, {_mask(st.await_ranks)})"
    if st.kind == "wait":
        return f"St::wait_for({st.unit}, {_segs(st.waits)})"
    return f"St::move({st.unit}, {_segs(st.srcs)}, {_segs(st.dests)}" + (f", {_segs(st.waits)})" if st.waits else ")")


def step_comment(st: Step, rank: int, ll: bool = False) -> str:
    """What a step does, decoded: the comment beside it in the generated table."""
    if st.kind == "entry":
        return f"entry: tell {list(st.notify)}, await {list(st.await_ranks)}"
    waits = ", ".join(str(w) for w in st.waits)
    if st.kind == "wait":
        return f"wait {waits}"
    what = "put" if len(st.srcs) == 1 else "reduce"
    srcs = " + ".join(str(g) for g in st.srcs)
    remote = sorted({d.rank for d in st.dests if d.rank != rank or st.signal_self})
    if ll:
        return (f"{what} unit {st.unit}: {srcs}{' (lines as their flags arrive)' if waits else ''}"
                f" -> {', '.join(str(d) for d in st.dests)}" + (f"; LL lines @{remote}" if remote else ""))
    return (f"{what} unit {st.unit}: {f'(after {waits}) ' if waits else ''}{srcs} -> "
            f"{', '.join(str(d) for d in st.dests)}" + (f"; signal @{remote}" if remote else ""))


def step_lines(s: Schedule) -> list[list[tuple[str, str]]]:
    """(code, comment) of every step, per rank."""
    return [[(step_code(st), step_comment(st, r, s.sync == "ll")) for st in steps] for r, steps in enumerate(s.ranks)]


# ------------------------------------------------------------------------------ contexts
def _op_id(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:7], 16)


def _dim_text(d) -> str:
    if isinstance(d, DynamicDim):
        return f"{d.name}<={d.max}"
    return f"{d.full}/world" if isinstance(d, ShardedDim) else str(d)


def _shape_text(spec: KernelSpec) -> str:
    return ", ".join(_dim_text(d) for d in spec.shape)


@dataclass
class Totals:
    """The most any variant at any world needs: sizes of the traits' arrays and buffers."""

    max_steps: int = 1
    max_src: int = 1
    max_dst: int = 1
    max_wait: int = 1
    max_tiles: int = 1
    out_slots: int = 1
    scr_slots: int = 1
    in_slots: int = 1
    scr_bytes: int = 0
    stage_bytes: int = 16
    max_ctas: int = 1
    out_symmetric: bool = False
    ll_slots: int = 0  # LL scratch: two parity halves of ll_slots slots (include/tilegen/collective.cuh's ll_addr)
    ll_slot_bytes: int = 0

    @property
    def ll_bytes(self) -> int:
        return 2 * self.ll_slots * self.ll_slot_bytes


def ll_line_bytes(part: int) -> int:
    """An LL slot: one 16-byte line per 8 bytes of a part."""
    return 2 * (-(-part // 8) * 8)


def totals(spec: KernelSpec, plans: list[Plan]) -> Totals:
    t = Totals()
    desc = OPS[spec.op]
    for p in plans:
        for v in p.variants:
            s = v.schedule
            shard, part = layout(s.op, p.world, v.max_bytes, spec.elem_bytes, s.parts)
            t.max_steps = max(t.max_steps, s.max_steps)
            for steps in s.ranks:
                for st in steps:
                    t.max_src, t.max_dst = max(t.max_src, len(st.srcs)), max(t.max_dst, len(st.dests))
                    t.max_wait = max(t.max_wait, len(st.waits))
            if s.sync == "ll":  # its own scratch; no signal flags, no staging, nothing stored into peers' outputs
                t.ll_slots = max(t.ll_slots, s.slots("scr"))
                t.ll_slot_bytes = max(t.ll_slot_bytes, ll_line_bytes(part))
                continue
            t.scr_bytes = max(t.scr_bytes, -(-s.slots("scr") // s.parts) * shard)
            t.scr_slots = max(t.scr_slots, s.slots("scr"))
            t.out_slots = max(t.out_slots, desc.out_chunks(p.world) * s.parts)
            t.in_slots = max(t.in_slots, desc.in_chunks(p.world) * s.parts)
            t.max_ctas = max(t.max_ctas, v.ctas)
            t.max_tiles = max(t.max_tiles, -(-part // tile_bytes_for(part, v.tile_bytes, v.ctas)) + 1, v.ctas + 1)
            if desc.reduces and spec.transport != "nvlink":
                t.stage_bytes = max(t.stage_bytes, v.tile_bytes)
            for r, steps in enumerate(s.ranks):
                for st in steps:
                    t.out_symmetric |= any(d.buf == "out" and d.rank != r for d in st.dests)
    return t


def op_traits(spec: KernelSpec, t: Totals) -> list[tuple[str, str, str]]:
    """(C++ type, name, value) of every constant of the op's traits struct."""
    desc = OPS[spec.op]
    b = lambda x: "true" if x else "false"  # noqa: E731
    return [
        ("int", "kOpId", str(_op_id(spec.name))),
        ("int", "kMaxWorld", str(max(spec.world_sizes))),
        ("int", "kMaxSteps", str(t.max_steps)),
        ("int", "kMaxSrc", str(t.max_src)),
        ("int", "kMaxDst", str(t.max_dst)),
        ("int", "kMaxWait", str(t.max_wait)),
        ("int", "kOutSlots", str(t.out_slots)),
        ("int", "kScrSlots", str(t.scr_slots)),
        ("int", "kInSlots", str(t.in_slots)),
        ("int64_t", "kMaxTiles", f"{t.max_tiles}LL"),
        ("int64_t", "kScrBytes", f"{t.scr_bytes}LL"),
        ("int64_t", "kLLBytes", f"{t.ll_bytes}LL"),
        ("int", "kLLSlots", str(t.ll_slots)),
        ("int64_t", "kStageBytes", f"{t.stage_bytes}LL"),
        ("int64_t", "kMaxInBytes", f"{spec.max_in_bytes(max(spec.world_sizes))}LL"),
        ("int", "kThreads", str(spec.threads)),
        ("int", "kMaxCtas", str(t.max_ctas)),
        ("int", "kReduceOp", str(REDUCE_CODE[spec.reduce])),
        ("Chunks", "kChunks", CHUNKS[comm_op(spec.op).chunks]),
        ("Gemm", "kGemm", GEMM_CODE[desc.gemm]),
        ("bool", "kFused", b(spec.fused)),
        ("bool", "kReduces", b(comm_op(spec.op).reduces)),
        ("bool", "kPerTile", b(spec.sync == "per_tile")),
        ("bool", "kAllowPeerPtr", b(spec.transport != "nvshmem")),
        ("bool", "kRequirePeerPtr", b(spec.transport == "nvlink")),
    ]


def render_context(spec: KernelSpec, plans: list[Plan]) -> dict:
    t = totals(spec, plans)
    desc = OPS[spec.op]
    worlds = []
    for p in plans:
        variants = []
        for i, v in enumerate(p.variants):
            s = v.schedule
            variants.append({"index": i, "max_bytes": v.max_bytes, "algorithm": s.algorithm, "parts": s.parts,
                             "ctas": v.ctas, "tile_bytes": v.tile_bytes, "nsteps": s.max_steps, "ranks": step_lines(s),
                             "ll": s.sync == "ll",
                             "order": [compute_order(spec.op, s, r) for r in range(p.world)] if desc.gemm else None})
        worlds.append({"world": p.world, "variants": variants})
    code, bits = DL_CODES[spec.dtype]
    return {
        "tilegen_version": __version__,
        "spec": spec,
        "desc": desc,
        "spec_hash": spec.spec_hash(),
        "shape_text": _shape_text(spec),
        "py_shape": repr([d.model_dump() if isinstance(d, (DynamicDim, ShardedDim)) else d for d in spec.shape]),
        "reduces": comm_op(spec.op).reduces,
        "gemm": desc.gemm is not None,
        "gemm_ag": desc.gemm == "consume",
        "gemm_rs": desc.gemm == "produce",
        "gemm_nk": [(w, spec.gemm_nk(w)) for w in spec.world_sizes] if desc.gemm else [],
        "fused": spec.fused,
        "overlap": spec.overlap_style,
        "fg": fused_gemm_context(spec) if spec.fused else None,
        "traits": op_traits(spec, t),
        "comm_shape": [spec.max_shape[0]] + list(spec.comm_inner),
        "worlds": worlds,
        "in_world_rows": desc.in_rows(2) == 2,
        "out_world_rows": desc.out_rows(2) == 2,
        "out_symmetric": t.out_symmetric,
        "alias_code": ALIAS_CODE[desc.alias],
        "dl_code": code,
        "dl_bits": bits,
    }


def moe_context(spec: KernelSpec) -> dict:
    """MoE ops: the traits of tilegen/moe.cuh's Op and the binding's constants."""
    tokens, hidden = spec.max_shape
    code, bits = DL_CODES[spec.dtype]
    return {
        "tilegen_version": __version__,
        "spec": spec,
        "spec_hash": spec.spec_hash(),
        "shape_text": _shape_text(spec),
        "py_shape": repr([d.model_dump() if isinstance(d, DynamicDim) else d for d in spec.shape]),
        "hidden": hidden,
        "max_tokens": tokens,
        "traits": [("int", "kOpId", str(_op_id(spec.name))), ("int", "kMaxWorld", str(max(spec.world_sizes))),
                   ("int", "kExperts", str(spec.experts)), ("int", "kTopk", str(spec.topk)),
                   ("int64_t", "kMaxTokens", f"{tokens}LL"), ("int64_t", "kHidden", f"{hidden}LL"),
                   ("int64_t", "kFp8Group", f"{spec.fp8_group}LL"),
                   ("int", "kLowLatency", "1" if spec.moe_mode == "low_latency" else "0")],
        "fp8_groups": hidden // spec.fp8_group if spec.fp8_group else 0,
        "dl_code": code,
        "dl_bits": bits,
    }


def fused_gemm_context(spec: KernelSpec) -> dict:
    m, n, k = spec.gemm_tile_shape
    cm, cn = spec.gemm_cluster_shape
    stages = 0 if spec.stages == "auto" else spec.stages
    return {"tile_m": m, "tile_n": n, "tile_k": k, "cluster_m": cm, "cluster_n": cn, "stages": stages,
            "stages_text": str(spec.stages), "pingpong": spec.gemm_schedule == "pingpong",
            "cutlass_type": CUTLASS_TYPES[spec.dtype]}


def manifest(spec: KernelSpec, plans: list[Plan], files: dict[str, str], nvshmem_headers: str | None,
             calibration: dict | None = None, copy_engine: dict | None = None) -> dict:
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
        "nvcc_flags": kernel_flags(spec.arch),
        "fused_gemm": ({"file": f"{spec.name}_gemm.cu", "library": "CUTLASS (nvidia-cutlass headers)",
                        "kernel": ("KernelTmaWarpSpecializedPingpong" if spec.gemm_schedule == "pingpong"
                                   else "KernelTmaWarpSpecializedCooperative") + " + tilegen ChunkScheduler",
                        "tile": list(spec.gemm_tile_shape), "cluster": list(spec.gemm_cluster_shape),
                        "stages": spec.stages,
                        "nvcc_flags": gemm_flags(spec.arch)} if spec.fused else None),
        "nvshmem_headers": nvshmem_headers,
        "calibration": calibration,
        "copy_engine": ({"default": copy_engine["default"],
                         "choices": {str(w): rows for w, rows in copy_engine["choices"].items()}}
                        if copy_engine else None),
        "moe": ({"mode": spec.moe_mode, "experts": spec.experts, "topk": spec.topk,
                 "dispatch_dtype": spec.dispatch_dtype or spec.dtype, "fp8_group": spec.fp8_group,
                 "symmetric_bytes": {str(w): spec.moe_symmetric_bytes(w) for w in spec.world_sizes},
                 "checked": "tilegen.moe.check_moe (push token) + check_moe_protocol at every world size"}
                if spec.op in MOE_OPS else None),
        "plans": {str(p.world): [{"max_in_bytes": v.max_bytes, "algorithm": v.schedule.algorithm,
                                  "parts": v.schedule.parts, "ctas": v.ctas, "tile_bytes": v.tile_bytes,
                                  "reason": v.reason} for v in p.variants]
                  for p in plans},
        "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())},
    }


def render_op(spec: KernelSpec, plans: list[Plan], nvshmem_headers: str | None,
              calibration: dict | None = None, ce_choices: dict[int, tuple] | None = None) -> dict[str, str]:
    """All files of one op from its (checked) plans, relative to the op's directory; ce_choices: a
    copy-engine op's measured (style, splits) by size per world size (op.py and the manifest carry
    them: the runtime reads nothing else)."""
    env = _env()
    ctx = moe_context(spec) if spec.op in MOE_OPS else render_context(spec, plans)
    ce = copy_engine_record(spec, ce_choices or {})
    ctx["ce_choices"] = repr({w: tuple(map(tuple, rows)) for w, rows in ce["choices"].items()}) if ce else None
    files = {pat.format(name=spec.name): env.get_template(tmpl).render(**ctx) for tmpl, pat in op_templates(spec)}
    files["manifest.json"] = (
        json.dumps(manifest(spec, plans, files, nvshmem_headers, calibration, ce), indent=2, sort_keys=True) + "\n"
    )
    return files


def copy_engine_record(spec: KernelSpec, ce_choices: dict[int, tuple]) -> dict | None:
    """A copy-engine op's (style, splits) choices: per world size, (largest m, style, splits) rows
    (none: the default at every size)."""
    if spec.overlap_style != "copy_engine":
        return None
    return {"default": list(CE_DEFAULT[spec.op]),
            "choices": {w: [list(r) for r in ce_choices.get(w, ())] for w in spec.world_sizes}}


def render_package_files(ops: dict[str, dict[str, str]], kept: tuple[str, ...] = ()) -> dict[str, str]:
    """A package's files: its __init__ (listing these ops and the `kept` ones already in the
    package), the library headers, and every op's files (name -> files)."""
    names = sorted(set(ops) | set(kept))
    out = {"__init__.py": _env().get_template("package_init.py.j2").render(tilegen_version=__version__, ops=names)}
    for rel in LIBRARY_HEADERS:
        out[f"{LIBRARY_COPY}/{rel}"] = (INCLUDE_DIR / rel).read_text()
    for name in sorted(ops):
        for rel, text in ops[name].items():
            out[f"{name}/{rel}"] = text
    return out
