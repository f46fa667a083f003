"""`tilegen tune`: measure every candidate schedule of a spec on the GPUs and fit the cost model.

Run under torchrun on the machine the ops will run on:

    torchrun --nproc-per-node 2 -m tilegen.cli tune specs/allreduce_bf16.yaml -o calibration.json

Rank 0 generates and builds one copy of the spec per candidate schedule (schedule fixed); every rank
then times each at sizes from 4 KiB to the spec's maximum (CUDA events, median of batches). A non-negative
least-squares fit of  t = launch + hop * (hops + 1) + busiest_link_bytes / egress + reduce_bytes /
reduce_bw  over all measurements gives the constants `tilegen plan/generate --calibration FILE` use.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import statistics
import sys
from pathlib import Path

from .plan import TOPOLOGIES, critical_hops, message_sizes, schedule_traffic
from .registry import OPS, algorithms_for, make_schedule
from .spec import KernelSpec


def candidate_specs(spec: KernelSpec) -> list[KernelSpec]:
    """One spec per schedule of the op, with CTAs and tile fixed (auto -> the defaults)."""
    out = []
    for alg in algorithms_for(spec.op):
        data = spec.model_dump()
        data.update(name=f"{spec.name}__{alg}", schedule=alg,
                    ctas=264 if spec.ctas == "auto" else spec.ctas,
                    tile_bytes=256 * 1024 if spec.tile_bytes == "auto" else spec.tile_bytes)
        out.append(KernelSpec.model_validate(data))
    return out


def schedule_features(spec: KernelSpec, world: int, alg: str, in_bytes: int) -> dict:
    """What the cost model's terms depend on: bytes over the busiest link, critical hops, bytes a
    rank reads and writes while reducing."""
    s = make_schedule(spec.op, alg, world, spec.sync, spec.fused)
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


def tune(spec_path: str, output: str, reps: int = 15) -> int:
    import torch
    import torch.distributed as dist

    import tilegen
    from .build import build_package
    from .files import write_files
    from .pipeline import generate_package
    from .spec import LoadedSpec, load_spec

    ls = load_spec(spec_path)
    rank, world = tilegen.init()
    cands = candidate_specs(ls.spec)
    key = hashlib.sha256("".join(c.canonical_json() for c in cands).encode()).hexdigest()[:12]
    root = Path(".tilegen-tune") / f"pkg_{key}"
    if rank == 0:
        loaded = [LoadedSpec(c, ls.loc) for c in cands]
        write_files(generate_package(loaded, None), root)
        build_package(root, cands, {c.name: spec_path for c in cands}, progress=False)
    dist.barrier()
    sys.path.insert(0, str(root.parent.resolve()))
    pkg = importlib.import_module(root.name)
    rows = []
    elem = ls.spec.elem_bytes
    inner = 1
    for d in ls.spec.max_shape[1:]:
        inner *= d
    row_bytes = inner * elem
    k_in = OPS[ls.spec.op].in_rows(world)
    for c in cands:
        op = getattr(pkg, c.name)
        for n in message_sizes(ls.spec.max_in_bytes(world)):
            m = max(1, n // (k_in * row_bytes))
            x = torch.randn((k_in * m,) + tuple(ls.spec.max_shape[1:]), device="cuda").to(getattr(torch, c.torch_dtype))
            out = op.empty_output(m)
            for _ in range(3):
                op(x, out)
            times = []
            for _ in range(reps):
                dist.barrier()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(10):
                    op(x, out)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 100.0)  # us per call
            # the slowest rank's median: a collective ends when its last rank does
            t = torch.tensor([statistics.median(times)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            feats = schedule_features(ls.spec, world, c.schedule, k_in * m * row_bytes)
            rows.append({"schedule": c.schedule, "in_bytes": k_in * m * row_bytes, "us": t.item(), **feats})
            op.free_outputs()
    if rank == 0:
        calib = {"spec": ls.spec.name, "world": world, "device": torch.cuda.get_device_name(),
                 "topology": fit(rows), "measurements": rows}
        Path(output).write_text(json.dumps(calib, indent=2) + "\n")
        print(f"wrote {output}: " + ", ".join(f"{k}={v:.3g}" for k, v in calib["topology"].items()))
        for r in rows:
            print(f"  {r['schedule']:<11} {r['in_bytes']:>11} B {r['us']:9.1f} us")
    tilegen.finalize()
    dist.destroy_process_group()
    return 0
