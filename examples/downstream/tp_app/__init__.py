"""An app built on prebuilt tilegen ops (the `tp_ops` package its wheel carries).

    torchrun --nproc-per-node 2 -m tp_app      # checks the ops against one-GPU references, prints timings

No nvcc and no tilegen checkout are needed where it runs: `pip install tp_app-*.whl` and NVSHMEM.
torch is imported where it is used (`provenance()` needs none).
"""
D, H = 1024, 4096  # d_model, d_ff (the specs in specs/)


def provenance() -> dict:
    """What each shipped op was built from and for (its manifest and build record)."""
    import json

    import tp_ops
    out = {}
    for name in tp_ops.OPS:
        op = getattr(tp_ops, name)
        build = json.loads((op.directory / "_build" / "build.json").read_text())
        out[name] = {"tilegen": op.manifest["tilegen_version"], "spec_hash": op.manifest["spec_hash"][:12],
                     "archs": build["archs"], "nvshmem": build["nvshmem"]}
    return out


def swiglu(gu):
    import torch
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def weights(seed: int = 0):
    """Full weights (the same on every rank) and this rank's shards."""
    import torch
    import torch.distributed as dist
    world, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator(device="cuda").manual_seed(seed)
    w_gate, w_up = ((torch.randn((H, D), device="cuda", generator=g) / D ** 0.5).bfloat16() for _ in range(2))
    w_down = (torch.randn((D, H), device="cuda", generator=g) / H ** 0.5).bfloat16()
    hs = slice(r * H // world, (r + 1) * H // world)
    return (w_gate, w_up, w_down), (torch.cat([w_gate[hs], w_up[hs]]).contiguous(), w_down[:, hs].contiguous())


def mlp(x, w_gu_r, w_down_r):
    import tp_ops
    return tp_ops.mlp_down(swiglu(tp_ops.mlp_gate_up(x, w_gu_r)), w_down_r)


def check(tokens: int = 256, seed: int = 0) -> dict:
    """Run the allreduce and the TP MLP block; compare with references. Returns the errors."""
    import torch
    import torch.distributed as dist

    import tp_ops
    world, r = dist.get_world_size(), dist.get_rank()
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    xs = torch.randn((world, tokens, D), device="cuda", generator=g).bfloat16()  # every rank's input
    y = tp_ops.allreduce_bf16(xs[r])
    ref = xs.double().sum(0)
    ar_err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    (w_gate, w_up, w_down), (w_gu_r, w_down_r) = weights(seed)
    out = mlp(xs[r], w_gu_r, w_down_r)
    full = xs.reshape(world * tokens, D)
    h = torch.nn.functional.silu(full @ w_gate.T) * (full @ w_up.T)
    want = (h @ w_down.T)[r * tokens:(r + 1) * tokens]
    mlp_err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    return {"allreduce_max_rel_err": ar_err, "mlp_rel_err": mlp_err}


def main() -> int:
    import torch.distributed as dist

    import tilegen
    rank, world = tilegen.init()
    errs = check()
    if rank == 0:
        for name, p in provenance().items():
            print(f"{name}: tilegen {p['tilegen']}, spec {p['spec_hash']}, archs {', '.join(p['archs'])}, "
                  f"NVSHMEM {p['nvshmem']}")
        print(f"tp_app at {world} ranks: allreduce max rel err {errs['allreduce_max_rel_err']:.2e}, "
              f"TP MLP rel err {errs['mlp_rel_err']:.2e}")
    ok = errs["allreduce_max_rel_err"] < 1e-2 and errs["mlp_rel_err"] < 2e-2
    tilegen.finalize()
    dist.destroy_process_group()
    return 0 if ok else 1
