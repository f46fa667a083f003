"""Tensor-parallel Llama-3 MLP block on generated ops, at any world size the specs list.

    torchrun --nproc-per-node 4 examples/tp_mlp.py [--model llama3-8b|llama3-70b] [--tokens 2048]

Sequence-parallel layout as in Megatron-LM: each rank holds x [m, d] (its tokens), its rows of the
fused gate+up weight W_gu_r = [W_gate_r; W_up_r] ([2 * h / world, d], a Linear weight) and its
columns of the down projection W_down_r ([d, h / world]):

    [g | u] = allgather(x) @ W_gu_r^T               # llama3_*_gate_up: gather overlapped with the GEMM
    y_r     = reduce_scatter((silu(g) * u) @ W_down_r^T)   # llama3_*_down: GEMM overlapped with the reduce-scatter

The specs give the layer's whole d_ff ({full: ...}), so one generated op serves TP 2, 4 and 8.
The default ops (overlap: auto) move the data with the copy engines beside cuBLAS GEMMs; with
fused=True the *_fused ops run instead (one CUTLASS GEMM each, waiting on / publishing the
communication's signals). `main` checks both against the unsharded block on one GPU and times
them against NCCL + cuBLAS doing the same.
"""
import argparse

import torch
import torch.distributed as dist

import generated
import tilegen

MODELS = {"llama3-8b": (4096, 14336), "llama3-70b": (8192, 28672)}  # (d_model, d_ff)


def ops(model: str, fused: bool):
    """(gate_up op, down op) of a model."""
    base = model.replace("-", "_")
    suffix = "_fused" if fused else ""
    return getattr(generated, f"{base}_gate_up{suffix}"), getattr(generated, f"{base}_down{suffix}")


def make_weights(model: str, seed: int):
    """The full weights (seeded, the same on every rank) and this rank's shards."""
    d, h = MODELS[model]
    world, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator(device="cuda").manual_seed(seed)
    w_gate, w_up = ((torch.randn((h, d), device="cuda", generator=g) / d ** 0.5).bfloat16() for _ in range(2))
    w_down = (torch.randn((d, h), device="cuda", generator=g) / h ** 0.5).bfloat16()
    hs = slice(r * h // world, (r + 1) * h // world)
    w_gu_r = torch.cat([w_gate[hs], w_up[hs]]).contiguous()
    w_down_r = w_down[:, hs].contiguous()
    return (w_gate, w_up, w_down), (w_gu_r, w_down_r)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def mlp_tilegen(x, w_gu_r, w_down_r, model: str, fused: bool = False):
    gate_up, down = ops(model, fused)
    return down(swiglu(gate_up(x, w_gu_r)), w_down_r)  # [world * m, 2h/w] -> [world * m, h/w] -> [m, d]


def mlp_nccl(x, w_gu_r, w_down_r):
    world = dist.get_world_size()
    full = torch.empty((world * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(full, x)
    p = swiglu(full @ w_gu_r.t()) @ w_down_r.t()
    y = torch.empty((x.shape[0], p.shape[1]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(y, p)
    return y


def mlp_compute_only(full, w_gu_r, w_down_r):
    """The block's GEMMs and SwiGLU on already gathered rows, no communication: what any overlap
    can at best reach (the GEMMs' own time)."""
    return swiglu(full @ w_gu_r.t()) @ w_down_r.t()


def check_against_single_gpu(model: str = "llama3-8b", tokens_per_rank: int = 512, seed: int = 0,
                             fused: bool = False) -> float:
    """Relative error of this rank's output against the unsharded block computed on one GPU."""
    world, r = dist.get_world_size(), dist.get_rank()
    (w_gate, w_up, w_down), (w_gu_r, w_down_r) = make_weights(model, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x_all = torch.randn((world * tokens_per_rank, MODELS[model][0]), device="cuda", generator=g).bfloat16()
    mine = slice(r * tokens_per_rank, (r + 1) * tokens_per_rank)
    y = mlp_tilegen(x_all[mine].contiguous(), w_gu_r, w_down_r, model, fused)
    xf = x_all[mine].float()  # the block acts on each token alone: this rank's rows are enough
    ref = (torch.nn.functional.silu(xf @ w_gate.float().t()) * (xf @ w_up.float().t())) @ w_down.float().t()
    torch.cuda.synchronize()
    return ((y.float() - ref).norm() / ref.norm()).item()


def main():
    from tilegen.bench import time_batches, time_graph
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS) + ["all"], default="all")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--calls", type=int, default=10, help="back-to-back calls per timed batch")
    ap.add_argument("--graph", action="store_true", help="also time the blocks replayed in a CUDA graph")
    args = ap.parse_args()
    rank, world = tilegen.init()
    nccl = dist.get_backend() == "nccl"
    for model in sorted(MODELS) if args.model == "all" else [args.model]:
        errs = [check_against_single_gpu(model, 256, fused=f) for f in (False, True)]
        _, (w_gu_r, w_down_r) = make_weights(model, 1)
        x = torch.randn((args.tokens, MODELS[model][0]), device="cuda").bfloat16()
        full = torch.randn((world * args.tokens, MODELS[model][0]), device="cuda").bfloat16()
        t = {f: time_batches(lambda: mlp_tilegen(x, w_gu_r, w_down_r, model, f), args.calls, args.reps)
             for f in (False, True)}
        t_nccl = time_batches(lambda: mlp_nccl(x, w_gu_r, w_down_r), args.calls, args.reps) if nccl else float("nan")
        t_gemm = time_batches(lambda: mlp_compute_only(full, w_gu_r, w_down_r), args.calls, args.reps)
        graphs = {}
        if args.graph:  # no host cost: what a serving loop that replays graphs sees
            for name, fn in (("copy engine", lambda: mlp_tilegen(x, w_gu_r, w_down_r, model, False)),
                             ("NCCL+cuBLAS", lambda: mlp_nccl(x, w_gu_r, w_down_r)),
                             ("compute alone", lambda: mlp_compute_only(full, w_gu_r, w_down_r))):
                us, err = time_graph(fn, args.calls, 10)
                graphs[name] = f"{us / 1e3:.3f} ms" if us is not None else f"failed ({err})"
        if rank == 0:
            d, h = MODELS[model]
            print(
                f"TP MLP {model} (d={d}, d_ff={h}), TP {world}, {args.tokens} tokens per rank: relative error vs one "
                f"GPU {errs[0]:.2e} (copy engine), {errs[1]:.2e} (fused); tilegen copy engine {t[False] / 1e3:.3f} "
                f"ms, fused {t[True] / 1e3:.3f} ms, NCCL+cuBLAS {t_nccl / 1e3:.3f} ms, speedup {t_nccl / t[False]:.2f}x"
                f" / {t_nccl / t[True]:.2f}x; compute alone (no communication) {t_gemm / 1e3:.3f} ms, the bound: "
                f"{t_nccl / t_gemm:.2f}x",
                flush=True,
            )
            if graphs:
                print(f"TP MLP {model}, TP {world}, CUDA graph of {args.calls} calls: "
                      + ", ".join(f"{k} {v}" for k, v in graphs.items()), flush=True)
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
