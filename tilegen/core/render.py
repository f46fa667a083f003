"""Rendering: an op's lowered artifacts -> its family's context -> files. Renders only (the
pipeline hands it checked artifacts); it computes nothing an op runs by.

The kernels and the host code live in the library headers (tilegen/include/tilegen, copied into every
generated package); a generated op holds its traits (constants), its tables (one entry per line,
decoded in a comment), the binding's constants and a Python wrapper. Output is deterministic: no
timestamps, no absolute paths, sorted JSON.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

import jinja2
from pydantic import BaseModel

from .. import __version__
from .family import FAMILY_PACKAGES, Family, family_of
from .files import LIBRARY_COPY
from .spec import DynamicDim, OpSpec, ShardedDim
from .toolchain import kernel_flags

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the tilegen package
INCLUDE_DIR = PACKAGE_DIR / "include"
TEMPLATE_DIRS = (PACKAGE_DIR / "core" / "templates",) + tuple(PACKAGE_DIR / p / "templates" for p in FAMILY_PACKAGES)
LIBRARY_HEADERS = tuple(sorted(p.relative_to(INCLUDE_DIR).as_posix() for p in (INCLUDE_DIR / "tilegen").rglob("*")
                               if p.suffix in (".cuh", ".h")))
DL_CODES = {"bf16": (4, 16), "f16": (2, 16), "f32": (2, 32), "i32": (0, 32), "u8": (1, 8)}
_INCLUDE = re.compile(r'^\s*#\s*include\s+"(tilegen/[^"]+)"', re.M)


class CodegenError(Exception):
    pass


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    """One environment per process: it compiles each template once."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in TEMPLATE_DIRS if d.is_dir()]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["fixed"] = lambda text, width: str(text).ljust(width)  # aligns the decoded-step comments
    return env


def _template_path(name: str) -> Path:
    return Path(_env().get_template(name).filename)


@lru_cache(maxsize=None)
def _header_closure(header: str) -> frozenset[str]:
    """A library header and every library header it includes, transitively."""
    found = {header}
    for h in _INCLUDE.findall((INCLUDE_DIR / header).read_text()):
        if (INCLUDE_DIR / h).is_file() and h not in found:
            found |= _header_closure(h)
    return frozenset(found)


def op_headers(files: dict[str, str]) -> tuple[str, ...]:
    """The library headers an op's rendered sources include, found by following their #include
    lines (the manifest's template hash covers these, so editing one family's kernels changes that
    family's ops only)."""
    found: set[str] = set()
    for text in files.values():
        for h in _INCLUDE.findall(text):
            if (INCLUDE_DIR / h).is_file():
                found |= _header_closure(h)
    return tuple(sorted(found))


def template_files(spec: OpSpec, files: dict[str, str]) -> list[str]:
    """The templates and library headers an op's files are made from."""
    return sorted([t for t, _ in family_of(spec.op).templates(spec)] + [f"include/{h}" for h in op_headers(files)])


@lru_cache(maxsize=None)
def _files_hash(rels: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for rel in rels:
        path = PACKAGE_DIR / rel if rel.startswith("include/") else _template_path(rel)
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def op_id(name: str) -> int:
    """The op's number in its wait reports (a hash of its name)."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:7], 16)


def _dim_text(d) -> str:
    if isinstance(d, DynamicDim):
        return f"{d.name}<={d.max}"
    return f"{d.full}/world" if isinstance(d, ShardedDim) else str(d)


def base_context(spec: OpSpec) -> dict:
    """What every op's templates have."""
    code, bits = DL_CODES[spec.dtype]
    return {
        "tilegen_version": __version__,
        "spec": spec,
        "spec_hash": spec.spec_hash(),
        "shape_text": ", ".join(_dim_text(d) for d in spec.shape),
        "py_shape": repr([d.model_dump() if isinstance(d, BaseModel) else d for d in spec.shape]),
        "dl_code": code,
        "dl_bits": bits,
    }


def manifest(spec: OpSpec, family: Family, lowered: list, files: dict[str, str], nvshmem_headers: str | None,
             calibration: dict | None = None) -> dict:
    """What the sources are and where they came from (toolchain used to build: build.json)."""
    made_from = template_files(spec, files)
    return {
        "tilegen_version": __version__,
        "name": spec.name,
        "op": spec.op,
        "family": family.name,
        "spec": json.loads(spec.canonical_json()),
        "spec_hash": spec.spec_hash(),
        "template_hash": _files_hash(tuple(made_from)),
        "templates": made_from,
        "arch": spec.arch,
        "nvcc_flags": kernel_flags(spec.arch),
        "nvshmem_headers": nvshmem_headers,
        "calibration": calibration,
        "summary": family.summary(spec, lowered),
        **family.manifest(spec, lowered),
        "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())},
    }


def render_op(spec: OpSpec, lowered: list, nvshmem_headers: str | None,
              calibration: dict | None = None) -> dict[str, str]:
    """All files of one op from its (checked) lowered artifacts, relative to the op's directory."""
    env, family = _env(), family_of(spec.op)
    ctx = {**base_context(spec), **family.context(spec, lowered)}
    files = {pat.format(name=spec.name): env.get_template(t).render(**ctx) for t, pat in family.templates(spec)}
    files["manifest.json"] = (
        json.dumps(manifest(spec, family, lowered, files, nvshmem_headers, calibration), indent=2, sort_keys=True)
        + "\n"
    )
    return files


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
