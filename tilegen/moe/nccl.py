"""MoE dispatch and combine on NCCL (torch.distributed.all_to_all_single with counts): the baseline
tilegen's kernels are measured against (bench/scripts/bench_moe.py) and the reference the GPU tests compare
them with, bit for bit (dispatch). Same layout as tilegen.moe.check: rank d receives its items per local
expert, then source rank, token, slot; combine sums each token's slots in fp32 with its weights.

Needs torch (imported by the functions); normal mode: the received counts go to the host.
"""
from __future__ import annotations

from typing import Any


def _a2a_rows(t: Any, send_counts: list[int], recv_counts: list[int], group) -> Any:
    import torch.distributed as dist
    out = t.new_empty((sum(recv_counts),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=group)
    return out


def _exchange_counts(send: Any, group) -> tuple[list[int], list[int]]:
    import torch
    import torch.distributed as dist
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return send.tolist(), recv.tolist()  # the host needs them to size the exchanges


def dispatch(x: Any, topk_idx: Any, experts: int, group=None) -> tuple[Any, Any, Any]:
    """x [m, hidden], topk_idx [m, k] (-1: dropped) -> (tokens [rows, hidden] in the received layout,
    counts per local expert [L], handle [rows, 3] = (source rank, token, slot))."""
    import torch
    import torch.distributed as dist
    world = dist.get_world_size(group)
    L = experts // world
    m, k = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    item = torch.nonzero(flat >= 0).squeeze(1)  # t * k + j, in (token, slot) order
    e = flat[item]
    order = torch.argsort(e * max(m * k, 1) + item)  # (destination, local expert, token, slot)
    item, e = item[order], e[order]
    sc, rc = _exchange_counts(torch.bincount(e // L, minlength=world), group)
    meta = torch.stack([item // k, item % k, e % L], 1)  # (token, slot, local expert)
    recv = _a2a_rows(x[item // k], sc, rc, group)
    rmeta = _a2a_rows(meta, sc, rc, group)
    src = torch.repeat_interleave(torch.arange(world, device=x.device), torch.tensor(rc, device=x.device))
    # arrived per source, each sorted by (local expert, token, slot): a stable sort by local expert
    # then source gives (local expert, source, token, slot)
    perm = torch.argsort(rmeta[:, 2] * world + src, stable=True)
    handle = torch.stack([src[perm], rmeta[perm, 0], rmeta[perm, 1]], 1)
    return recv[perm], torch.bincount(rmeta[:, 2], minlength=L), handle


def combine(y: Any, handle: Any, topk_idx: Any, topk_weights: Any, group=None) -> Any:
    """y [rows, hidden] (expert outputs in dispatch's layout) -> [m, hidden] of this rank's tokens:
    the sum over slots, in slot order, of weight x output, in fp32, rounded once to y's dtype."""
    import torch
    import torch.distributed as dist
    world = dist.get_world_size(group)
    m, k = topk_idx.shape
    order = torch.argsort(handle[:, 0], stable=True)
    sc, rc = _exchange_counts(torch.bincount(handle[:, 0], minlength=world), group)
    back = _a2a_rows(y[order], sc, rc, group)
    where = _a2a_rows(handle[order, 1:].contiguous(), sc, rc, group)  # (token, slot) here
    staged = torch.zeros((m, k, y.shape[1]), dtype=torch.float32, device=y.device)
    staged[where[:, 0], where[:, 1]] = back.float()
    w = torch.where(topk_idx >= 0, topk_weights.float(), torch.zeros((), device=y.device))
    out = torch.zeros((m, y.shape[1]), dtype=torch.float32, device=y.device)
    for j in range(k):  # slot order: deterministic
        out += w[:, j:j + 1] * staged[:, j]
    return out.to(y.dtype)


def quantize(x: Any, group: int) -> tuple[Any, Any]:
    """fp8 dispatch's quantization (tilegen/moe.cuh quantize_row): per group of `group` channels,
    scale = amax / 448 (1 where the group is all zero), tokens x / scale as float8_e4m3fn (round to
    nearest even), all in fp32. Returns (e4m3 tokens [m, hidden], scales [m, hidden / group])."""
    import torch
    m, h = x.shape
    g = x.float().view(m, h // group, group)
    amax = g.abs().amax(dim=2)
    # A true division by a tensor: torch divides by a Python scalar as a multiply by its fp32 reciprocal,
    # one ulp off amax / 448 for about half the groups (then 1 in ~1000 e4m3 values rounds the other way)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, 448.0), torch.ones_like(amax))
    return (g / scale.unsqueeze(2)).view(m, h).to(torch.float8_e4m3fn), scale


def dequantize(q: Any, scales: Any, dtype: Any) -> Any:
    """The tokens an fp8 dispatch stands for: q * scale per group, in `dtype`."""
    m, h = q.shape
    groups = scales.shape[1]
    return (q.float().view(m, groups, h // groups) * scales.unsqueeze(2)).view(m, h).to(dtype)
