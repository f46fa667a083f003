"""Measured calibrations: what `tilegen tune` timed on real GPUs, and the planner's use of it.

A calibration file holds, for one op kind and world size, the time of every schedule at every CTA
count and tile size tried, per message size (plus the cost model's constants fitted to them). The
planner then picks, at each size, the configuration measured fastest at the nearest measured size
instead of the model's guess; sizes, op kinds or worlds without measurements fall back to the model.

Calibrations measured on the machines this project is tested on are committed under
tilegen/calibrations/<machine>/ and used by default for their arch (`--calibration auto`);
`--calibration none` plans by the model alone and `--calibration PATH` (a file or a directory of
them) uses another machine's.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..collective.schedules import is_ll

CALIBRATIONS_DIR = Path(__file__).resolve().parent.parent / "calibrations"
DEFAULT_MACHINE = {"sm_90": "h100-sxm-nvswitch", "sm_90a": "h100-sxm-nvswitch"}  # arch -> committed measurements
FORMAT = 2


@dataclass(frozen=True)
class Pick:
    algorithm: str
    ctas: int
    tile_bytes: int
    us: float


@dataclass
class Calibration:
    """Measurements by (op kind, world): rows of schedule, ctas, tile_bytes, in_bytes, us."""

    source: str
    tables: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    devices: dict[tuple[str, int], str] = field(default_factory=dict)
    digest: str = ""
    # the copy-engine overlap's measured (style, splits) by size: (kind, world) -> ((largest m, style,
    # splits), ...) ascending, from <dir>/copy_engine/choices.json (bench/scripts/ce_calibrate.py)
    ce_choices: dict[tuple[str, int], tuple[tuple[int, str, int], ...]] = field(default_factory=dict)

    def has(self, op: str, world: int) -> bool:
        return (op, world) in self.tables

    def record(self) -> dict:
        """What a manifest records of it."""
        return {"source": self.source, "sha256": self.digest,
                "measured": sorted([f"{op} world {w} on {d}" for (op, w), d in self.devices.items()]
                                   + [f"{op} copy-engine choices, world {w}" for op, w in self.ce_choices])}

    def rows(self, op: str, world: int, algorithms: list[str], ctas: int | None, tile_bytes: int | None) -> list[dict]:
        """The measurements of these schedules, at the spec's fixed CTAs / tile when given (LL ones
        have no tiles)."""
        return [r for r in self.tables.get((op, world), []) if r["schedule"] in algorithms
                and (ctas is None or r["ctas"] == ctas)
                and (tile_bytes is None or is_ll(r["schedule"]) or r["tile_bytes"] == tile_bytes)]

    def best(self, op: str, world: int, in_bytes: int, algorithms: list[str], ctas: int | None = None,
             tile_bytes: int | None = None) -> dict[str, Pick]:
        """Per schedule, its fastest measured configuration at the measured size nearest in_bytes
        (ratio), among the fixed ctas / tile when given. Empty without measurements there."""
        near = self.nearest(op, world, in_bytes)
        if near is None:
            return {}
        out: dict[str, Pick] = {}
        for r in self.rows(op, world, algorithms, ctas, tile_bytes):
            if r["in_bytes"] != near:
                continue
            p = Pick(r["schedule"], r["ctas"], r["tile_bytes"], r["us"])
            if r["schedule"] not in out or (p.us, p.ctas) < (out[r["schedule"]].us, out[r["schedule"]].ctas):
                out[r["schedule"]] = p
        return out

    def nearest(self, op: str, world: int, in_bytes: int) -> int | None:
        sizes = sorted({r["in_bytes"] for r in self.tables.get((op, world), [])})
        if not sizes:
            return None
        return min(sizes, key=lambda s: (abs(math.log2(s) - math.log2(max(in_bytes, 1))), s))

    def segments(self, op: str, world: int, algorithms: list[str], max_in: int, max_variants: int,
                 ctas: int | None = None, tile_bytes: int | None = None) -> list[tuple[int, Pick, float]]:
        """Split the measured sizes (up to max_in) into at most max_variants ranges, one configuration
        (schedule, ctas, tile) each, minimising the worst ratio of a size's time to the fastest
        measured at that size. Returns (top size, configuration, its worst ratio) per range; empty
        without measurements."""
        rows = [r for r in self.rows(op, world, algorithms, ctas, tile_bytes) if r["in_bytes"] <= max_in]
        sizes = sorted({r["in_bytes"] for r in rows})
        if not sizes:
            return []
        times: dict[tuple[str, int, int], dict[int, float]] = {}
        for r in rows:
            cfg = (r["schedule"], r["ctas"], r["tile_bytes"])
            t = times.setdefault(cfg, {})
            t[r["in_bytes"]] = min(t.get(r["in_bytes"], math.inf), r["us"])
        fastest = {n: min(t[n] for t in times.values() if n in t) for n in sizes}

        @lru_cache(maxsize=None)
        def best(i: int, j: int) -> tuple[float, tuple[str, int, int] | None]:  # one config for sizes[i..j]
            span = sizes[i:j + 1]
            got = [(max(t[n] / fastest[n] for n in span), cfg) for cfg, t in times.items() if all(n in t for n in span)]
            return min(got) if got else (math.inf, None)

        @lru_cache(maxsize=None)
        def split(i: int, k: int) -> tuple[float, tuple[int, ...]]:  # sizes[i:] in at most k ranges: (worst, tops)
            if k == 1:
                return best(i, len(sizes) - 1)[0], (len(sizes) - 1,)
            out = (best(i, len(sizes) - 1)[0], (len(sizes) - 1,))
            for j in range(i, len(sizes) - 1):
                rest = split(j + 1, k - 1)
                cand = (max(best(i, j)[0], rest[0]), (j,) + rest[1])
                if cand[0] < out[0] - 1e-9:
                    out = cand
            return out

        worst, tops = split(0, max_variants)
        if math.isinf(worst):
            return []
        out, lo = [], 0
        for j in tops:
            ratio, (alg, c, t) = best(lo, j)
            out.append((sizes[j], Pick(alg, c, t, times[(alg, c, t)][sizes[j]]), ratio))
            lo = j + 1
        return out


def _add_file(cal: Calibration, path: Path, h) -> None:
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a tilegen calibration of format {FORMAT} (rerun `tilegen tune`)")
    key = (data["op"], int(data["world"]))
    cal.tables.setdefault(key, []).extend(data["measurements"])
    cal.devices[key] = data.get("device", "?")
    h.update(path.name.encode() + b"\0" + path.read_bytes())


CE_CHOICES = Path("copy_engine") / "choices.json"  # in a calibration directory


def load(path: str | Path, name: str | None = None) -> Calibration:
    """A calibration file, or a directory of them (one per op kind and world, and the copy-engine
    choices in copy_engine/choices.json)."""
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    choices = p / CE_CHOICES if p.is_dir() and (p / CE_CHOICES).is_file() else None
    if not files and choices is None:
        raise ValueError(f"{p}: no calibration files")
    cal = Calibration(name or str(p))
    h = hashlib.sha256()
    for f in files:
        _add_file(cal, f, h)
    if choices is not None:
        _add_ce_choices(cal, choices, h)
    cal.digest = h.hexdigest()
    return cal


def _add_ce_choices(cal: Calibration, path: Path, h) -> None:
    data = json.loads(path.read_text())
    for kind, by_world in data.get("choices", {}).items():
        for world, rows in by_world.items():
            cal.ce_choices[(kind, int(world))] = tuple((int(top), str(style), int(splits))
                                                      for top, style, splits in rows)
    h.update(str(CE_CHOICES).encode() + b"\0" + path.read_bytes())


def ce_choices(calibration, kind: str, world: int) -> tuple[tuple[int, str, int], ...]:
    """The copy-engine choices a calibration holds for this op kind and world (none: ())."""
    return calibration.ce_choices.get((kind, world), ()) if isinstance(calibration, Calibration) else ()


@lru_cache(maxsize=None)
def default_for(arch: str) -> Calibration | None:
    """The committed calibration of the machine this arch was measured on, if any."""
    machine = DEFAULT_MACHINE.get(arch)
    d = CALIBRATIONS_DIR / machine if machine else None
    if d is None or not d.is_dir() or not (any(d.glob("*.json")) or (d / CE_CHOICES).is_file()):
        return None
    return load(d, name=f"tilegen/calibrations/{machine}")


def resolve(calibration, arch: str):
    """'auto' -> the committed default for the arch (or None); 'none'/None -> None; a path -> loaded;
    a Calibration or a dict of cost-model constants -> itself."""
    if calibration is None or calibration == "none":
        return None
    if calibration == "auto":
        return default_for(arch)
    if isinstance(calibration, (str, Path)):
        p = Path(calibration)
        if p.is_file():
            data = json.loads(p.read_text())
            if "format" not in data and "topology" in data:  # cost-model constants only (tilegen tune before v2)
                return data["topology"]
        return load(p)
    return calibration


def manifest_record(calibration) -> dict | None:
    """How a manifest names the calibration a plan used."""
    if calibration is None:
        return None
    return calibration.record() if isinstance(calibration, Calibration) else {"constants": calibration}
