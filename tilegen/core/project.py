"""tilegen inside another project's build: its `[tool.tilegen]` table and the generate step that
`tilegen.build_backend` runs before setuptools packs the wheel.

    [build-system]
    requires = ["setuptools>=68", "tilegen"]
    build-backend = "tilegen.build_backend"

    [tool.tilegen]
    specs = ["specs/"]          # spec files or folders, relative to the project
    package = "myproject_ops"   # the top-level package the ops are generated into (may be under src/)
    archs = ["sm_90a", "sm_100a"]   # GPU code every library holds (default: each spec's arch)
    calibration = "auto"        # as `tilegen generate --calibration`

The step is `tilegen generate <specs> -o <package> --prune`: incremental (unchanged sources are not
rewritten, ninja rebuilds nothing), so a second `pip wheel .` rebuilds nothing.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .files import LIBRARY_COPY
from .toolchain import ARCH_PATTERN

# What a wheel carries of a generated package (besides its __init__.py): the libraries, their
# provenance, the wrappers and the reviewable sources; not objects, ninja state or verdicts.
PACKAGE_DATA = [f"{LIBRARY_COPY}/tilegen/*", "*/op.py", "*/manifest.json", "*/*.cu", "*/*.cc", "*/*.inc",
                "*/_build/build.json", "*/_build/*.so"]


class ProjectError(Exception):
    pass


@dataclass(frozen=True)
class ProjectConfig:
    root: Path
    specs: tuple[str, ...]
    package: str  # folder of the generated package, relative to root
    archs: tuple[str, ...] = ()
    calibration: str = "auto"
    jobs: int | None = None

    @property
    def package_name(self) -> str:
        return Path(self.package).name


def _toml(path: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def read_config(pyproject: Path) -> ProjectConfig | None:
    """The project's [tool.tilegen] table, checked (None if it has none)."""
    table = _toml(pyproject).get("tool", {}).get("tilegen")
    if table is None:
        return None
    where = f"{pyproject}: [tool.tilegen]"
    known = {"specs", "package", "archs", "calibration", "jobs"}
    extra = sorted(set(table) - known)
    if extra:
        raise ProjectError(f"{where}: unknown key(s) {', '.join(extra)}; expected {', '.join(sorted(known))}")
    specs = table.get("specs")
    if not isinstance(specs, list) or not specs or not all(isinstance(s, str) for s in specs):
        raise ProjectError(f"{where}.specs: expected a list of spec files or folders, got {specs!r}")
    package = table.get("package")
    if not isinstance(package, str) or not re.fullmatch(r"([\w.-]+/)*[A-Za-z_]\w*", package):
        raise ProjectError(f"{where}.package: expected the folder of a top-level package (e.g. 'myproject_ops' or "
                           f"'src/myproject_ops'), got {package!r}")
    archs = table.get("archs", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) and re.fullmatch(ARCH_PATTERN, a) for a in archs):
        raise ProjectError(f"{where}.archs: expected GPU archs like ['sm_90a', 'sm_100a'], got {archs!r}")
    cal = table.get("calibration", "auto")
    if not isinstance(cal, str):
        raise ProjectError(f"{where}.calibration: expected 'auto', 'none' or a path, got {cal!r}")
    jobs = table.get("jobs")
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise ProjectError(f"{where}.jobs: expected a positive number of parallel compile jobs, got {jobs!r}")
    root = pyproject.resolve().parent
    for s in specs:
        if not (root / s).exists():
            raise ProjectError(f"{where}.specs: {s} does not exist (relative to {root})")
    return ProjectConfig(root, tuple(specs), package, tuple(archs), cal, jobs)


def generate(cfg: ProjectConfig, quiet: bool = True, build: bool = True) -> None:
    """Generate and build the project's ops into its package (a no-op when nothing changed);
    build=False: sources only (what setuptools needs to find the package for the metadata)."""
    from .. import cli

    cal = cfg.calibration if cfg.calibration in ("auto", "none") else str(cfg.root / cfg.calibration)
    args = ["generate", *[str(cfg.root / s) for s in cfg.specs], "-o", str(cfg.root / cfg.package), "--prune",
            "--calibration", cal]
    if cfg.archs:
        args += ["--archs", ",".join(cfg.archs)]
    if cfg.jobs:
        args += ["-j", str(cfg.jobs)]
    if quiet:
        args.append("-q")
    if not build:
        args.append("--no-build")
    rc = cli.main(args)
    if rc != 0:
        raise ProjectError(f"tilegen generate for {cfg.root / 'pyproject.toml'} failed (exit {rc}); see above")
