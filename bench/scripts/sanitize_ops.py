"""One op of each family, small and checked, for compute-sanitizer (python3 -m bench sanitize):
a collective (allgather_bf16), a GEMM op's communication kernel beside cuBLAS (ag_gemm_bf16,
decomposed), a premul-sum reduction (allreduce_bf16_avg) and MoE dispatch + combine (moe_bf16).
Each runs twice (the second call reuses the first's buffers and signals) and is checked against a
reference, so a clean sanitizer report is of calls that did their work."""
import os
import sys

import torch
import torch.distributed as dist

import generated
import tilegen


def main() -> int:
    rank, world = tilegen.init()
    torch.manual_seed(1234 + rank)
    bad = []
    for call in range(2):
        x = torch.full((8, 4096), float(rank + call), dtype=torch.bfloat16, device="cuda")
        out = generated.allgather_bf16(x)
        want = torch.cat([torch.full((8, 4096), float(r + call), dtype=torch.bfloat16, device="cuda")
                          for r in range(world)])
        if not torch.equal(out, want):
            bad.append(f"allgather_bf16 call {call}")
        avg = generated.allreduce_bf16_avg(torch.full((4, 4096), float(2 * (rank + 1)), dtype=torch.bfloat16,
                                                      device="cuda"))
        if not torch.allclose(avg.float(), torch.full_like(avg.float(), float(world + 1)), rtol=1e-2):
            bad.append(f"allreduce_bf16_avg call {call}")
        op = generated.ag_gemm_bf16
        n, k = op.gemm_nk[world]
        a = torch.randn((16, k), dtype=torch.bfloat16, device="cuda")
        b = torch.randn((k, n) if op.b_layout == "kn" else (n, k), dtype=torch.bfloat16, device="cuda")
        c = op(a, b)
        if c.shape != (world * 16, n) or not torch.isfinite(c.float()).all():
            bad.append(f"ag_gemm_bf16 call {call}")
        moe = generated.moe_bf16
        xs = torch.randn((32, moe.shape[1]), dtype=torch.bfloat16, device="cuda")
        idx = torch.stack([torch.randperm(moe.experts, device="cuda")[:moe.topk] for _ in range(32)]).int()
        w = torch.full((32, moe.topk), 1.0 / moe.topk, device="cuda")
        recv, _, handle = moe.dispatch(xs, idx, w)
        back = moe.combine(recv, handle)  # identity experts: each token's weighted sum is itself
        if (back.float() - xs.float()).abs().max().item() > 0.05:
            bad.append(f"moe_bf16 call {call}")
    torch.cuda.synchronize()
    dist.barrier()
    print(f"rank {rank}: sanitize_ops {'ok' if not bad else 'FAILED: ' + ', '.join(bad)}", flush=True)
    tilegen.finalize()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main() if os.environ.get("WORLD_SIZE") else "run under torchrun (python3 -m bench sanitize)")
