"""An expert-parallel MoE layer on a generated MoE op (generated.moe_bf16: hidden 7168, 256 experts,
top-8), checked against the same layer on one GPU and timed against the NCCL version.

    torchrun --nproc-per-node 4 examples/moe_layer.py [--tokens 1024] [--ffn 256]

Each rank holds its tokens x [m, hidden] and the experts e with e // (experts / world) == rank (each
a small SwiGLU-free FFN: relu(x @ W1_e) @ W2_e). The router (replicated) picks top-k experts and
softmax weights; dispatch sends each token to its experts' ranks, grouped per local expert; each rank
runs its experts on their rows (a loop of matmuls over the counts); combine brings the outputs back
and sums them with the weights. The reference computes every expert on the rank's own tokens.
"""
import argparse

import torch
import torch.distributed as dist

import generated
import tilegen
from tilegen.moe import nccl as moe_nccl
from tilegen.bench import time_batches


def expert_weights(e: int, hidden: int, ffn: int):
    """Expert e's weights, the same on every rank (seeded by e)."""
    g = torch.Generator(device="cuda").manual_seed(1000 + e)
    w1 = (torch.randn((hidden, ffn), device="cuda", generator=g) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn((ffn, hidden), device="cuda", generator=g) / ffn ** 0.5).bfloat16()
    return w1, w2


def ffn(x, w):
    return torch.relu(x @ w[0]) @ w[1]


def route(x, router, k: int):
    scores = (x.float() @ router.float()).softmax(dim=1)
    w, idx = torch.topk(scores, k, dim=1)
    return idx, (w / w.sum(dim=1, keepdim=True)).float()


def run_experts(recv, counts: list[int], local_w):
    """Each local expert on its rows of the received tokens (rows grouped per local expert)."""
    y = torch.empty_like(recv)
    start = 0
    for n, w in zip(counts, local_w):
        if n:
            y[start:start + n] = ffn(recv[start:start + n], w)
        start += n
    return y


def layer_tilegen(op, x, idx, w, local_w):
    recv, _, h = op.dispatch(x, idx, w)
    return op.combine(run_experts(recv, h.counts_host, local_w), h)


def layer_nccl(x, idx, w, experts, local_w):
    recv, counts, handle = moe_nccl.dispatch(x, idx, experts)
    return moe_nccl.combine(run_experts(recv, counts.tolist(), local_w), handle, idx, w)


def reference(x, idx, w, all_w):
    """The layer on one GPU, in fp32 accumulation: sum over slots of weight x expert(x)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, we in enumerate(all_w):
        t, j = (idx == e).nonzero(as_tuple=True)
        if len(t):
            out.index_add_(0, t, w[t, j].unsqueeze(1) * ffn(x[t], we).float())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    rank, world = tilegen.init()
    op = generated.moe_bf16
    hidden, experts, k = op.hidden, op.experts, op.topk
    L = experts // world
    all_w = [expert_weights(e, hidden, a.ffn) for e in range(experts)]
    local_w = all_w[rank * L:(rank + 1) * L]
    g = torch.Generator(device="cuda").manual_seed(7)
    router = torch.randn((hidden, experts), device="cuda", generator=g).bfloat16()
    x = torch.randn((a.tokens, hidden), device="cuda", generator=torch.Generator(device="cuda").manual_seed(rank))
    x = x.bfloat16()
    idx, w = route(x, router, k)
    out = layer_tilegen(op, x, idx, w, local_w)
    ref = reference(x, idx, w, all_w)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    errs = [None] * world
    dist.all_gather_object(errs, err)
    t_tg = time_batches(lambda: layer_tilegen(op, x, idx, w, local_w), 3, a.reps)
    t_nc = time_batches(lambda: layer_nccl(x, idx, w, experts, local_w), 3, a.reps)
    if rank == 0:
        ok = max(errs) < 1e-2
        print(f"MoE layer ({world} ranks, {a.tokens} tokens per rank, hidden {hidden}, {experts} experts top-{k}, "
              f"ffn {a.ffn}): relative error vs one GPU {max(errs):.2e} ({'ok' if ok else 'FAILED'}); "
              f"tilegen {t_tg / 1e3:.3f} ms, NCCL {t_nc / 1e3:.3f} ms ({t_nc / t_tg:.2f}x)")
    tilegen.finalize()
    if max(errs) >= 1e-2:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
