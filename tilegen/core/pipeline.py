"""The pipeline: spec -> lowered (per world size) -> check -> render, for every op family alike
(tilegen.core.family). Code is rendered only from lowered ops the checker accepted; what the
checker said is remembered beside the package (VerdictCache), keyed on what it was asked and on
the source of every module its answer depends on.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .calibration import manifest_record, resolve
from .family import family_of
from .render import CodegenError, render_op, render_package_files
from .spec import OpSpec
from .spec_files import LoadedSpec


PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the tilegen package
# The modules whose verdicts are cached (each family's checker, with the question it is asked);
# what they import from tilegen is found by reading them (semantic_modules).
CHECKERS = ("collective.check", "overlap.check", "moe.check")


def _module_file(name: str) -> Path | None:
    """The file of tilegen module `name` (dotted, below the package: "collective.check"), if any."""
    base = PACKAGE_DIR.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _tilegen_imports(name: str) -> set[str]:
    """The tilegen modules one module imports, anywhere in it (function-level imports too), as
    dotted names below the package."""
    path = _module_file(name)
    tree = ast.parse(path.read_bytes())
    here = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the module's own package up
                base = here[:len(here) - (node.level - 1)]
            elif module == "tilegen" or module.startswith("tilegen."):
                base, module = [], module.partition(".")[2]
            else:
                continue
            found.update(_candidates(base, module, node.names))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("tilegen."))
    return {m for m in found if _module_file(m) is not None}


def _candidates(base: list[str], module: str, names) -> set[str]:
    """`from <base>.<module> import names`: the module, or each name where it is a module itself."""
    mod = ".".join(base + ([module] if module else []))
    out = {mod} if mod else set()
    out.update(f"{mod}.{a.name}" if mod else a.name for a in names)
    return out


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
        h.update(f"{m}\0".encode() + _module_file(m).read_bytes())
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
    - verdicts: the checker's, keyed by the question a family asked (a schedule's content with the
      op and the SMs modelled; an op's copy-engine programs; a MoE layout) and checker_version();
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
    def key(question: str) -> str:
        return _sha(f"{checker_version()}|{question}")

    def remember(self, question: str, compute):
        """compute()'s verdict entry (a JSON-able dict), remembered under `question`."""
        key = self.key(question)
        if key in self.verdicts:
            self.hits += 1
            return self.verdicts[key]
        self.misses += 1
        entry = compute()
        self.verdicts[key] = entry
        self._dirty = True
        return entry

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


def _asked(question: str, compute):
    return compute()


def checked_lowering(spec: OpSpec, calibration="auto", check: bool = True,
                     cache: VerdictCache | None = None) -> list:
    """The op lowered at every world size, refused if the checker rejects it (check=False: lowered
    only, for tests of the renderer itself). calibration: as generate_op takes it."""
    family = family_of(spec.op)
    calibration = resolve(calibration, spec.arch) if family.calibrated else None
    lowered = [family.lower(spec, w, calibration) for w in spec.world_sizes]
    if check:
        problems = family.check(spec, lowered, cache.remember if cache is not None else _asked)
        if problems:
            raise CodegenError(f"{spec.name}: " + f"\n{spec.name}: ".join(problems))
    return lowered


def generation_key(spec: OpSpec, nvshmem_headers: str | None, calibration, check: bool) -> str:
    """Everything an op's files are made from: the spec, the calibration the planner read, the
    NVSHMEM headers named in the manifest, and the generator's (and checker's) own sources."""
    import jinja2
    import pydantic
    record = json.dumps(manifest_record(calibration), sort_keys=True, default=str)
    tools = f"python {sys.version_info[:2]}, jinja2 {jinja2.__version__}, pydantic {pydantic.VERSION}"
    return _sha(f"{generator_version()}|{checker_version()}|{tools}|{check}|{nvshmem_headers}|{record}|"
                f"{spec.canonical_json()}")


def generate_op(spec: OpSpec, nvshmem_headers: str | None, calibration="auto",
                check: bool = True, cache: VerdictCache | None = None, root: Path | None = None) -> dict[str, str]:
    """All files of one op (relative to its directory), from its checked lowering. calibration:
    'auto' (the committed measurements of the spec's arch), None, a path, or loaded
    (tilegen.core.calibration); families that measure nothing get None. With a cache and the
    package's folder `root`, files made from the same inputs before and unchanged there since are
    read back instead of lowered, checked and rendered again."""
    calibration = resolve(calibration, spec.arch) if family_of(spec.op).calibrated else None
    key = generation_key(spec, nvshmem_headers, calibration, check) if cache is not None else ""
    files = cache.op_files(spec.name, key, root) if cache is not None else None
    if files is None:
        files = render_op(spec, checked_lowering(spec, calibration, check, cache), nvshmem_headers,
                          manifest_record(calibration))
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
