"""Tensor-parallel MLP block on generated ops (run: torchrun --nproc-per-node 2 examples/tp_mlp.py).

Sequence-parallel layout as in Megatron-LM: each rank holds x [m, d] (its tokens), the column shard
W1_r [d, h/world] of the up projection and the row shard W2_r [h/world, d] of the down projection.

    y_r = reduce_scatter( gelu( allgather(x) @ W1_r ) @ W2_r )      # [m, d] on rank r

ag_gemm_bf16 does the up projection (gather overlapped with the GEMM), gemm_rs_bf16 the down
projection (GEMM overlapped with the reduce-scatter); with fused=True their fused versions (one
CUTLASS GEMM each, waiting on / publishing the communication's signals). `main` compares both with
the NCCL + cuBLAS version of the same block and prints the times.
"""
import torch
import torch.distributed as dist

import tilegen
from generated import ag_gemm_bf16, ag_gemm_bf16_fused, gemm_rs_bf16, gemm_rs_bf16_fused

D, H = 8192, 8192  # model and hidden width (the generated ops' k and n at TP=2)


def make_weights(world: int, seed: int):
    """The full weights on every rank (seeded), and this rank's shards."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w1 = (torch.randn((D, H), device="cuda", generator=g) / D ** 0.5).bfloat16()
    w2 = (torch.randn((H, D), device="cuda", generator=g) / H ** 0.5).bfloat16()
    r, hw = dist.get_rank(), H // world
    return w1, w2, w1[:, r * hw:(r + 1) * hw].contiguous(), w2[r * hw:(r + 1) * hw].contiguous()


def mlp_tilegen(x, w1_r, w2_r, fused: bool = False, w2_r_t=None):
    """w2_r_t: W2_r transposed ([D, H / world], a Linear weight), the layout gemm_rs_bf16_fused takes."""
    if fused:
        h = ag_gemm_bf16_fused(x, w1_r)
        w2 = w2_r_t if w2_r_t is not None else w2_r.t().contiguous()
        return gemm_rs_bf16_fused(torch.nn.functional.gelu(h), w2)
    h = ag_gemm_bf16(x, w1_r)  # [world * m, H / world]
    return gemm_rs_bf16(torch.nn.functional.gelu(h), w2_r)  # [m, D]


def mlp_nccl(x, w1_r, w2_r):
    world = dist.get_world_size()
    full = torch.empty((world * x.shape[0], D), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(full, x)
    p = torch.nn.functional.gelu(full @ w1_r) @ w2_r
    y = torch.empty((x.shape[0], D), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(y, p)
    return y


def check_against_single_gpu(tokens_per_rank: int = 512, seed: int = 0, fused: bool = False) -> float:
    """Relative error of this rank's output against the unsharded block computed on one GPU."""
    world, r = dist.get_world_size(), dist.get_rank()
    w1, w2, w1_r, w2_r = make_weights(world, seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x_all = torch.randn((world * tokens_per_rank, D), device="cuda", generator=g).bfloat16()
    x = x_all[r * tokens_per_rank:(r + 1) * tokens_per_rank].contiguous()
    y = mlp_tilegen(x, w1_r, w2_r, fused)
    ref = (torch.nn.functional.gelu(x_all.float() @ w1.float()) @ w2.float())[r * tokens_per_rank:(r + 1) * tokens_per_rank]
    torch.cuda.synchronize()
    return ((y.float() - ref).norm() / ref.norm()).item()


def main():
    from tilegen.bench import time_batches
    rank, world = tilegen.init()
    err = check_against_single_gpu()
    err_fused = check_against_single_gpu(fused=True)
    tokens = 2048  # per rank: within both ops' maximum m
    w1, w2, w1_r, w2_r = make_weights(world, 1)
    w2_r_t = w2_r.t().contiguous()
    x = torch.randn((tokens, D), device="cuda").bfloat16()
    t_dec = time_batches(lambda: mlp_tilegen(x, w1_r, w2_r), 5, 15)
    t_fused = time_batches(lambda: mlp_tilegen(x, w1_r, w2_r, True, w2_r_t), 5, 15)
    t_nccl = time_batches(lambda: mlp_nccl(x, w1_r, w2_r), 5, 15) if dist.get_backend() == "nccl" else float("nan")
    if rank == 0:
        print(f"TP MLP, {world} ranks, {tokens} tokens per rank, d={D}, h={H}: relative error vs one GPU "
              f"{err:.2e} (decomposed), {err_fused:.2e} (fused); tilegen decomposed {t_dec / 1e3:.3f} ms, "
              f"fused {t_fused / 1e3:.3f} ms, NCCL+cuBLAS {t_nccl / 1e3:.3f} ms, speedup {t_nccl / t_dec:.2f}x / "
              f"{t_nccl / t_fused:.2f}x")
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
