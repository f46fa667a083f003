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
from pathlib import Path

import jinja2

from . import __version__
from .check import check_schedule
from .plan import MIN_TILE_BYTES, Plan, plan
from .spec import DynamicDim, KernelSpec, LoadedSpec

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
DEVICE_HEADERS = ("device/tilegen/device.cuh",)
OP_TEMPLATES = {  # op kind -> (template, output file name pattern)
    "allgather": (("allgather.cu.j2", "{name}.cu"), ("binding.cc.j2", "{name}_binding.cc"), ("op.py.j2", "op.py")),
}
STEP_KIND = {"entry": 0, "copy": 1, "wait": 2}
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


def template_files(kind: str) -> list[str]:
    return sorted([t for t, _ in OP_TEMPLATES[kind]] + list(DEVICE_HEADERS))


def template_hash(kind: str) -> str:
    h = hashlib.sha256()
    for rel in template_files(kind):
        h.update(rel.encode() + b"\0" + (TEMPLATES_DIR / rel).read_bytes() + b"\0")
    return h.hexdigest()


def _mask(ranks) -> int:
    m = 0
    for r in ranks:
        m |= 1 << r
    return m


def step_table(p: Plan) -> list[list[tuple[int, ...]]]:
    """Per-rank rows of (kind, chunk, src_output, wait_src, dests, notify, await) for the C++ table."""
    rows = []
    for steps in p.schedule.ranks:
        rows.append([(STEP_KIND[s.kind], s.chunk, int(s.src == "output"), int(s.wait_src), _mask(s.dests),
                      _mask(s.notify), _mask(s.await_ranks)) for s in steps])
    return rows


def checked_plans(spec: KernelSpec) -> list[Plan]:
    """Plan every world size and refuse to emit code for a schedule the checker rejects."""
    plans = []
    for w in spec.world_sizes:
        p = plan(spec, w)
        verdict = check_schedule(p.schedule)
        if not verdict.ok:
            raise CodegenError(f"{spec.name}: world {w}: the checker rejected the {p.schedule.algorithm} schedule:\n{verdict}")
        plans.append(p)
    return plans


def _op_id(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:7], 16)


def _shape_text(spec: KernelSpec) -> str:
    return ", ".join(f"{d.name}<={d.max}" if isinstance(d, DynamicDim) else str(d) for d in spec.shape)


def render_context(spec: KernelSpec, plans: list[Plan]) -> dict:
    worlds = []
    for p in plans:
        worlds.append({"world": p.world, "algorithm": p.schedule.algorithm, "nsteps": p.schedule.max_steps,
                       "table": step_table(p)})
    code, bits = DL_CODES[spec.dtype]
    return {
        "tilegen_version": __version__,
        "spec": spec,
        "spec_hash": spec.spec_hash(),
        "shape_text": _shape_text(spec),
        "py_shape": repr([{"name": d.name, "max": d.max} if isinstance(d, DynamicDim) else d for d in spec.shape]),
        "op_id": _op_id(spec.name),
        "max_world": max(spec.world_sizes),
        "max_steps": max(p.schedule.max_steps for p in plans),
        "max_tiles": plans[0].max_tiles,
        "max_shard_bytes": spec.max_shard_bytes,
        "min_tile_bytes": MIN_TILE_BYTES,
        "worlds": worlds,
        "dl_code": code,
        "dl_bits": bits,
    }


def nvcc_arch_flags(arch: str) -> list[str]:
    num = re.sub(r"^sm_", "", arch)
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]


def manifest(spec: KernelSpec, plans: list[Plan], files: dict[str, str], nvshmem_headers: str | None) -> dict:
    """What the sources are and where they came from (toolchain used to build: build.json)."""
    return {
        "tilegen_version": __version__,
        "name": spec.name,
        "op": spec.op,
        "spec": json.loads(spec.canonical_json()),
        "spec_hash": spec.spec_hash(),
        "template_hash": template_hash(spec.op),
        "templates": template_files(spec.op),
        "arch": spec.arch,
        "nvcc_flags": ["-O3", "-std=c++17", "-rdc=true"] + nvcc_arch_flags(spec.arch),
        "nvshmem_headers": nvshmem_headers,
        "plans": {str(p.world): {"algorithm": p.schedule.algorithm, "reason": p.reason} for p in plans},
        "files": {name: hashlib.sha256(text.encode()).hexdigest() for name, text in sorted(files.items())},
    }


def render_op(spec: KernelSpec, nvshmem_headers: str | None) -> dict[str, str]:
    """All files of one op, relative to its directory."""
    plans = checked_plans(spec)
    env = _env()
    ctx = render_context(spec, plans)
    files = {}
    for tmpl, pattern in OP_TEMPLATES[spec.op]:
        files[pattern.format(name=spec.name)] = env.get_template(tmpl).render(**ctx)
    files["manifest.json"] = json.dumps(manifest(spec, plans, files, nvshmem_headers), indent=2, sort_keys=True) + "\n"
    return files


def render_package(specs: list[LoadedSpec], package: str, nvshmem_headers: str | None) -> dict[str, str]:
    """Every file of a generated package, relative to its root."""
    out: dict[str, str] = {}
    names = sorted(ls.spec.name for ls in specs)
    env = _env()
    out["__init__.py"] = env.get_template("package_init.py.j2").render(
        tilegen_version=__version__, ops=names, package=package)
    for rel in DEVICE_HEADERS:
        out[f"_include/{rel.removeprefix('device/')}"] = (TEMPLATES_DIR / rel).read_text()
    for ls in sorted(specs, key=lambda s: s.spec.name):
        for name, text in render_op(ls.spec, nvshmem_headers).items():
            out[f"{ls.spec.name}/{name}"] = text
    return out


def write_package(files: dict[str, str], root: Path) -> FileManager:
    fm = FileManager(root)
    for rel, text in sorted(files.items()):
        fm.write(rel, text)
    return fm
