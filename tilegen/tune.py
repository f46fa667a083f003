"""`tilegen tune`: time every schedule, CTA count and tile size of specs on the GPUs.

Run under torchrun on the machine the ops will run on (one GPU per rank):

    torchrun --nproc-per-node 4 -m tilegen.cli tune specs/allreduce_bf16.yaml ... -o calibrations/mine

One op library per candidate schedule is generated and built (rank 0; or beforehand on a CPU machine
with --build-only, then carried); every rank then times each at message sizes from 4 KiB up to
TUNE_MAX_BYTES, at every CTA count and tile size (set at run time through the op's `tune` hook),
CUDA events, median of batches, slowest rank. The output, one <op>_w<world>.json per spec, lists every
measurement (the planner picks the fastest per size: tilegen.core.calibration) and the cost model's
constants fitted to the fastest configuration of each schedule (non-negative least squares of
t = launch + hop * (hops + 1) + busiest_link_bytes / egress + reduce_bytes / reduce_bw).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import sys
from pathlib import Path

from .bench import time_batches
from .collective.layout import layout, tile_bytes_for
from .collective.plan import LL_MAX_BYTES, spec_schedule, TOPOLOGIES, critical_hops, message_sizes, schedule_traffic
from .collective.ops import COLLECTIVE_OPS, OPS, algorithms_for, make_schedule
from .collective.schedules import is_ll
from .collective.spec import CollectiveSpec
from .core.spec import parse_spec


def candidate_specs(spec: CollectiveSpec) -> list[CollectiveSpec]:
    """One spec per schedule of the op, with CTAs and tile fixed (auto -> the defaults). LL schedules
    serve inputs up to LL_MAX_BYTES: their candidates have fewer rows (none if the rows are fixed)."""
    out = []
    for alg in algorithms_for(spec.op):
        data = spec.model_dump()
        # the most CTAs and the smallest tiles of the sweep: signal slots for any configuration it runs
        data.update(name=f"{spec.name}__{alg}", schedule=alg, ctas=max(CTA_SWEEP), tile_bytes=min(TILE_SWEEP))
        # the schedule's own time: an epilogue costs every schedule alike, and a deterministic spec's
        # planner picks among the measured schedules those it may use
        data.update(epilogue=None, deterministic=False)
        if is_ll(alg):
            d0 = data["shape"][0]
            if not isinstance(d0, dict):
                continue
            row_bytes = spec.max_in_bytes(1) // d0["max"]
            rows = LL_MAX_BYTES // (OPS[spec.op].in_rows(max(spec.world_sizes)) * row_bytes)
            if rows < 1:
                continue
            data["shape"][0] = {**d0, "max": min(d0["max"], rows)}
        out.append(parse_spec(data))
    return out


def schedule_features(spec: CollectiveSpec, world: int, alg: str, in_bytes: int) -> dict:
    """What the cost model's terms depend on: bytes over the busiest link, critical hops, bytes a
    rank reads and writes while reducing."""
    s = spec_schedule(spec, alg, world)
    flows, reduce_bytes = schedule_traffic(s, in_bytes, spec.elem_bytes)
    topo = TOPOLOGIES[spec.topology]
    return {"link_bytes": topo.link_time(world, flows) * topo.egress_Bpus, "hops": critical_hops(s),
            "reduce_bytes": reduce_bytes}


def _nnls(a, b):
    """Non-negative least squares for a handful of columns: best unconstrained fit on every subset
    of columns, keeping those with no negative coefficient (exact for this size)."""
    import itertools

    import numpy as np
    best, best_res = np.zeros(a.shape[1]), float("inf")
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (x < 0).any():
                continue
            full = np.zeros(a.shape[1])
            full[list(cols)] = x
            res = float(np.sum((a @ full - b) ** 2))
            if res < best_res:
                best, best_res = full, res
    return best


def fit(rows: list[dict]) -> dict:
    import numpy as np
    a = np.array([[1.0, r["hops"] + 1, r["link_bytes"], r["reduce_bytes"]] for r in rows])
    b = np.array([r["us"] for r in rows])
    launch, hop, inv_bw, inv_red = _nnls(a, b)
    default = TOPOLOGIES["nvswitch"]
    bw = 1.0 / inv_bw if inv_bw > 1e-12 else default.egress_Bpus
    return {"launch_us": float(launch), "hop_us": float(hop), "egress_Bpus": float(bw), "link_Bpus": float(bw),
            "reduce_Bpus": float(1.0 / inv_red) if inv_red > 1e-12 else default.reduce_Bpus}


TUNE_DIR = Path(".tilegen-tune")
TUNE_MAX_BYTES = 64 << 20  # beyond this the choice no longer changes (bandwidth-bound); the planner uses the largest
CTA_SWEEP = (16, 33, 66, 132, 264, 528)
TILE_SWEEP = (64 << 10, 256 << 10, 1 << 20)


def candidate_package(specs: list[CollectiveSpec]) -> tuple[Path, dict[str, list[CollectiveSpec]]]:
    """Where the candidates of these specs are built (keyed by their content), and the candidates."""
    cands = {s.name: candidate_specs(s) for s in specs}
    key = hashlib.sha256("".join(c.canonical_json() for cs in cands.values() for c in cs).encode()).hexdigest()[:12]
    return TUNE_DIR / f"pkg_{key}", cands


def build_candidates(loaded: list, root: Path, cands: dict[str, list[CollectiveSpec]]) -> None:
    """Generate and build every candidate (the checker runs on each, as for any op)."""
    from .core.build import build_package
    from .core.files import write_files
    from .core.pipeline import generate_package
    from .core.runtime import OpLoadError, check_build
    from .core.spec_files import LoadedSpec

    flat = [(c, ls) for ls in loaded for c in cands[ls.spec.name]]
    if not (root / "build.ninja").exists():  # carried from a CPU machine without its build state: built there
        try:
            for c, _ in flat:
                check_build(root / c.name, c.name, None, None)
            return
        except (OpLoadError, FileNotFoundError):
            pass
    write_files(generate_package([LoadedSpec(c, ls.loc) for c, ls in flat], None, "none"), root)
    build_package(root, [c for c, _ in flat], {c.name: str(ls.loc) for c, ls in flat}, progress=False)


def sweep(part: int, threads: int, ll: bool) -> list[tuple[tuple[int, int], list[tuple[int, int]]]]:
    """(ctas, tile bytes) worth timing for parts of `part` bytes, each with the configurations the
    kernel runs the same way (a grid larger than the tiles, a tile larger than a CTA's share): one
    timing stands for all of them, so any configuration a plan picks has a measurement."""
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for c in CTA_SWEEP:
        for t in ((0,) if ll else TILE_SWEEP):
            tile = 0 if ll else tile_bytes_for(part, t, c)
            lines = -(-part // 8)  # LL: a thread per 16-byte line of a part
            grid = min(c, max(1, -(-lines // threads))) if ll else min(c, max(1, -(-part // tile)))
            groups.setdefault((grid, tile), []).append((c, t))
    return [(members[0], members) for members in groups.values()]


def part_of(spec: CollectiveSpec, world: int, schedule: str, in_bytes: int) -> int:
    parts = make_schedule(spec.op, schedule, world, spec.sync).parts
    return layout(spec.op, world, in_bytes, spec.elem_bytes, parts)[1]


def measure_spec(spec: CollectiveSpec, cands: list[CollectiveSpec], pkg, world: int, reps: int) -> list[dict]:
    import torch
    rows = []
    row_bytes = spec.max_in_bytes(1) // spec.max_shape[0]
    k_in = OPS[spec.op].in_rows(world)
    for c in cands:
        op = getattr(pkg, c.name)
        mod = op.load()
        ll = is_ll(c.schedule)
        for n in message_sizes(min(c.max_in_bytes(world), TUNE_MAX_BYTES)):
            m = max(1, n // (k_in * row_bytes))
            if m > c.max_shape[0]:
                continue
            in_bytes = k_in * m * row_bytes
            x = torch.randn((k_in * m,) + tuple(spec.max_shape[1:]), device="cuda").to(getattr(torch, c.torch_dtype))
            out = op.empty_output(m)
            feats = schedule_features(spec, world, c.schedule, in_bytes)
            for (ctas, tile), same in sweep(part_of(spec, world, c.schedule, in_bytes), spec.threads, ll):
                try:
                    mod.tune(ctas, tile)
                    us = time_batches(lambda: op(x, out, timeout_ms=0), 10 if in_bytes <= (16 << 20) else 3, reps,
                                      warmup=2)
                except RuntimeError as e:  # e.g. more tiles than the op has signal slots: every rank alike
                    print(f"  skip {c.schedule} {ctas} CTAs {tile} B tiles at {in_bytes} B: {e}")
                    continue
                rows += [{"schedule": c.schedule, "ctas": k, "tile_bytes": t, "in_bytes": in_bytes, "us": round(us, 3),
                          "timed_as": [ctas, tile], **feats} for k, t in same]
            op.free_outputs()
        mod.tune(0, 0)
    return rows


def fastest_per_schedule(rows: list[dict]) -> list[dict]:
    best: dict[tuple, dict] = {}
    for r in rows:
        k = (r["schedule"], r["in_bytes"])
        if k not in best or r["us"] < best[k]["us"]:
            best[k] = r
    return list(best.values())


def auto_vs_fastest(spec: CollectiveSpec, world: int, path: Path) -> list[tuple[int, str, float, float]]:
    """At each measured size: the configuration the planner picks from this calibration, its measured
    time and the fastest measured time (goal: within 5%)."""
    from .core.calibration import load
    from .collective.plan import plan
    cal = load(path)
    p = plan(spec, world, cal)
    rows = cal.tables[(spec.op, world)]
    out = []
    for n in sorted({r["in_bytes"] for r in rows}):
        v = next(v for v in p.variants if n <= v.max_bytes)
        alg, ll = v.schedule.algorithm, is_ll(v.schedule.algorithm)
        mine = [r["us"] for r in rows if r["in_bytes"] == n and r["schedule"] == alg and r["ctas"] == v.ctas
                and r["tile_bytes"] == (0 if ll else v.tile_bytes)]
        fastest = min(r["us"] for r in rows if r["in_bytes"] == n)
        out.append((n, f"{alg}/{v.ctas}/{v.tile_bytes}", min(mine) if mine else float("nan"), fastest))
    return out


def main(spec_paths: list[str], output: str, reps: int = 5, build_only: bool = False) -> int:
    from .core.spec_files import load_specs

    loaded, problems = load_specs(spec_paths)
    problems += [(ls.at("op"), f"op: tilegen tune times the collectives' schedules ({', '.join(COLLECTIVE_OPS)}); "
                               f"{ls.spec.op} has none of its own to choose between")
                 for ls in loaded if ls.spec.op not in COLLECTIVE_OPS]
    if problems or not loaded:
        for loc, msg in problems:
            print(f"{loc}: {msg}", file=sys.stderr)
        if not problems:
            print("no spec files found (looked for *.yaml, *.yml, *.py)", file=sys.stderr)
        return 1
    root, cands = candidate_package([ls.spec for ls in loaded])
    if build_only:
        build_candidates(loaded, root, cands)
        print(f"built {sum(len(c) for c in cands.values())} candidate ops in {root}")
        return 0
    import torch
    import torch.distributed as dist

    import tilegen
    rank, world = tilegen.init()
    if rank == 0:
        build_candidates(loaded, root, cands)
    dist.barrier()
    sys.path.insert(0, str(root.parent.resolve()))
    pkg = importlib.import_module(root.name)
    out_dir = Path(output)
    for ls in loaded:
        spec = ls.spec
        if world not in spec.world_sizes:
            continue
        rows = measure_spec(spec, cands[spec.name], pkg, world, reps)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{spec.op}_w{world}.json"
            calib = {"format": 2, "op": spec.op, "world": world, "spec": spec.name, "dtype": spec.dtype,
                     "device": f"{world} x {torch.cuda.get_device_name()}",
                     "topology": fit(fastest_per_schedule(rows)), "measurements": rows}
            path.write_text(json.dumps(calib, indent=1) + "\n")
            print(f"wrote {path}: {len(rows)} measurements")
            for n, cfg, mine, fastest in auto_vs_fastest(spec, world, path):
                print(f"  {n:>11} B  auto {cfg:<28} {mine:9.1f} us  fastest {fastest:9.1f} us  "
                      f"({mine / fastest:.3f}x)")
        dist.barrier()
    tilegen.finalize()
    dist.destroy_process_group()
    return 0
