"""Variants of a spec swept by filter, as CUTLASS's generator does: a sweep is a base spec, axes of
labelled spec overrides, and a name derived from the labels; a filter picks variants, not one YAML per
variant. `python3 -m bench sweep --sweep fused --filter "tile=128x256x64|256x128x64,cluster=2x1" --list`.

Filter: comma-separated clauses `axis=label|label`; a variant matches when every clause holds. Several
filters: a variant matching any of them is taken. No filter: the sweep's default filters (the variants
measured before)."""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base: dict                          # spec fields every variant shares
    axes: dict[str, dict[str, dict]]    # axis -> label -> the spec fields it sets
    name_format: str                    # a variant's op name from its labels: "ag_c{ctas}_{tile}"
    script: str                         # what times the variants: bench/scripts/<script>
    defaults: tuple[str, ...] = ()      # filters taken when none is given
    about: str = ""

    @property
    def package(self) -> str:
        """The Python package the variants are generated into (at the repository root, ignored by git)."""
        return f"sweep_{self.name}"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    labels: dict[str, str]
    spec: dict


AG_SHAPE = [{"name": "m", "max": 65536}, 8192]
SWEEPS = {s.name: s for s in (
    Sweep("allgather",
          base=dict(op="allgather", dtype="bf16", world_sizes=[2, 4, 8], shape=AG_SHAPE, arch="sm_90"),
          axes={"ctas": {str(c): {"ctas": c} for c in (132, 264, 528)},
                "tile": {"128K": {"tile_bytes": 131072}, "256K": {"tile_bytes": 262144},
                         "1M": {"tile_bytes": 1048576}},
                "sync": {"per_tile": {"sync": "per_tile"}, "barrier": {"sync": "barrier"}},
                "threads": {"512": {"threads": 512}, "1024": {"threads": 1024}}},
          name_format="ag_c{ctas}_{tile}_t{threads}_{sync}",
          script="bench_allgather.py",
          defaults=("ctas=264|528,tile=128K|256K,sync=per_tile,threads=512",
                    "ctas=132,tile=1M,sync=per_tile,threads=1024", "ctas=264,tile=256K,sync=barrier,threads=512"),
          about="allgather_bf16's CTAs x tile bytes x sync x threads against NCCL (1 MiB - 1 GiB)"),
    Sweep("fused",
          base=dict(op="ag_gemm", dtype="bf16", world_sizes=[2, 4], shape=[{"name": "m", "max": 8192}, 8192],
                    n={"full": 8192}, b_layout="kn", overlap="fused", ctas=8, tile_bytes=262144),
          axes={"tile": {f"{m}x{n}x{k}": {"gemm_tile": [m, n, k]}
                         for m, n, k in ((128, 128, 64), (128, 256, 64), (256, 128, 64), (256, 128, 128))},
                "cluster": {"1x1": {}, "2x1": {"gemm_cluster": [2, 1]}, "1x2": {"gemm_cluster": [1, 2]}},
                "schedule": {"coop": {}, "pingpong": {"gemm_schedule": "pingpong"}}},
          name_format="ag_fused_t{tile}_c{cluster}_{schedule}",
          script="bench_fused_tiles.py",
          defaults=("tile=128x128x64|128x256x64|256x128x64|256x128x128,cluster=1x1,schedule=coop",
                    "tile=128x256x64|256x128x64,cluster=2x1,schedule=coop", "tile=256x128x64,cluster=1x2,schedule=coop",
                    "tile=128x128x64,schedule=pingpong,cluster=1x1|2x1"),
          about="the fused ag_gemm GEMM alone at tile x cluster x schedule against cuBLAS"),
)}


def parse_filter(sweep: Sweep, text: str) -> dict[str, set[str]]:
    """'axis=a|b,axis2=c' -> {axis: {a, b}, axis2: {c}}; unknown axes and labels name what there is."""
    clauses: dict[str, set[str]] = {}
    for clause in filter(None, (c.strip() for c in text.split(","))):
        axis, eq, labels = clause.partition("=")
        axis = axis.strip()
        if not eq or not labels.strip():
            raise ValueError(f"filter clause {clause!r}: expected axis=label[|label...]")
        if axis not in sweep.axes:
            raise ValueError(f"filter: sweep {sweep.name} has no axis {axis!r} (axes: {', '.join(sweep.axes)})")
        wanted = {lb.strip() for lb in labels.split("|")}
        unknown = wanted - set(sweep.axes[axis])
        if unknown:
            raise ValueError(f"filter: axis {axis} of sweep {sweep.name} has no label {sorted(unknown)[0]!r} "
                             f"(labels: {', '.join(sweep.axes[axis])})")
        clauses[axis] = clauses.get(axis, wanted) & wanted  # (an axis named twice: both must hold)
    return clauses


def variants(sweep: Sweep) -> Iterator[Variant]:
    """Every point of the sweep's grid, in axis order."""
    axes = list(sweep.axes)
    for labels in itertools.product(*(sweep.axes[a] for a in axes)):
        chosen = dict(zip(axes, labels))
        spec = dict(sweep.base)
        for a in axes:
            spec.update(sweep.axes[a][chosen[a]])
        name = sweep.name_format.format(**chosen).lower()
        yield Variant(name, chosen, {"name": name, **spec})


def select(sweep: Sweep, filters: tuple[str, ...] = ()) -> list[Variant]:
    """The variants matching any of the filters (the sweep's defaults when none is given)."""
    parsed = [parse_filter(sweep, f) for f in (filters or sweep.defaults)]
    if not parsed:
        return list(variants(sweep))
    return [v for v in variants(sweep) if any(all(v.labels[a] in ls for a, ls in p.items()) for p in parsed)]


def write_specs(chosen: list[Variant], folder: Path, sweep: Sweep) -> list[Path]:
    """One spec file per variant (JSON, which YAML reads; deterministic) in a folder of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):
        old.unlink()
    paths = []
    for v in chosen:
        p = folder / f"{v.name}.yaml"
        spec = dict(v.spec, description=f"sweep {sweep.name}: " + ", ".join(f"{a}={lb}" for a, lb in v.labels.items()))
        p.write_text(json.dumps(spec, indent=1) + "\n")
        paths.append(p)
    return paths


def refused(paths: list[Path]) -> dict[str, str]:
    """The variants tilegen refuses (spec validation or the checker), each with its first message: the
    product's own rules prune the grid (a pingpong 256-row tile, say), so the lab keeps no copy of them."""
    from tilegen.core.pipeline import checked_lowering
    from tilegen.core.spec_files import load_specs
    good, problems = load_specs(paths)
    out = {Path(loc.path).stem: f"{loc}: {msg}" for loc, msg in problems}
    for ls in good:
        try:
            checked_lowering(ls.spec)
        except Exception as e:  # the checker's refusal: reported, the variant skipped
            out[ls.spec.name] = f"{type(e).__name__}: {e}".splitlines()[0]
    return out
