"""Stage 1: kernel specs.

A spec is a YAML file (or a Python config) validated into frozen pydantic models: the models and the
rules every op kind shares are here; reading files and locating their errors is spec_files.py.
"""
from __future__ import annotations

import hashlib
import json
import keyword
import re
import sys
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_validator

from .toolchain import ARCH_PATTERN


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


def kind_of(value: Any) -> str:
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

def dim_size(d: Any, world: int | None = None) -> int:
    """A shape entry's size: a static int, a dynamic dim's max, a sharded dim's share at ``world``
    (its largest share, at the smallest world, when world is None)."""
    if isinstance(d, DynamicDim):
        return d.max
    if isinstance(d, ShardedDim):
        return d.per_rank(world) if world else d.full
    return d


class OpSpec(_Frozen):
    """What every op's spec has. Each op family's model (tilegen.<family>.spec) narrows ``op`` to its
    kinds and adds the fields its ops take; ``KernelSpec(**fields)`` picks the model by ``op``."""

    name: str = Field(description="op name: a Python module and C identifier")
    op: str = Field(description="what the op computes (each family lists its kinds)")
    dtype: Literal["bf16", "f16", "f32", "i32", "u8"] = Field(description="element type")
    world_sizes: list[Annotated[int, Field(ge=2, le=8)]] = Field(
        min_length=1, description="numbers of ranks the op supports (2..8, one NVLink domain)")
    shape: list[Dim] = Field(
        min_length=1, max_length=4,
        description="shard shape [m, ...]; dim 0 may be dynamic {name, max}; the op's tensors are m or world * m "
                    "rows of it (see op); GEMM ops: A's [m, k], where gemm_rs's k may be {full: K}")
    arch: str = Field(default="sm_90", description="GPU architecture: sm_XY or sm_XYa")
    wait_timeout_ms: int = Field(
        default=0, ge=0, le=3_600_000,
        description="bound on every wait in ms (0: unbounded); a call that times out raises TimeoutError naming "
                    "rank and signal. TILEGEN_WAIT_TIMEOUT_MS or op(..., timeout_ms=) override it")
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
        names = [d.name for d in v if isinstance(d, DynamicDim)]
        if len(set(names)) != len(names):
            raise ValueError(f"dynamic dims need distinct names, got {names}")
        if isinstance(v[0], ShardedDim):
            raise ValueError("dim 0 (rows) cannot be sharded; only a GEMM's k (gemm_rs) may be {full: K}")
        return v

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        if not re.fullmatch(ARCH_PATTERN, v):
            raise ValueError(f"expected an architecture such as sm_90 or sm_90a, got {v!r}")
        if int(re.sub(r"\D", "", v)) < 70:
            raise ValueError("needs sm_70 or newer (NVSHMEM device API)")
        return v

    # ---- what the shared stages ask every op (each family answers for its own)
    @property
    def uses_cutlass(self) -> bool:
        """Whether the op's library holds a CUTLASS kernel (built for its arch only)."""
        return False

    # ---- derived properties
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
    def free_inner(self) -> bool:
        """Whether some inner dim is dynamic (collectives: any size up to its max per call)."""
        return any(isinstance(d, DynamicDim) for d in self.shape[1:])

    def _fixed_inner(self) -> None:
        """For the families whose ops are built for their inner dims (GEMMs, MoE rows)."""
        for i, d in enumerate(self.shape[1:], start=1):
            if isinstance(d, DynamicDim):
                raise ValueError(f"shape: only dim 0 of {self.op} may be dynamic; dim {i} is "
                                 f"{{name: {d.name}, max: {d.max}}}")

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
    def sm(self) -> int:
        return int(re.sub(r"\D", "", self.arch))

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


@lru_cache(maxsize=1)
def _adapter() -> TypeAdapter:
    """Every family's model, one discriminated union on ``op``."""
    from .family import families
    models = tuple(f.spec_model for f in families())
    return TypeAdapter(Annotated[Union[models], Field(discriminator="op")])  # type: ignore[valid-type]


def op_kinds() -> tuple[str, ...]:
    from .family import families
    return tuple(k for f in families() for k in f.ops)


def spec_fields() -> tuple[str, ...]:
    """Every field some op takes (the keys a spec may have)."""
    from .family import families
    seen: dict[str, None] = {}
    for f in families():
        seen.update(dict.fromkeys(f.spec_model.model_fields))
    return tuple(seen)


def parse_spec(data: Any) -> OpSpec:
    """A spec from its fields (a mapping), validated by the model of the family its ``op`` names;
    raises pydantic's ValidationError, whose locations _validation_problems reads."""
    return _adapter().validate_python(data)


def KernelSpec(**fields: Any) -> OpSpec:  # noqa: N802 (configs call it as the spec's constructor)
    """A spec from keyword fields (``SPEC = KernelSpec(name=..., op=..., ...)`` in a Python config)."""
    return parse_spec(fields)


def json_schema() -> dict:
    schema = _adapter().json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tilegen kernel spec"
    return schema
