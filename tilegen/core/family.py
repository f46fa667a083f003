"""The interface every op family implements, and the list of families.

The shared stages (spec loading, the pipeline, rendering, the build, `tilegen plan`) ask an op's
family, never the op kind: adding an op family is a package under tilegen/ with a ``family.py``
defining FAMILY, and its name in FAMILY_PACKAGES.

Data flow one way, per op: spec -> lower (one artifact per world size: everything the kernel and
its buffers are made for) -> check (the artifacts, before any code) -> context (the templates'
values, read off the artifacts) -> render -> build -> load.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Callable

FAMILY_PACKAGES = ("collective", "overlap", "moe")


class Family:
    """One op family. Subclasses set the class attributes and implement the stages."""

    name: str = ""
    ops: dict[str, str] = {}  # op kind -> what it computes
    spec_model: type = object  # its pydantic model (a tilegen.core.spec.OpSpec)
    calibrated: bool = False  # whether lowering reads measurements (tilegen generate --calibration)

    def lower(self, spec, world: int, calibration) -> Any:
        """The op lowered at `world` ranks (calibration: a loaded one or None)."""
        raise NotImplementedError

    def check(self, spec, lowered: list, remember: Callable[[str, Callable[[], dict]], dict]) -> list[str]:
        """Problems the checker finds in the lowered op ([]: accepted). remember(question, compute)
        returns compute()'s verdict dict, from the verdict cache where it was asked before."""
        raise NotImplementedError

    def templates(self, spec) -> tuple[tuple[str, str], ...]:
        """(template, file name pattern) of each file the op renders ({name}: the op's name)."""
        raise NotImplementedError

    def context(self, spec, lowered: list) -> dict:
        """The templates' values for this op, read off its lowered artifacts."""
        raise NotImplementedError

    def manifest(self, spec, lowered: list) -> dict:
        """What the manifest records of this op beyond the spec: its plans, programs or layout."""
        raise NotImplementedError

    def summary(self, spec, lowered: list) -> str:
        """What the op runs, in a few words (`tilegen list`)."""
        raise NotImplementedError

    def describe(self, spec, world: int, calibration, svg: tuple | None = None) -> tuple[str, bool]:
        """`tilegen plan`: the op at `world` ranks in words, and whether the checker accepts it;
        svg: (path, shard bytes or None) to draw its schedule to, where it has one."""
        raise NotImplementedError


@lru_cache(maxsize=1)
def families() -> tuple[Family, ...]:
    return tuple(importlib.import_module(f"tilegen.{p}.family").FAMILY for p in FAMILY_PACKAGES)


def family_of(op: str) -> Family:
    for f in families():
        if op in f.ops:
            return f
    raise KeyError(f"no op family has op {op!r}")
