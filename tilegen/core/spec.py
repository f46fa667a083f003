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
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator)
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from pydantic import TypeAdapter

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

    spec: OpSpec
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
        if tag is None and len(loc) == 1 and err.get("op"):
            return _not_taken(err["op"], str(loc[0]))
        model = {"dynamic": DynamicDim, "sharded": ShardedDim}.get(tag, OpSpec)
        msg = "unknown key (allowed: " + ", ".join(model.model_fields) + ")"
    elif err["type"] == "missing":
        loc = tuple(err["loc"])
        family_field = err.get("op") and len(loc) == 1 and loc[0] not in OpSpec.model_fields
        msg = f"op {err['op']} needs {loc[0]}" if family_field else "required field is missing"
    elif "input" in err and err["type"] not in ("missing",) and "got" not in msg:
        if not isinstance(err["input"], (dict, list)):
            msg += f" (got {shown(err['input'])})"
        elif err["loc"]:  # (a rule of the whole spec gets the whole spec as its input: not worth naming)
            msg += f" (got {_kind_of(err['input'])})"
    return msg


def _not_taken(op: str, field: str) -> str:
    """An unknown top-level key of an op's spec: which ops take it, if any do."""
    from .family import families
    model = next(f.spec_model for f in families() if op in f.ops)
    takers = [k for f in families() if field in f.spec_model.model_fields for k in f.ops]
    if takers:
        return f"op {op} takes no {field} (only {', '.join(takers)} take it)"
    return "unknown key (allowed: " + ", ".join(model.model_fields) + ")"


def _op_errors(errors: list[dict]) -> list[dict]:
    """The discriminated union's errors in the spec's own terms: its tag (the op) out of every
    location, kept on the error for the messages; a missing or unknown op as an error of op."""
    kinds = op_kinds()
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "union_tag_not_found":
            out.append({**err, "type": "missing", "loc": ("op",), "msg": "required field is missing"})
        elif err["type"] == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag", "")
            out.append({**err, "type": "value_error", "loc": ("op",), "input": tag,
                        "msg": f"expected one of {', '.join(kinds)}, got {shown(tag)}"})
        elif loc and loc[0] in kinds:
            out.append({**err, "loc": loc[1:], "op": loc[0]})
        else:
            out.append(err)
    return out


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
    for err in _merge_union_members(_op_errors(errors)):
        loc = tuple(err["loc"])
        m = re.match(r"(?:Value error, )?(\w+): (.*)", err["msg"], re.S)
        if not loc and m and m.group(1) in spec_fields():  # a cross-field rule names its field
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
        spec = parse_spec(_plain(root))
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
    from .. import settings
    try:
        return settings.get("TILEGEN_CONFIG_TIMEOUT_S")
    except ValueError:
        text = settings.SETTINGS["TILEGEN_CONFIG_TIMEOUT_S"].text()
        raise SpecError([(SourceLoc("TILEGEN_CONFIG_TIMEOUT_S", 1, 1),
                          f"expected a positive number of seconds, got {shown(text)}")]) from None


def load_python_spec(path: str | Path) -> LoadedSpec:
    """A Python config: a module that defines ``SPEC`` as a KernelSpec or a dict of fields. It runs in
    a child process bounded in time (tilegen.core.pyconfig): however it ends, the result is a spec or a
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
    if kind == "value" and isinstance(outcome[1], (OpSpec, dict)):
        try:
            spec = outcome[1] if isinstance(outcome[1], OpSpec) else parse_spec(outcome[1])
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
    schema = _adapter().json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tilegen kernel spec"
    return schema
