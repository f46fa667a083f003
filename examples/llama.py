"""A Llama-3-8B-shaped decoder stack, tensor parallel on tilegen's torch ops and torch.compile'd.

    torchrun --nproc-per-node 4 examples/llama.py [--layers 2] [--tp 2]   # --tp 2 on 4 ranks: TP 2 x DP 2

Each layer: RMSNorm, attention (RoPE, grouped-query heads, torch SDPA, a KV cache), RMSNorm, SwiGLU
MLP, residuals. Tensor parallel (Megatron): each rank of a TP group holds its query/KV heads and its
share of the MLP's hidden units.

  prefill (sequence parallel: each rank holds its tokens' rows, norms run on them):
      qkv = allgather(norm(x)) @ W_qkv_r^T     llama3_8b_qkv      (ag_gemm: the gather overlapped with the GEMM)
      x  += reduce_scatter(attn @ W_o_r^T)      llama3_8b_o        (gemm_rs)
      gu  = allgather(norm(x)) @ W_gu_r^T      llama3_8b_gate_up  (ag_gemm)
      x  += reduce_scatter(swiglu(gu) @ W_down_r^T)   llama3_8b_down (gemm_rs)
  decode (every rank holds the batch's rows; the residual add and the next norm run in the allreduce's
  kernel, allreduce_rmsnorm: h = norm(x += allreduce(y)) in one call):
      h   = norm(x += allreduce(attn(h) @ W_o_r^T))                allreduce_rmsnorm
      h   = norm'(x += allreduce(swiglu(h @ W_gu_r^T) @ W_down_r^T))   (norm': the next layer's first)

The same model runs on torch.distributed (`backend="nccl"`: functional collectives + cuBLAS) and, for
decode, on torch symmetric memory's one-shot allreduce (`backend="symm_mem"`). `check` compares each
with the unsharded model on one GPU (same seeded weights); bench/scripts/bench_llama.py times them.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tilegen


@dataclass(frozen=True)
class Config:
    d: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    eps: float = 1e-5
    rope_theta: float = 500000.0


LLAMA3_8B = Config()


# ------------------------------------------------------------------------------------ weights
def full_weights(cfg: Config, layers: int, seed: int) -> list[dict]:
    """Every layer's unsharded weights (seeded: the same on every rank), Linear layout [out, in]."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def lin(out_f, in_f):
        return (torch.randn((out_f, in_f), device="cuda", generator=g) / in_f ** 0.5).bfloat16()

    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return [{"wq": lin(q, cfg.d), "wk": lin(kv, cfg.d), "wv": lin(kv, cfg.d), "wo": lin(cfg.d, q),
             "wg": lin(cfg.ffn, cfg.d), "wu": lin(cfg.ffn, cfg.d), "wd": lin(cfg.d, cfg.ffn),
             "n1": (1 + 0.1 * torch.randn(cfg.d, device="cuda", generator=g)).bfloat16(),
             "n2": (1 + 0.1 * torch.randn(cfg.d, device="cuda", generator=g)).bfloat16()} for _ in range(layers)]


def shard(w: dict, cfg: Config, tp: int, r: int) -> dict:
    """TP rank r's share of a layer: its query and KV heads ([q_r; k_r; v_r] rows), its columns of W_o,
    its gate and up rows ([gate_r; up_r]) and its columns of W_down."""
    def rows(t, n):
        return t[r * n // tp:(r + 1) * n // tp]

    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {"wqkv": torch.cat([rows(w["wq"], q), rows(w["wk"], kv), rows(w["wv"], kv)]).contiguous(),
            "wo": rows(w["wo"].t(), q).t().contiguous(),
            "wgu": torch.cat([rows(w["wg"], cfg.ffn), rows(w["wu"], cfg.ffn)]).contiguous(),
            "wd": rows(w["wd"].t(), cfg.ffn).t().contiguous(), "n1": w["n1"], "n2": w["n2"]}


# ------------------------------------------------------------------------------------ layers
def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [..., tokens, head_dim] at positions pos [tokens] (halves rotated)."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.float()[:, None] * freq[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def attention(q, k, v, causal: bool, mask=None):
    """q [b, hq, t, hd], k/v [b, hkv, s, hd] (grouped-query: each KV head serves hq / hkv query heads)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)


class Comm:
    """The model's communication: tilegen ops (torch ops, compiled into the graph), NCCL through
    torch.distributed's functional collectives, or torch symmetric memory (decode allreduce)."""

    def __init__(self, backend: str, tp_group, tp_pg, tp_ranks, max_rows: int, d: int):
        self.backend, self.group, self.pg = backend, tp_group, tp_pg
        self.tp = len(tp_ranks)
        if backend == "tilegen":
            import generated
            self.ar, self.qkv, self.o = generated.allreduce_bf16, generated.llama3_8b_qkv, generated.llama3_8b_o
            self.gate_up, self.down = generated.llama3_8b_gate_up, generated.llama3_8b_down
            self.ar_norm = generated.allreduce_rmsnorm
            for op in (self.ar, self.qkv, self.o, self.gate_up, self.down, self.ar_norm):
                op.load()  # (collective; registers the torch ops before anything is compiled)
        elif backend == "symm_mem":
            import torch.distributed._symmetric_memory as symm_mem
            self.buf = symm_mem.empty((max_rows, d), dtype=torch.bfloat16, device="cuda")
            symm_mem.rendezvous(self.buf, tp_pg.group_name)

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.backend == "tilegen":
            return self.ar.torch(x, group=self.group)
        if self.backend == "symm_mem":
            self.buf[:rows].copy_(x)
            return torch.ops.symm_mem.one_shot_all_reduce(self.buf[:rows], "sum", self.pg.group_name)
        import torch.distributed._functional_collectives as funcol
        return funcol.all_reduce(x, "sum", self.pg)

    def allreduce_norm(self, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        """residual += allreduce(x) (in place), then RMSNorm(residual) * w: one kernel on tilegen."""
        if self.backend == "tilegen":
            if eps != self.ar_norm.epilogue["rmsnorm"]:
                raise ValueError(f"allreduce_rmsnorm was generated for eps {self.ar_norm.epilogue['rmsnorm']}, "
                                 f"not {eps}")
            return self.ar_norm.torch(x, residual=residual, weight=w, group=self.group)
        residual.add_(self.allreduce(x))
        return rms_norm(residual, w, eps)

    def gather_matmul(self, x: torch.Tensor, w: torch.Tensor, which: str) -> torch.Tensor:
        if self.backend == "tilegen":
            return getattr(self, which).torch(x, w, group=self.group)
        import torch.distributed._functional_collectives as funcol
        return funcol.all_gather_tensor(x, 0, self.pg) @ w.t()

    def matmul_scatter(self, x: torch.Tensor, w: torch.Tensor, which: str) -> torch.Tensor:
        if self.backend == "tilegen":
            return getattr(self, which).torch(x, w, group=self.group)
        import torch.distributed._functional_collectives as funcol
        return funcol.reduce_scatter_tensor(x @ w.t(), "sum", 0, self.pg)


class Decoder(torch.nn.Module):
    """A stack of TP-sharded layers (tp=1 with no comm: the unsharded reference)."""

    def __init__(self, cfg: Config, shards: list[dict], tp: int, comm: Comm | None, batch: int, kv_len: int,
                 cache_seed: int, tp_rank: int = 0):
        super().__init__()
        self.cfg, self.shards, self.tp, self.comm = cfg, shards, tp, comm
        self.hq, self.hkv = cfg.heads // tp, cfg.kv_heads // tp
        g = torch.Generator(device="cuda").manual_seed(cache_seed)
        self.kv_len = kv_len
        self.caches = []  # per layer: (k, v) [batch, kv heads of this rank, kv_len, head_dim]
        for _ in shards:  # the full cache (seeded), then this rank's heads
            k, v = (torch.randn((batch, cfg.kv_heads, kv_len, cfg.head_dim), device="cuda", generator=g).bfloat16()
                    for _ in range(2))
            heads = slice(tp_rank * self.hkv, (tp_rank + 1) * self.hkv)
            self.caches.append((k[:, heads].contiguous(), v[:, heads].contiguous()))

    def _qkv(self, qkv, b, t, pos):
        c = self.cfg
        q, k, v = qkv.split([self.hq * c.head_dim, self.hkv * c.head_dim, self.hkv * c.head_dim], dim=-1)
        q = rope(q.view(b, t, self.hq, c.head_dim).transpose(1, 2), pos, c.rope_theta)
        k = rope(k.view(b, t, self.hkv, c.head_dim).transpose(1, 2), pos, c.rope_theta)
        return q, k, v.view(b, t, self.hkv, c.head_dim).transpose(1, 2)

    def decode(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One step: x [batch, d] (the same on every rank of the TP group), pos [1] (its position, < kv_len).
        Writes the step's K/V at pos and attends to the cache's first kv_len positions up to pos."""
        c, b = self.cfg, x.shape[0]
        mask = (torch.arange(self.kv_len, device=x.device) <= pos).view(1, 1, 1, -1)
        x = x.clone()  # the residual stream, updated in place
        h = rms_norm(x, self.shards[0]["n1"], c.eps)
        for i, (w, (kc, vc)) in enumerate(zip(self.shards, self.caches)):
            q, k, v = self._qkv(h @ w["wqkv"].t(), b, 1, pos)
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            a = attention(q, kc, vc, causal=False, mask=mask).transpose(1, 2).reshape(b, self.hq * c.head_dim)
            h = self._add_norm(a @ w["wo"].t(), x, w["n2"])
            y = swiglu(h @ w["wgu"].t()) @ w["wd"].t()
            if i + 1 < len(self.shards):
                h = self._add_norm(y, x, self.shards[i + 1]["n1"])
            else:
                x = x + (self.comm.allreduce(y) if self.comm else y)
        return x

    def _add_norm(self, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x += (the TP group's sum of) y, in place; returns RMSNorm(x) * w."""
        if self.comm:
            return self.comm.allreduce_norm(y, x, w, self.cfg.eps)
        x.add_(y)
        return rms_norm(x, w, self.cfg.eps)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """A prompt: x [m, d], this rank's tokens of one sequence (sequence parallel: the TP group's
        ranks hold consecutive blocks, group rank order); causal attention over all tp * m tokens."""
        c, m = self.cfg, x.shape[0]
        t = m * self.tp
        pos = torch.arange(t, device=x.device)
        for w in self.shards:
            h = rms_norm(x, w["n1"], c.eps)
            qkv = self.comm.gather_matmul(h, w["wqkv"], "qkv") if self.comm else h @ w["wqkv"].t()
            q, k, v = self._qkv(qkv.view(1, t, -1), 1, t, pos)
            a = attention(q, k, v, causal=True).transpose(1, 2).reshape(t, self.hq * c.head_dim)
            x = x + (self.comm.matmul_scatter(a, w["wo"], "o") if self.comm else a @ w["wo"].t())
            h = rms_norm(x, w["n2"], c.eps)
            gu = self.comm.gather_matmul(h, w["wgu"], "gate_up") if self.comm else h @ w["wgu"].t()
            y = swiglu(gu)
            x = x + (self.comm.matmul_scatter(y, w["wd"], "down") if self.comm else y @ w["wd"].t())
        return x


# ------------------------------------------------------------------------------------ set-up
def tp_groups(tp: int):
    """(tilegen group, torch ProcessGroup, ranks) of this rank's TP group: consecutive blocks of tp ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    blocks = [list(range(s, s + tp)) for s in range(0, world, tp)]
    pg, _ = dist.new_subgroups_by_enumeration(blocks)
    group = tilegen.group(blocks) if tp < world else None  # None: the world itself
    return group, pg, blocks[rank // tp]


def build(backend: str, cfg: Config, layers: int, tp: int, batch: int, kv_len: int, max_rows: int, seed: int = 0):
    """This rank's model on `backend`, and the unsharded one (for checks)."""
    group, pg, ranks = tp_groups(tp)
    full = full_weights(cfg, layers, seed)
    tp_rank = ranks.index(dist.get_rank())
    comm = Comm(backend, group, pg, ranks, max_rows, cfg.d)
    model = Decoder(cfg, [shard(w, cfg, tp, tp_rank) for w in full], tp, comm, batch, kv_len, seed + 1, tp_rank)
    return model, full, ranks


def reference(cfg: Config, full: list[dict], batch: int, kv_len: int, seed: int = 0) -> Decoder:
    return Decoder(cfg, [shard(w, cfg, 1, 0) for w in full], 1, None, batch, kv_len, seed + 1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def check(backend: str, layers: int, tp: int, batch: int = 4, kv_len: int = 256, tokens: int = 64) -> dict:
    """Relative errors of this rank's decode step and prefill (compiled, fullgraph) against the unsharded
    model; the DP replicas (TP groups) get different inputs."""
    cfg = LLAMA3_8B
    model, full, ranks = build(backend, cfg, layers, tp, batch, kv_len, max(batch, tokens))
    ref = reference(cfg, full, batch, kv_len)
    replica = dist.get_rank() // tp
    g = torch.Generator(device="cuda").manual_seed(100 + replica)
    x = torch.randn((batch, cfg.d), device="cuda", generator=g).bfloat16()
    pos = torch.tensor([kv_len // 2], device="cuda")
    dec = torch.compile(model.decode, fullgraph=True)
    errs = {"decode": rel_err(dec(x, pos), ref.decode(x, pos))}
    if backend != "symm_mem":
        prompt = torch.randn((tp * tokens, cfg.d), device="cuda", generator=g).bfloat16()
        me = ranks.index(dist.get_rank())
        out = torch.compile(model.prefill, fullgraph=True)(prompt[me * tokens:(me + 1) * tokens].contiguous())
        errs["prefill"] = rel_err(out, ref.prefill(prompt)[me * tokens:(me + 1) * tokens])
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tp", type=int, default=0, help="TP group size (default: the world)")
    ap.add_argument("--backends", default="tilegen,nccl,symm_mem")
    args = ap.parse_args()
    rank, world = tilegen.init()
    tp = args.tp or world
    for backend in args.backends.split(","):
        if backend != "tilegen" and dist.get_backend() != "nccl":
            continue  # (NCCL and symmetric memory need one GPU per rank)
        errs = check(backend, args.layers, tp)
        worst = torch.tensor([max(errs.values())], device="cuda")
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            shown = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
            print(f"llama {args.layers} layers, TP {tp} x DP {world // tp}, {backend}: relative error vs one GPU "
                  f"(rank 0) {shown}; worst over ranks {worst.item():.2e}", flush=True)
        assert math.isfinite(worst.item()) and worst.item() < 3e-2, f"{backend}: {errs}"
    tilegen.finalize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
