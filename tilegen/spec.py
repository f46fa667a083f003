"""Stage 1: kernel specs.

A spec is a YAML file (or a Python config) validated into frozen pydantic models.
Every error is reported as ``path:LINE:COL: field: message`` (1-based), never a traceback.
"""
from __future__ import annotations

import ast
import hashlib
import json
import keyword
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .registry import GEMM_OPS, MOE_OPS, OPS, algorithms_for, all_schedule_names
from .schedules import LL_MAX_BYTES, is_ll
from .toolchain import ARCH_PATTERN

SPEC_SUFFIXES = (".yaml", ".yml", ".py")

# Names become C identifiers, Python module names and file names: keep them boring.
_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_C_RESERVED = {
    "auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum",
    "extern", "float", "for", "goto", "if", "int", "long", "register", "return", "short", "signed",
    "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "while",
    "class", "namespace", "template", "typename", "new", "delete", "this", "operator", "private",
    "public", "protected", "virtual", "friend", "inline", "bool", "true", "false", "nullptr",
}


def article(word: str) -> str:
    """'an allreduce', 'a gemm_rs'."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def _kind_of(value: Any) -> str:
    """What a YAML value is, in a user's words (not ruamel's class names)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return article(type(value).__name__)


def shown(value: Any, limit: int = 60) -> str:
    """repr of a user's value, cut to `limit` characters (a 5,000-character name is not echoed)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text)} characters)"


def check_identifier(value: str) -> str:
    if not isinstance(value, str) or not _IDENT.match(value):
        raise ValueError(
            "expected an identifier: lowercase letter first, then lowercase letters, digits or '_', "
            f"at most 63 characters; got {shown(value)}")
    if keyword.iskeyword(value) or value in _C_RESERVED:
        raise ValueError(f"{value!r} is a reserved word in Python or C++")
    return value


# What an op's name may not be: the generated package's own attributes (`pkg.load`, `pkg.OPS`), the
# modules generated code and apps import beside it, and the standard library's modules (an op is
# a subpackage and a module attribute; such names shadow, or read as, something else).
PACKAGE_NAMES = frozenset({"load", "ops", "init", "finalize", "op", "tilegen", "torch", "numpy", "tvm_ffi",
                           "cuda", "nvshmem", "triton", "cupy", "generated"})


def check_op_name(value: str) -> str:
    check_identifier(value)
    if value in PACKAGE_NAMES or value in sys.stdlib_module_names:
        what = ("a name the generated package defines or imports" if value in PACKAGE_NAMES
                else "the name of a standard-library module")
        raise ValueError(f"{value!r} is {what}; an op by that name could not be imported from its package. "
                         f"Choose another name (e.g. {value}_op)")
    return value


Identifier = Annotated[str, Field(description="lowercase identifier ([a-z][a-z0-9_]*)")]

# dtype name -> (bytes, CUDA type, torch dtype name)
DTYPES: dict[str, tuple[int, str, str]] = {
    "bf16": (2, "__nv_bfloat16", "bfloat16"),
    "f16": (2, "__half", "float16"),
    "f32": (4, "float", "float32"),
    "i32": (4, "int32_t", "int32"),
    "u8": (1, "uint8_t", "uint8"),
}

OpKind = Literal[tuple(OPS) + tuple(MOE_OPS)]  # type: ignore[valid-type]
REDUCING = tuple(k for k, d in OPS.items() if d.reduces)
SCHEDULES = {k: tuple(algorithms_for(k)) for k in OPS}  # the schedules each op kind has
ScheduleName = Literal[("auto",) + all_schedule_names()]  # type: ignore[valid-type]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DynamicDim(_Frozen):
    """A dimension whose size is given at call time, up to ``max``."""

    name: str = Field(description="name of the dynamic dimension (identifier)")
    max: int = Field(gt=0, le=1 << 31, description="largest size a call may pass")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_identifier(v)


class ShardedDim(_Frozen):
    """A GEMM dimension given whole and split evenly over the ranks: each rank holds ``full / world``
    (ag_gemm's n: a column-parallel weight; gemm_rs's k: a row-parallel one). One spec then serves
    every world size it lists."""

    full: int = Field(gt=0, le=1 << 31, description="size of the whole (unsharded) dimension")

    def per_rank(self, world: int) -> int:
        return self.full // world


def _dim_kind(v: Any) -> str:
    """Which member of a dim union a value is meant for, so that errors name only that one."""
    if isinstance(v, ShardedDim) or (isinstance(v, dict) and "full" in v):
        return "sharded"
    if isinstance(v, (DynamicDim, dict)):
        return "dynamic"
    return "static"


def _n_kind(v: Any) -> str:
    return "sharded" if isinstance(v, (ShardedDim, dict)) else "static"


Dim = Annotated[Union[Annotated[Annotated[int, Field(gt=0, le=1 << 31)], Tag("static")],
                      Annotated[DynamicDim, Tag("dynamic")], Annotated[ShardedDim, Tag("sharded")]],
                Discriminator(_dim_kind)]
GemmN = Annotated[Union[Annotated[Annotated[int, Field(gt=0, le=1 << 20)], Tag("static")],
                        Annotated[ShardedDim, Tag("sharded")]], Discriminator(_n_kind)]

# Smallest SM count of a data-center GPU of each architecture. A GEMM op's communication kernel runs
# beside GEMMs that need SMs; bounding its CTAs by this keeps room for them on every GPU of the arch
# (the runtime checks the real device again).
ARCH_MIN_SMS = {70: 80, 75: 40, 80: 56, 86: 28, 89: 24, 90: 78, 100: 148, 101: 148, 103: 148, 120: 24, 121: 24}
MAX_GEMM_COMM_CTAS = 64
LL_ROUTE_SMEM = 40 << 10  # MoE low_latency: shared memory for a call's routing (of the 48 KiB static limit)


def max_gemm_comm_ctas(arch_sm: int) -> int:
    """Most CTAs a GEMM op's communication kernel may take: at most half the smallest GPU's SMs."""
    return min(MAX_GEMM_COMM_CTAS, ARCH_MIN_SMS.get(arch_sm, 24) // 2)


def dim_size(d: Any, world: int | None = None) -> int:
    """A shape entry's size: a static int, a dynamic dim's max, a sharded dim's share at ``world``
    (its largest share, at the smallest world, when world is None)."""
    if isinstance(d, DynamicDim):
        return d.max
    if isinstance(d, ShardedDim):
        return d.per_rank(world) if world else d.full
    return d


class KernelSpec(_Frozen):
    """One kernel: what it computes and how it communicates."""

    name: str = Field(description="op name: a Python module and C identifier")
    op: OpKind = Field(description="what the op computes: " + "; ".join(
        [f"{k}: {d.summary}" for k, d in OPS.items()] + [f"{k}: {s}" for k, s in MOE_OPS.items()]))
    dtype: Literal["bf16", "f16", "f32", "i32", "u8"] = Field(description="element type")
    world_sizes: list[Annotated[int, Field(ge=2, le=8)]] = Field(
        min_length=1, description="numbers of ranks the op supports (2..8, one NVLink domain)")
    shape: list[Dim] = Field(
        min_length=1, max_length=4,
        description="shard shape [m, ...]; dim 0 may be dynamic {name, max}; the op's tensors are m or world * m "
                    "rows of it (see op); GEMM ops: A's [m, k], where gemm_rs's k may be {full: K}")
    reduce: Literal["sum", "max", "min"] = Field(
        default="sum", description="reduction of reduce_scatter/allreduce (accumulated in fp32 for bf16/f16)")
    tile_bytes: Union[int, Literal["auto"]] = Field(
        default="auto",
        description="largest tile a CTA moves before it signals (multiple of 16, 1 KiB..64 MiB), or auto (the "
                    "planner's, measured where a calibration has it)")
    transport: Literal["auto", "nvlink", "nvshmem"] = Field(
        default="auto",
        description="nvlink: plain vector stores through peer pointers; nvshmem: NVSHMEM put calls; "
                    "auto: peer pointers where NVLink reaches, NVSHMEM elsewhere")
    sync: Literal["per_tile", "barrier"] = Field(
        default="per_tile", description="per_tile: one signal per tile; barrier: one signal per chunk after all CTAs")
    schedule: ScheduleName = Field(
        default="auto", description="auto: the planner chooses per message size, from measurements where a "
                                    "calibration has them (tilegen tune), else by its cost model")
    topology: Literal["nvswitch", "ring_links"] = Field(
        default="nvswitch", description="link layout the cost model assumes")
    ctas: Union[Annotated[int, Field(ge=1, le=4096)], Literal["auto"]] = Field(
        default="auto", description="CTAs (thread blocks) used for communication, or auto (the planner's, measured "
                                    "where a calibration has it); GEMM ops take at most 64 (the GEMMs need the SMs)")
    threads: int = Field(default=512, ge=32, le=1024, description="threads per CTA (multiple of 32)")
    arch: str = Field(default="sm_90", description="GPU architecture: sm_XY or sm_XYa")
    n: Optional[GemmN] = Field(
        default=None, description="GEMM ops: columns of B. ag_gemm: C = allgather(A[m, k]) @ B is [world*m, n]; "
                                  "gemm_rs: C = reduce_scatter(A[world*m, k] @ B) is [m, n]. ag_gemm may give "
                                  "{full: N}: the whole layer's n, each rank holding N / world columns")
    b_layout: Literal["kn", "nk"] = Field(
        default="kn", description="ag_gemm: B stored [k, n] or [n, k] (a torch Linear weight)")
    overlap: Literal["auto", "copy_engine", "decomposed", "fused"] = Field(
        default="auto", description="GEMM ops: copy_engine (per-chunk cuBLAS GEMMs; the chunks move by "
                                    "cudaMemcpyAsync between symmetric buffers over NVLink, no SMs; gemm_rs "
                                    "reduces in the last GEMM's epilogue), decomposed (a communication kernel + "
                                    "per-chunk cuBLAS GEMMs that wait on its signals in stream order), fused (one "
                                    "CUTLASS Hopper GEMM whose tile scheduler waits on the gather's flags / "
                                    "publishes finished parts; sm_90, bf16/f16), or auto (copy_engine, the "
                                    "fastest style measured; docs/measurements.md)")
    gemm_tile: Optional[Annotated[list[int], Field(min_length=3, max_length=3)]] = Field(
        default=None, description="fused GEMM tile [m, n, k] (default [128, 256, 64]): m 128 or 256, n 64, 128, "
                                  "192 or 256, k 64 or 128")
    gemm_cluster: Optional[Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        default=None, description="fused GEMM: thread-block cluster [m, n] (default [1, 1]), each 1 or 2: the "
                                  "CTAs of a cluster share their B tile (m 2) or A tile (n 2) by TMA multicast")
    gemm_schedule: Optional[Literal["cooperative", "pingpong"]] = Field(
        default=None, description="fused ag_gemm: CUTLASS's kernel schedule, cooperative (default: two warp groups "
                                  "share each tile) or pingpong (each warp group its own tile, one's math beside "
                                  "the other's epilogue; tiles of at most 128 x 128 outputs)")
    stages: Union[Annotated[int, Field(ge=2, le=8)], Literal["auto"]] = Field(
        default="auto", description="fused GEMM: shared-memory pipeline stages of the mainloop, or auto (as many "
                                    "as fit beside the epilogue)")
    wait_timeout_ms: int = Field(
        default=0, ge=0, le=3_600_000,
        description="bound on every wait in ms (0: unbounded); a call that times out raises TimeoutError naming "
                    "rank and signal. TILEGEN_WAIT_TIMEOUT_MS or op(..., timeout_ms=) override it")
    experts: Optional[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default=None, description="moe: number of experts, split evenly over the ranks (rank r holds experts "
                                  "r * E / world .. (r + 1) * E / world - 1)")
    topk: Optional[Annotated[int, Field(ge=1, le=32)]] = Field(default=None, description="moe: experts per token")
    mode: Optional[Literal["normal", "low_latency"]] = Field(
        default=None, description="moe: normal (throughput: counts exchanged first, the host sizes the outputs; the "
                                  "default) or low_latency (fixed capacity of max tokens per expert and source rank, "
                                  "no host round trip, CUDA-graph capturable; distinct experts per token)")
    dispatch_dtype: Optional[Literal["fp8_e4m3"]] = Field(
        default=None, description="moe: fp8_e4m3 sends and returns the dispatched tokens quantized to e4m3 with fp32 "
                                  "scales (fp8_scales); combine stays in dtype (default: tokens move in dtype)")
    fp8_scales: Optional[Literal["per_token", "per_128"]] = Field(
        default=None, description="moe with dispatch_dtype fp8_e4m3: one scale per token or per 128 channels "
                                  "(default per_128): scale = amax / 448")
    description: str = Field(default="", max_length=2000, description="free text; never emitted into CUDA")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_op_name(v)

    @field_validator("world_sizes")
    @classmethod
    def _worlds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"world sizes must be distinct, got {v}")
        return sorted(v)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list) -> list:
        for i, d in enumerate(v[1:], start=1):
            if isinstance(d, DynamicDim):
                raise ValueError(f"only dim 0 may be dynamic; dim {i} is {{name: {d.name}, max: {d.max}}}")
        if isinstance(v[0], ShardedDim):
            raise ValueError("dim 0 (rows) cannot be sharded; only a GEMM's k (gemm_rs) may be {full: K}")
        return v

    @field_validator("tile_bytes")
    @classmethod
    def _tile(cls, v):
        if v == "auto":
            return v
        if not 1024 <= v <= 64 << 20:
            raise ValueError(f"must be between 1024 and {64 << 20} bytes, got {v}")
        if v % 16:
            raise ValueError(f"must be a multiple of 16 bytes (vector width), got {v}")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (warp size), got {v}")
        return v

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if not re.fullmatch(ARCH_PATTERN, v):
            raise ValueError(f"expected an architecture such as sm_90 or sm_90a, got {v!r}")
        if int(re.sub(r"\D", "", v)) < 70:
            raise ValueError("needs sm_70 or newer (NVSHMEM device API)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "KernelSpec":
        if self.op in MOE_OPS:
            return self._check_moe()
        for f in ("experts", "topk", "mode", "dispatch_dtype", "fp8_scales"):
            if getattr(self, f) is not None:
                raise ValueError(f"{f}: only MoE ops ({', '.join(MOE_OPS)}) take {f}")
        if self.op in GEMM_OPS:  # first: the sizes below depend on n
            if self.n is None:
                raise ValueError(f"n: {self.op} needs n, the columns of B")
            if len(self.shape) != 2:
                raise ValueError(f"shape: {self.op} takes A's shard as [m, k], got {len(self.shape)} dimensions")
            if self.dtype not in ("bf16", "f16", "f32"):
                raise ValueError(f"dtype: {self.op} multiplies bf16, f16 or f32 (fp32 accumulation), not {self.dtype}")
            self._check_sharding()
            limit = max_gemm_comm_ctas(self.sm)
            if self.ctas != "auto" and self.ctas > limit:
                raise ValueError(
                    f"ctas: {article(self.op)} communication kernel runs beside the GEMMs and must leave them the "
                    f"GPU: at most {limit} CTAs on {self.arch} (or auto), got {self.ctas}"
                )
            if self.overlap_style == "copy_engine":
                self._check_copy_engine()
            why_not = self._fused_unsupported()
            if self.overlap == "fused" and why_not:
                raise ValueError(f"overlap: fused needs {why_not}; use decomposed or auto")
            if self.gemm_tile is not None:
                m, n_, k = self.gemm_tile
                if m not in (128, 256) or n_ not in (64, 128, 192, 256) or k not in (64, 128):
                    raise ValueError(
                        f"gemm_tile: expected [m, n, k] with m 128 or 256, n 64/128/192/256, k 64 or 128, "
                        f"got {self.gemm_tile}"
                    )
            if self.gemm_cluster is not None and any(c not in (1, 2) for c in self.gemm_cluster):
                raise ValueError(f"gemm_cluster: expected [m, n] with each 1 or 2, got {self.gemm_cluster}")
            set_fields = (("gemm_tile", self.gemm_tile is not None), ("gemm_cluster", self.gemm_cluster is not None),
                          ("gemm_schedule", self.gemm_schedule is not None), ("stages", self.stages != "auto"))
            fused_only = [f for f, given in set_fields if given]
            if not self.fused and fused_only:
                raise ValueError(
                    f"{fused_only[0]}: only the fused overlap takes GEMM tiles, clusters, schedules and stages "
                    f"(this spec's overlap is {self.overlap_style})"
                )
            if self.gemm_schedule == "pingpong":
                m, n_, _ = self.gemm_tile_shape
                if self.op != "ag_gemm":
                    raise ValueError("gemm_schedule: pingpong is for ag_gemm (gemm_rs publishes parts of C from the "
                                     "cooperative kernel's epilogue)")
                if m * n_ > 128 * 128:
                    raise ValueError(f"gemm_schedule: a pingpong warp group holds a whole tile's accumulators: at "
                                     f"most 128 x 128 outputs, got gemm_tile {list(self.gemm_tile_shape)}")
        else:
            if any(isinstance(d, ShardedDim) for d in self.shape):
                raise ValueError("shape: only a GEMM op's k (gemm_rs) may be sharded ({full: K})")
            for f, unset in (
                ("n", self.n is None),
                ("gemm_tile", self.gemm_tile is None),
                ("gemm_cluster", self.gemm_cluster is None),
                ("gemm_schedule", self.gemm_schedule is None),
                ("stages", self.stages == "auto"),
                ("overlap", self.overlap == "auto"),
            ):
                if not unset:
                    raise ValueError(f"{f}: only GEMM ops ({', '.join(GEMM_OPS)}) take {f}")
        shard = self.max_shard_bytes
        if shard * max(self.world_sizes) > (1 << 40):
            raise ValueError(f"shape: the output at world {max(self.world_sizes)} would be "
                             f"{shard * max(self.world_sizes)} bytes, over 1 TiB")
        if self.schedule != "auto" and self.schedule not in SCHEDULES[self.op]:
            raise ValueError(
                f"schedule: {self.op} has schedules {', '.join(SCHEDULES[self.op])} (or auto), not {self.schedule}"
            )
        if self.schedule != "auto" and is_ll(self.schedule):
            if self.transport == "nvshmem":
                raise ValueError(f"schedule: {self.schedule} stores through NVLink peer pointers, which transport "
                                 f"nvshmem does not use (transport auto or nvlink, or another schedule)")
            big = [w for w in self.world_sizes if self.max_in_bytes(w) > LL_MAX_BYTES]
            if big:
                raise ValueError(f"schedule: {self.schedule} carries its flags in the data and serves inputs up to "
                                 f"{LL_MAX_BYTES} bytes; this spec allows {self.max_in_bytes(big[0])} at world "
                                 f"{big[0]} (schedule: auto uses it for the small ones)")
        if self.op in REDUCING and self.dtype == "u8":
            raise ValueError(f"dtype: {self.op} reduces; use bf16, f16, f32 or i32")
        return self

    def _check_moe(self) -> "KernelSpec":
        """MoE: tokens [m (dynamic or static max), hidden], experts and topk given, the collective and GEMM
        settings left unset (the MoE kernels take none of them)."""
        for f in ("experts", "topk"):
            if getattr(self, f) is None:
                raise ValueError(f"{f}: op moe needs {f}")
        if len(self.shape) != 2 or any(isinstance(d, ShardedDim) for d in self.shape):
            raise ValueError("shape: op moe takes the tokens of a rank as [m, hidden] (m may be {name, max})")
        if self.dtype not in ("bf16", "f16", "f32"):
            raise ValueError(f"dtype: op moe moves bf16, f16 or f32 tokens (fp32 combine), not {self.dtype}")
        if self.shape[1] * self.elem_bytes % 16:
            raise ValueError(f"shape: a token's {self.shape[1]} x {self.elem_bytes} bytes must be a multiple of 16 "
                             f"(the kernels move 16-byte vectors)")
        bad = [w for w in self.world_sizes if self.experts % w]
        if bad:
            raise ValueError(f"experts: {self.experts} experts do not split evenly over world sizes {bad}")
        if self.topk > self.experts:
            raise ValueError(f"topk: {self.topk} exceeds the {self.experts} experts")
        if self.sm < 80:
            raise ValueError(f"arch: op moe needs sm_80 or newer (warp reductions), got {self.arch}")
        if self.fp8_scales is not None and self.dispatch_dtype is None:
            raise ValueError("fp8_scales: only an fp8 dispatch (dispatch_dtype: fp8_e4m3) has scales")
        if self.dispatch_dtype is not None:
            if self.dtype not in ("bf16", "f16"):
                raise ValueError(f"dispatch_dtype: fp8 dispatch quantizes bf16 or f16 tokens, not {self.dtype}")
            if self.sm < 89:
                raise ValueError(f"dispatch_dtype: fp8 conversions need sm_89 or newer, got {self.arch}")
            if self.fp8_group == 128 and self.shape[1] % 128:
                raise ValueError(f"shape: per_128 fp8 scales need hidden to be a multiple of 128, got {self.shape[1]}")
        if self.transport == "nvshmem":
            raise ValueError("transport: op moe stores through NVLink peer pointers (one node); use auto or nvlink")
        defaults = {"reduce": "sum", "tile_bytes": "auto", "sync": "per_tile", "schedule": "auto", "ctas": "auto",
                    "n": None, "gemm_tile": None, "gemm_cluster": None, "gemm_schedule": None, "stages": "auto",
                    "overlap": "auto",
                    "topology": "nvswitch"}
        for f, v in defaults.items():
            if getattr(self, f) != v:
                raise ValueError(f"{f}: op moe takes no {f} (its kernels are sized by the routing)")
        if self.moe_mode == "low_latency" and self.ll_route_bytes() > LL_ROUTE_SMEM:
            raise ValueError(f"shape: low_latency mode routes a call in shared memory ({self.ll_route_bytes()} bytes "
                             f"for {self.max_shape[0]} tokens, top-{self.topk} of {self.experts} experts; at most "
                             f"{LL_ROUTE_SMEM}): lower the tokens' max or use mode normal")
        need, w = self.moe_symmetric_bytes(max(self.world_sizes)), max(self.world_sizes)
        if need > 64 << 30:
            raise ValueError(f"shape: staging for {self.max_shape[0]} tokens from {w} ranks needs {need} bytes of "
                             f"symmetric memory, over 64 GiB")
        return self

    def moe_symmetric_bytes(self, world: int) -> int:
        """MoE: the symmetric memory the op allocates at `world` ranks (tilegen/moe.cuh's Host::symmetric_bytes):
        two halves of, per source rank, max_tokens staging rows, meta rows, counts and combine rows; the flags;
        in low_latency mode the outputs too (every source writes its rows there: Host::ll_layout)."""
        t, h = self.max_shape
        a = lambda b: -(-b // 256) * 256  # noqa: E731
        stage_row = h * self.elem_bytes if not self.fp8_group else h + -(-4 * (h // self.fp8_group) // 16) * 16
        half = (a(world * t * stage_row) + a(world * t * h * self.elem_bytes) + a(world * t * (1 + 3 * self.topk) * 4)
                + a(world * (self.experts + 1) * 4))
        total = 2 * half + 2 * max(self.world_sizes) * 8
        if self.moe_mode == "low_latency":
            total = a(total)
            local, k = self.experts // world, self.topk
            rows, srows = local * world * t, world * t
            groups = h // self.fp8_group if self.fp8_group else 0
            out_row = h if self.fp8_group else h * self.elem_bytes
            total += (a(rows * out_row) + a(rows * groups * 4) + a(rows * 3 * 4) + a(srows * k * 4) + a(srows * 2 * 4)
                      + a(srows * k * 4) + a(local * world * 4) + a(world * 4))
            row_bytes, head_bytes = self.ll_line_bytes()
            total += a(srows * row_bytes) + a(world * head_bytes)
        return total

    def ll_line_bytes(self) -> tuple[int, int]:
        """MoE low_latency: the bytes of a line row and of a head (tilegen/moe.cuh's LLLines): 128-byte lines
        of 120 data bytes (meta: token, pad, slot rows, weights; fp8 scales; the payload row) and the epoch,
        in whole warp stores of 4 lines."""
        h, k2 = self.max_shape[1], -(-self.topk // 2) * 2
        groups = h // self.fp8_group if self.fp8_group else 0
        data = 4 * (2 + 2 * k2) + 4 * (-(-groups // 2) * 2) + (h if self.fp8_group else h * self.elem_bytes)
        lines, head_lines = -(-data // 120), -(-4 * (2 + self.experts) // 120)
        return -(-lines // 4) * 512, -(-head_lines // 4) * 512

    def ll_route_bytes(self) -> int:
        """MoE low_latency: the shared memory each CTA of the push routes a call in (tilegen/moe.cuh's LLRoute):
        every item's expert, a token mask per expert and per rank."""
        t, words = self.max_shape[0], -(-self.max_shape[0] // 32)
        return 4 * (t * self.topk + (self.experts + max(self.world_sizes)) * words)

    @property
    def moe_mode(self) -> str:
        return self.mode or "normal"

    @property
    def fp8_group(self) -> int:
        """MoE fp8 dispatch: channels per scale (the hidden size for per_token); 0 without fp8."""
        if self.dispatch_dtype is None:
            return 0
        return self.shape[1] if self.fp8_scales == "per_token" else 128

    def _check_sharding(self) -> None:
        """A sharded dim must be ag_gemm's n or gemm_rs's k, and split evenly at every world size."""
        k = self.shape[1]
        if isinstance(self.n, ShardedDim) and self.op != "ag_gemm":
            raise ValueError("n: only ag_gemm's n may be sharded ({full: N}); gemm_rs shards k (shape[1])")
        if isinstance(k, ShardedDim) and self.op != "gemm_rs":
            raise ValueError("shape: only gemm_rs's k (shape[1]) may be sharded ({full: K}); ag_gemm shards n")
        for field_, d in (("n", self.n), ("shape", k)):
            if isinstance(d, ShardedDim):
                bad = [w for w in self.world_sizes if d.full % w]
                if bad:
                    raise ValueError(f"{field_}: {{full: {d.full}}} does not split evenly over world sizes {bad}")

    def _check_copy_engine(self) -> None:
        """The copy-engine overlap copies between peers' memory over NVLink and runs no communication kernel."""
        if self.transport == "nvshmem":
            raise ValueError("transport: the copy-engine overlap copies over NVLink (P2P); use transport auto or "
                             "nvlink, or overlap: decomposed")
        given = self._kernel_settings()
        if given and self.overlap == "copy_engine":
            raise ValueError(f"{given[0]}: the copy-engine overlap runs no communication kernel, so it takes no "
                             f"{given[0]}; leave it out or use overlap: decomposed")

    @property
    def overlap_style(self) -> str | None:
        """GEMM ops: the overlap the op runs (auto resolved), else None."""
        if self.op not in GEMM_OPS:
            return None
        if self.overlap != "auto":
            return self.overlap
        # auto: the copy engines where the spec leaves the communication kernel's settings open
        # (it beat the decomposed and fused styles in every measured row: docs/measurements.md)
        return "decomposed" if self._kernel_settings() or self.transport == "nvshmem" else "copy_engine"

    def _kernel_settings(self) -> list[str]:
        """The communication kernel's settings this spec fixes (not auto)."""
        return [f for f in ("ctas", "tile_bytes", "schedule") if getattr(self, f) != "auto"]

    def gemm_nk(self, world: int) -> tuple[int, int]:
        """GEMM ops: this rank's (n, k) at ``world`` ranks."""
        return dim_size(self.n, world), dim_size(self.shape[1], world)

    def _fused_unsupported(self) -> str | None:
        """Why the fused GEMM (CUTLASS sm_90 TMA/wgmma) cannot run this spec, or None."""
        if not self.arch.startswith("sm_90"):
            return f"a Hopper target (arch sm_90 or sm_90a), not {self.arch}"
        if self.dtype not in ("bf16", "f16"):
            return f"bf16 or f16, not {self.dtype}"
        for w in self.world_sizes:
            n, k = self.gemm_nk(w)
            if n % 8 or k % 8:
                return f"n and k multiples of 8 (16-byte rows for TMA), got n {n}, k {k} at world {w}"
        return None

    @property
    def fused(self) -> bool:
        """GEMM ops: one fused GEMM kernel beside the communication kernel (else per-chunk cuBLAS)."""
        # auto stays decomposed: it was the faster style in every run so far (docs/measurements.md);
        # fused is opt-in until the cost model has 2-GPU figures to choose by.
        return self.op in GEMM_OPS and self.overlap == "fused"

    @property
    def gemm_tile_shape(self) -> tuple[int, int, int]:
        return tuple(self.gemm_tile) if self.gemm_tile is not None else (128, 256, 64)

    @property
    def gemm_cluster_shape(self) -> tuple[int, int]:
        return tuple(self.gemm_cluster) if self.gemm_cluster is not None else (1, 1)

    # ---- derived properties (used by planner and code generator) ----
    @property
    def elem_bytes(self) -> int:
        return DTYPES[self.dtype][0]

    @property
    def cuda_type(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> str:
        return DTYPES[self.dtype][2]

    @property
    def dynamic_dim(self) -> DynamicDim | None:
        return self.shape[0] if isinstance(self.shape[0], DynamicDim) else None

    @property
    def max_shape(self) -> tuple[int, ...]:
        """Largest per-rank size of each dim (a sharded dim's share at the smallest world size)."""
        return tuple(dim_size(d, min(self.world_sizes)) for d in self.shape)

    @property
    def inner_elems(self) -> int:
        n = 1
        for d in self.max_shape[1:]:
            n *= d
        return n

    @property
    def comm_inner(self) -> tuple[int, ...]:
        """Inner dims of the tensors the communication moves (gemm_rs moves partial C: [.., n])."""
        return (dim_size(self.n),) if self.op == "gemm_rs" and self.n is not None else tuple(self.max_shape[1:])

    @property
    def max_shard_bytes(self) -> int:
        n = 1
        for d in self.comm_inner:
            n *= d
        return self.max_shape[0] * n * self.elem_bytes

    def max_in_bytes(self, world: int) -> int:
        return OPS[self.op].in_rows(world) * self.max_shard_bytes

    def max_out_bytes(self, world: int) -> int:
        return OPS[self.op].out_rows(world) * self.max_shard_bytes

    @property
    def sm(self) -> int:
        return int(re.sub(r"\D", "", self.arch))

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


@dataclass(frozen=True)
class SourceLoc:
    path: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.col}"


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with where it came from."""

    spec: KernelSpec
    loc: SourceLoc
    fields: tuple[tuple[str, SourceLoc], ...] = ()  # where each top-level field was written

    def at(self, field: str) -> SourceLoc:
        """Where `field` was written (the spec's own location if it was not)."""
        return dict(self.fields).get(field, self.loc)


class SpecError(Exception):
    """One or more located problems in a spec file."""

    def __init__(self, problems: list[tuple[SourceLoc, str]]):
        self.problems = [(loc, " ".join(msg.split())) for loc, msg in problems]  # one line per problem
        super().__init__("\n".join(f"{loc}: {msg}" for loc, msg in self.problems))


_UNION_TAGS = ("static", "dynamic", "sharded")


def _is_union_tag(loc: tuple, i: int) -> bool:
    """pydantic names the member of a dim union in the location: shape, k, <tag> or n, <tag>."""
    if i == 2 and loc[0] == "shape" and isinstance(loc[1], int):
        return loc[2] in _UNION_TAGS
    return i == 1 and loc[0] == "n" and loc[1] in _UNION_TAGS


def _format_field(loc: tuple) -> str:
    parts: list[str] = []
    for i, p in enumerate(loc):
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif _is_union_tag(loc, i):
            continue
        else:
            name = str(p) if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,62}", str(p)) else repr(p)[:64]
            parts.append(("." if parts else "") + name)
    return "".join(parts) or "<spec>"


def _message(err: dict) -> str:
    msg = err["msg"]
    msg = msg.removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        loc = tuple(err["loc"])
        tag = next((p for i, p in enumerate(loc) if _is_union_tag(loc, i)), None)
        model = {"dynamic": DynamicDim, "sharded": ShardedDim}.get(tag, KernelSpec)
        msg = "unknown key (allowed: " + ", ".join(model.model_fields) + ")"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif "input" in err and err["type"] not in ("missing",) and "got" not in msg:
        if not isinstance(err["input"], (dict, list)):
            msg += f" (got {shown(err['input'])})"
        elif err["loc"]:  # (a rule of the whole spec gets the whole spec as its input: not worth naming)
            msg += f" (got {_kind_of(err['input'])})"
    return msg


def _yaml_position(root: Any, loc: tuple) -> tuple[int, int]:
    """0-based (line, col) of the YAML node a pydantic error location points at."""
    node = root
    line, col = getattr(getattr(root, "lc", None), "line", 0) or 0, getattr(getattr(root, "lc", None), "col", 0) or 0
    for key in loc:
        lc = getattr(node, "lc", None)
        if isinstance(key, str) and isinstance(node, dict) and key in node:
            if lc is not None:
                pos = lc.key(key) if isinstance(node[key], dict) else lc.value(key)
                line, col = pos[0], pos[1]
            node = node[key]
        elif isinstance(key, int) and isinstance(node, list) and 0 <= key < len(node):
            if lc is not None:
                line, col = lc.item(key)
            node = node[key]
        # else: a union tag or a missing key: stay at the enclosing node
    return line, col


def _yaml_key_position(root: Any, loc: tuple) -> tuple[int, int] | None:
    """Position of the offending key itself (for unknown keys)."""
    node = root
    for key in loc[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    lc = getattr(node, "lc", None)
    if lc is not None and isinstance(node, dict) and loc[-1] in node:
        return tuple(lc.key(loc[-1]))  # type: ignore[return-value]
    return None


# How pydantic names the member of a plain union (e.g. `ctas: int | 'auto'`) in an error's location.
_MEMBER_TAG = re.compile(r"(int|float|str|bool|none|(constrained|function|literal|list|dict|nullable|union|"
                         r"tagged-union|json-or-python|lax|strict)[-\[].*)$")


def _is_member_tag(loc: tuple, i: int) -> bool:
    return i > 0 and isinstance(loc[i], str) and bool(_MEMBER_TAG.match(loc[i])) and not _is_union_tag(loc, i)


def _merge_union_members(errors: list[dict]) -> list[dict]:
    """One error per field of a plain union: pydantic reports each member's failure under a tag of
    its own (`ctas.constrained-int`, `ctas."literal['auto']"`); a user wants one message naming
    every accepted form."""
    merged: dict[tuple, dict] = {}
    out: list[dict] = []
    for err in errors:
        loc = tuple(err["loc"])
        tags = [i for i in range(len(loc)) if _is_member_tag(loc, i)]
        if not tags:
            out.append(err)
            continue
        bare = tuple(p for i, p in enumerate(loc) if i not in tags)
        msg = err["msg"].removeprefix("Value error, ")
        if bare in merged:
            first = merged[bare]
            alt = msg.removeprefix("Input should be ")
            if alt not in first["msg"]:
                first["msg"] += f", or {alt}"
        else:
            merged[bare] = {**err, "loc": bare, "msg": msg}
            out.append(merged[bare])
    return out


def _validation_problems(errors, path: str, locate) -> list[tuple[SourceLoc, str]]:
    """Located problems of a ValidationError (or of its errors() list)."""
    problems = []
    seen = set()
    errors = errors.errors() if isinstance(errors, ValidationError) else errors
    for err in _merge_union_members(errors):
        loc = tuple(err["loc"])
        m = re.match(r"(?:Value error, )?(\w+): (.*)", err["msg"], re.S)
        if not loc and m and m.group(1) in KernelSpec.model_fields:  # a cross-field rule names its field
            loc, err = (m.group(1),), {**err, "msg": m.group(2)}
        line, col = locate(loc, err["type"])
        field = _format_field(loc)
        item = (SourceLoc(path, line + 1, col + 1), f"{field}: {_message(err)}")
        if item not in seen:
            seen.add(item)
            problems.append(item)
    return problems


MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 10_000  # a spec has a few dozen; YAML aliases can make a small file expand enormously


class _TooLarge(Exception):
    pass


def _plain(node: Any, budget: list[int] | None = None) -> Any:
    """ruamel round-trip containers -> plain Python (strict pydantic wants real ints/strs)."""
    budget = [MAX_SPEC_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooLarge()
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _plain(v, budget) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, budget) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def load_yaml_spec(path: str | Path) -> LoadedSpec:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([(SourceLoc(path, 1, 1), f"<file>: cannot read: {e}")]) from None
    return parse_yaml_spec(text, path)


def parse_yaml_spec(text: str, path: str = "<string>") -> LoadedSpec:
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(
            [(SourceLoc(path, 1, 1), f"<file>: {len(text)} characters; a spec is at most {MAX_SPEC_BYTES}")]
        )
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        root = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line, mark.column) if mark is not None else (0, 0)
        problem = (e.problem or e.context or "malformed YAML").strip()
        raise SpecError([(SourceLoc(path, line + 1, col + 1), f"<yaml>: {problem}")]) from None
    except (YAMLError, ValueError, RecursionError) as e:
        raise SpecError(
            [(SourceLoc(path, 1, 1), f"<yaml>: {str(e).splitlines()[0] if str(e) else type(e).__name__}")]
        ) from None
    if not isinstance(root, dict):
        kind = "an empty document" if root is None else _kind_of(root)
        raise SpecError([(SourceLoc(path, 1, 1), f"<spec>: expected a mapping of fields, got {kind}")])
    for key in root:
        if not isinstance(key, str):
            lc = root.lc.key(key)
            raise SpecError([(SourceLoc(path, lc[0] + 1, lc[1] + 1), f"{key!r}: keys must be strings")])

    def locate(loc: tuple, etype: str) -> tuple[int, int]:
        if etype == "extra_forbidden":
            pos = _yaml_key_position(root, loc)
            if pos is not None:
                return pos
        return _yaml_position(root, loc)

    try:
        spec = KernelSpec.model_validate(_plain(root))
    except ValidationError as e:
        raise SpecError(_validation_problems(e, path, locate)) from None
    except (_TooLarge, RecursionError):
        raise SpecError(
            [(SourceLoc(path, 1, 1), f"<spec>: more than {MAX_SPEC_NODES} values (recursive or exploding aliases?)")]
        ) from None
    fields = tuple((str(k), SourceLoc(path, root.lc.key(k)[0] + 1, root.lc.key(k)[1] + 1)) for k in root)
    return LoadedSpec(spec, SourceLoc(path, root.lc.line + 1, root.lc.col + 1), fields)


def _python_spec_positions(path: str, text: str) -> tuple[dict[str, tuple[int, int]], tuple[int, int]]:
    """Positions of keyword/key names inside the ``SPEC = ...`` assignment of a Python config."""
    keys: dict[str, tuple[int, int]] = {}
    where = (0, 0)
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError:
        return keys, where
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "SPEC" for t in node.targets):
            where = (node.lineno - 1, node.col_offset)
            value = node.value
            if isinstance(value, ast.Call):
                for kw in value.keywords:
                    if kw.arg:
                        keys[kw.arg] = (kw.value.lineno - 1, kw.value.col_offset)
            elif isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        keys[k.value] = (v.lineno - 1, v.col_offset)
    return keys, where


def config_timeout_s() -> float:
    """TILEGEN_CONFIG_TIMEOUT_S: how long a Python config may run (default 60 s)."""
    import os
    text = os.environ.get("TILEGEN_CONFIG_TIMEOUT_S", "")
    try:
        value = float(text) if text else 60.0
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SpecError([(SourceLoc("TILEGEN_CONFIG_TIMEOUT_S", 1, 1),
                          f"expected a positive number of seconds, got {shown(text)}")])
    return value


def load_python_spec(path: str | Path) -> LoadedSpec:
    """A Python config: a module that defines ``SPEC`` as a KernelSpec or a dict of fields. It runs in
    a child process bounded in time (tilegen.pyconfig): however it ends, the result is a spec or a
    located error."""
    from .pyconfig import run_config
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([(SourceLoc(path, 1, 1), f"<file>: cannot read as UTF-8 Python: {e}")]) from None
    keys, where = _python_spec_positions(path, text)
    at_spec = SourceLoc(path, where[0] + 1, where[1] + 1)
    outcome = run_config(path, config_timeout_s())
    kind = outcome[0]

    def located(errors) -> SpecError:
        return SpecError(_validation_problems(errors, path,
                                              lambda loc, t: keys.get(str(loc[0]), where) if loc else where))
    if kind == "value" and isinstance(outcome[1], (KernelSpec, dict)):
        try:
            spec = outcome[1] if isinstance(outcome[1], KernelSpec) else KernelSpec.model_validate(outcome[1])
        except ValidationError as e:
            raise located(e) from None
        return LoadedSpec(spec, at_spec,
                          tuple((k, SourceLoc(path, line + 1, col + 1)) for k, (line, col) in keys.items()))
    if kind == "value":
        raise SpecError([(at_spec, f"SPEC: expected a KernelSpec or a dict, got {type(outcome[1]).__name__}")])
    if kind == "invalid":
        raise located(outcome[1])
    problem = {
        "raised": lambda: (outcome[1], f"<python>: {outcome[2]}"),
        "exit": lambda: (outcome[1], f"<python>: the config called sys.exit({outcome[2]!r}); a config defines SPEC "
                                     f"and returns"),
        "ended": lambda: (1, f"<python>: the config ended the process (exit status {outcome[1]}) before defining "
                             f"SPEC (os._exit, a signal or a crash?)"),
        "timeout": lambda: (1, f"<python>: the config ran for {outcome[1]:g} s without finishing (an endless loop? "
                               f"TILEGEN_CONFIG_TIMEOUT_S sets the bound); stopped"),
        "nospec": lambda: (1, "<spec>: a Python config must define SPEC (a KernelSpec or a dict)"),
    }
    line, msg = problem[kind]()
    raise SpecError([(SourceLoc(path, line, 1), msg)])


def load_spec(path: str | Path) -> LoadedSpec:
    p = Path(path)
    if p.suffix == ".py":
        return load_python_spec(p)
    if p.suffix in (".yaml", ".yml"):
        return load_yaml_spec(p)
    raise SpecError([(SourceLoc(str(p), 1, 1), f"<file>: expected one of {', '.join(SPEC_SUFFIXES)}")])


def defines_spec(path: Path) -> bool:
    """Whether a Python file assigns SPEC at module level (read, not run): only such files in a
    folder are spec configs; helpers beside them are not executed."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return True  # unreadable or broken: load it, so that the problem is reported where it is
    return any(isinstance(node, (ast.Assign, ast.AnnAssign))
               and any(isinstance(t, ast.Name) and t.id == "SPEC"
                       for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))
               for node in tree.body)


def _spec_files_below(folder: Path) -> list[Path]:
    """A folder's spec files, its subfolders' too (sorted; names starting with '.' or '_' skipped)."""
    found = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith((".", "_")):
            continue
        if f.is_dir():
            found.extend(_spec_files_below(f))
        elif f.suffix in SPEC_SUFFIXES and (f.suffix != ".py" or defines_spec(f)):
            found.append(f)
    return found


def find_spec_files(paths: list[str | Path]) -> list[Path]:
    """Spec files named directly, or found (sorted) in the folders named and their subfolders: YAML
    files, and Python files that assign SPEC at module level."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(_spec_files_below(p) if p.is_dir() else [p])
    return files


def load_specs(paths: list[str | Path],
               allow_python: bool = True) -> tuple[list[LoadedSpec], list[tuple[SourceLoc, str]]]:
    """Load every spec; returns the good ones and all problems (including duplicate names).
    allow_python=False refuses Python configs (they run as code) instead of running them."""
    good: list[LoadedSpec] = []
    problems: list[tuple[SourceLoc, str]] = []
    names: dict[str, SourceLoc] = {}
    for f in find_spec_files(paths):
        if not f.exists():
            problems.append((SourceLoc(str(f), 1, 1), "<file>: no such file"))
            continue
        if f.suffix == ".py" and not allow_python:
            problems.append((SourceLoc(str(f), 1, 1), "<file>: a Python config runs as code; refused (--no-python)"))
            continue
        try:
            ls = load_spec(f)
        except SpecError as e:
            problems.extend(e.problems)
            continue
        if ls.spec.name in names:
            problems.append((ls.loc, f"name: {ls.spec.name!r} is already used by {names[ls.spec.name]}"))
            continue
        names[ls.spec.name] = ls.loc
        good.append(ls)
    return good, problems


def json_schema() -> dict:
    schema = KernelSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tilegen kernel spec"
    return schema
