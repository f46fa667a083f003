"""AllGather+GEMM and GEMM+ReduceScatter: tilegen's copy-engine, decomposed and fused (CUTLASS) overlap against
NCCL and cuBLAS in sequence and torch's fused_all_gather_matmul / fused_matmul_reduce_scatter, same
run; overlap efficiency = GEMM alone (cuBLAS) / overlapped time, per tilegen variant.

    torchrun --nproc-per-node 2 bench/scripts/bench_gemm.py [--out r.json] [--splits 1,2,4] [--styles all]

--splits / --styles also time the copy-engine ops at each number of row splits per chunk and each
program style (TILEGEN_CE_SPLITS / TILEGEN_CE_STYLE; columns ce_<style>_<splits>): the measurements
bench/scripts/ce_calibrate.py turns into the size ranges `overlap: auto` chooses by.

Shapes are per rank with TP = world: C[M, N/TP] = allgather(A[M/TP, K]) @ B[K, N/TP]. A case's columns
are timed in turns (tilegen.bench.time_interleaved: the GPU's clock drifts under sustained GEMMs, which
moved cuBLAS alone by 25% between columns timed one after the other); the --splits / --styles sweep after.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

import generated
import tilegen
from tilegen.bench import time_batches, time_graph, time_interleaved
from tilegen.overlap.ce_program import STYLES
from tilegen.overlap.runtime import ce_config

CALLS = 10  # back-to-back calls per timed batch (and per graph): the ranks' start skew is spread over them
CASES = [  # (label, M, N, K) of the full problem
    ("M=N=K=8192", 8192, 8192, 8192),
    ("llama-70b up (M=4096)", 4096, 8192, 8192),
    ("M=2048 batch", 2048, 8192, 8192),
]


def _efficiency(res: dict) -> None:
    """GEMM alone over each tilegen variant's time; the headline is the better variant's."""
    effs = {
        k.removeprefix("tilegen_"): res["us"]["gemm_alone"] / v
        for k, v in res["us"].items()
        if k.startswith("tilegen_") or k.startswith("ce_")
    }
    res["overlap_efficiency_by_variant"] = effs
    res["overlap_efficiency"] = max(effs.values())


def _torch_fused(rank: int, name: str, call):
    """torch's symmetric-memory fused op `name` as a no-argument callable (call(fn, group) runs it once
    here, so a missing or failing op is reported and left out), or None."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD.group_name
        getattr(symm_mem, "enable_symm_mem_for_group", lambda g: None)(group)  # gone in newer torch
        fn = getattr(symm_mem, name, None) or getattr(torch.ops.symm_mem, name)
        call(fn, group)
        return lambda: call(fn, group)
    except Exception as e:
        if rank == 0:
            print(f"torch {name} unavailable: {type(e).__name__}: {e}")
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out")
    ap.add_argument("--splits", default="", help="comma-separated row splits to time the copy-engine ops at")
    ap.add_argument("--styles", default="", help="comma-separated copy-engine styles to time (all: every one)")
    ap.add_argument("--graph", action="store_true",
                    help="also time GEMM alone, the copy-engine op and NCCL+cuBLAS replayed in a CUDA graph")
    a = ap.parse_args()
    splits = [int(x) for x in a.splits.split(",") if x]
    styles = [x for x in a.styles.split(",") if x]

    def graphed(res: dict, name: str, fn) -> None:
        """With --graph: CALLS calls of fn captured in one CUDA graph, us per call (fn ran eagerly before)."""
        if a.graph:
            us, err = time_graph(fn, CALLS, 10)
            res["us"]["graph_" + name] = us if us is not None else float("nan")
            if err and rank == 0:
                print(f"graph {name}: {err}")

    def sweep_ce(op, *args):
        """The copy-engine op at each --styles x --splits (us by name)."""
        out = {}
        for st in ((STYLES[op.kind] if styles == ["all"] else styles) or [""]) if styles or splits else []:
            for sp in splits or [0]:
                os.environ["TILEGEN_CE_STYLE"] = st
                os.environ["TILEGEN_CE_SPLITS"] = str(sp) if sp else ""
                m = args[0].shape[0] // (world if op.kind == "gemm_rs" else 1)
                st_, sp_ = ce_config(op.kind, world, m, op.ce_choices.get(world, ()))
                out[f"ce_{st_}_{sp_}"] = time_batches(lambda: op(*args), CALLS, a.reps)
        os.environ.pop("TILEGEN_CE_STYLE", None)
        os.environ.pop("TILEGEN_CE_SPLITS", None)
        return out
    def measure(res: dict, fns: dict, ce_call) -> dict:
        """A case: its columns in turns, then the copy-engine sweep (ce_call: the op and its arguments, or
        None), the CUDA-graph times (--graph) and the overlap efficiencies."""
        res["us"].update(time_interleaved(fns, CALLS, a.reps))
        if ce_call:
            res["us"].update(sweep_ce(*ce_call))
        for name, key in (("gemm_alone", "gemm_alone"), ("copy_engine", "tilegen_copy_engine"),
                          ("nccl_then_cublas", "nccl_then_cublas")):
            if key in fns:
                graphed(res, name, fns[key])
        _efficiency(res)
        return res
    rank, world = tilegen.init()
    op = generated.ag_gemm_bf16
    nccl = dist.get_backend() == "nccl"
    rows = []
    for label, M, N, K in CASES:
        m, n = M // world, N // world
        if n != op.n or K != op.k or m > op.max_rows():
            if rank == 0:
                print(f"skip {label}: the op is generated for k={op.k}, n={op.n}, m<={op.max_rows()}")
            continue
        x = torch.randn((m, K), device="cuda").to(torch.bfloat16)
        b = (torch.randn((K, n), device="cuda") / 64).to(torch.bfloat16)
        full = torch.randn((M, K), device="cuda").to(torch.bfloat16)
        c = torch.empty((M, n), device="cuda", dtype=torch.bfloat16)
        res = {"case": label, "M": M, "N": N, "K": K, "world": world, "us": {}}
        fns = {"gemm_alone": lambda: torch.mm(full, b, out=c), "tilegen_decomposed": lambda: op(x, b, c)}
        ce = getattr(generated, "ag_gemm_bf16_ce", None)
        has_ce = ce is not None and ce.n == n and ce.k == K and m <= ce.max_rows()
        if has_ce:
            fns["tilegen_copy_engine"] = lambda: ce(x, b, c)
        fused = getattr(generated, "ag_gemm_bf16_fused", None)
        if fused is not None and fused.n == n and fused.k == K and m <= fused.max_rows():
            fns["tilegen_fused"] = lambda: fused(x, b, c)
            fused(x, b, c)
            # The fused GEMM kernel alone: rerun on the last call's gathered A, whose flags are all
            # set (no waiting), to separate the CUTLASS kernel's own speed from the overlap ...
            mod, gathered_f = fused.load(), fused.empty_output(m)
            stream = torch.cuda.current_stream().cuda_stream
            gemm_sms = fused._gemm_sms()
            fns["fused_kernel_only"] = lambda: mod.fused_gemm(gathered_f, b, c, gemm_sms, stream, 0)
            # ... and on every SM, as cuBLAS runs (issue 14's goal compares them on the same SMs)
            sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
            fns["fused_kernel_all_sms"] = lambda: mod.fused_gemm(gathered_f, b, c, sms, stream, 0)
        if nccl:
            gathered = torch.empty((M, K), device="cuda", dtype=torch.bfloat16)

            def sequential():
                dist.all_gather_into_tensor(gathered, x)
                torch.mm(gathered, b, out=c)

            fns["nccl_then_cublas"] = sequential
            torch_fused = _torch_fused(rank, "fused_all_gather_matmul", lambda fn, g: fn(x, [b], 0, g))
            if torch_fused:
                fns["torch_fused_all_gather_matmul"] = torch_fused
        rows.append(measure(res, fns, (ce, x, b, c) if has_ce else None))
    rs = generated.gemm_rs_bf16
    for label, M, N, K in CASES:  # C[M/TP, N] = reduce_scatter(A[M, K/TP] @ B[K/TP, N])
        m, k = M // world, K // world
        if k != rs.k or N != rs.n or m > rs.max_rows():
            continue
        x = torch.randn((M, k), device="cuda").to(torch.bfloat16)
        b = (torch.randn((k, N), device="cuda") / 64).to(torch.bfloat16)
        c = torch.empty((m, N), device="cuda", dtype=torch.bfloat16)
        p = torch.empty((M, N), device="cuda", dtype=torch.bfloat16)
        res = {"case": "gemm_rs " + label, "M": M, "N": N, "K": K, "world": world, "us": {}}
        fns = {"gemm_alone": lambda: torch.mm(x, b, out=p), "tilegen_decomposed": lambda: rs(x, b, c)}
        ce = getattr(generated, "gemm_rs_bf16_ce", None)
        has_ce = ce is not None and ce.n == N and ce.k == k and m <= ce.max_rows()
        if has_ce:
            fns["tilegen_copy_engine"] = lambda: ce(x, b, c)
        fused = getattr(generated, "gemm_rs_bf16_fused", None)
        if fused is not None and fused.n == N and fused.k == k and m <= fused.max_rows():
            w = b.t().contiguous() if fused.b_layout == "nk" else b
            fns["tilegen_fused"] = lambda: fused(x, w, c)
        if nccl:

            def sequential_rs():
                torch.mm(x, b, out=p)
                dist.reduce_scatter_tensor(c, p)

            fns["nccl_then_cublas"] = sequential_rs
            # (torch >= 2.6 keeps them as ops only)
            torch_fused = _torch_fused(rank, "fused_matmul_reduce_scatter", lambda fn, g: fn(x, b, "sum", 0, g))
            if torch_fused:
                fns["torch_fused_matmul_reduce_scatter"] = torch_fused
        rows.append(measure(res, fns, (ce, x, b, c) if has_ce else None))
    if rank == 0:
        print(
            f"\nag_gemm / gemm_rs bf16, {world} ranks on {torch.cuda.device_count()} x "
            f"{torch.cuda.get_device_name()}, median ms"
            + ("" if nccl else " -- RANKS SHARE ONE GPU: GEMMs compete, no NCCL baseline")
        )
        names = list(dict.fromkeys(k for r in rows for k in r["us"]))
        short = {k: k.replace("torch_fused_", "torch_").replace("tilegen_", "") for k in names}
        print(f"{'case':<28}" + "".join(f"{short[k]:>{max(12, len(short[k]) + 2)}}" for k in names)
              + "  overlap eff. (ce / dec / fused), vs NCCL+cuBLAS (ce)")
        for r in rows:
            e = r["overlap_efficiency_by_variant"]
            vs = r["us"].get("nccl_then_cublas", float("nan")) / r["us"].get("tilegen_copy_engine", float("nan"))
            print(
                f"{r['case']:<28}"
                + "".join(f"{r['us'].get(k, float('nan')) / 1e3:>{max(12, len(short[k]) + 2)}.3f}" for k in names)
                + f"  {e.get('copy_engine', float('nan')):.2f} / {e.get('decomposed', float('nan')):.2f} / "
                  f"{e.get('fused', float('nan')):.2f}, {vs:.2f}x"
            )
        if a.out:
            with open(a.out, "w") as f:
                json.dump(rows, f, indent=2)
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
