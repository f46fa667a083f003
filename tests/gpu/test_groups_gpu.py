"""Ops on groups of ranks (tilegen.group), at whatever world size runs: at 4 ranks TP2 x DP2 (two TP
groups running at once, DP groups across them, made from rank lists and from torch ProcessGroups), and
a group in reversed rank order; at 2 ranks the reversed pair. References from every rank's seeded
inputs (float64 for reductions); the torch ops eager, compiled (fullgraph) and CUDA-graph replayed;
bad groups refused before launch."""
import pytest
import torch
import torch.distributed as dist

import tilegen

from ._refs import all_inputs, assert_reduction, rel_err

SEED = 1234


def _op(name):
    import generated
    return getattr(generated, name)


@pytest.fixture(scope="module")
def groups(dist_env):
    """This rank's groups by name (made in the same order on every rank)."""
    rank, world = dist_env
    made = {"reversed": tilegen.group(list(range(world))[::-1])}
    if world == 4:
        made["tp"] = tilegen.group([[0, 1], [2, 3]])
        made["dp"] = tilegen.group([[0, 2], [1, 3]])
        pg, _ = dist.new_subgroups(2)                      # the same TP groups as torch ProcessGroups
        made["tp_pg"] = tilegen.group(pg)
        assert made["tp_pg"].slot == made["tp"].slot and made["tp_pg"].ranks == made["tp"].ranks
        # two groups made one after the other: the second joins the first's slot (only its members set up)
        first, second = tilegen.group([1, 0]), tilegen.group([3, 2])
        assert first.slot == second.slot
        made["pair"] = first if rank in (0, 1) else second
    for g in made.values():
        assert g.ranks[g.rank] == rank
    return made


def _names(world):
    return ["reversed"] + (["tp", "dp", "pair"] if world == 4 else [])


@pytest.mark.parametrize("rows", [1, 17, 4096])
def test_allreduce_on_each_group(dist_env, groups, rows):
    rank, world = dist_env
    op = _op("allreduce_bf16")
    for i, name in enumerate(_names(world)):
        g = groups[name]
        xs = all_inputs((rows, 4096), torch.bfloat16, SEED + 97 * rows + 10 * i)
        out = op(xs[rank], group=g)
        torch.cuda.synchronize()
        assert_reduction(out, [xs[r] for r in g.ranks], "sum", None, f"allreduce on {name} {g.ranks} rows={rows}")


def test_allgather_and_reduce_scatter_follow_the_groups_rank_order(dist_env, groups):
    rank, world = dist_env
    ag, rs = _op("allgather_bf16"), _op("reduce_scatter_f32_premul")
    for i, name in enumerate(_names(world)):
        g = groups[name]
        xs = all_inputs((5, 8192), torch.bfloat16, SEED + 7 * i)
        got = ag(xs[rank], group=g)
        ys = all_inputs((g.size * 3, 1000), torch.float32, SEED + 100 + i)
        red = rs(ys[rank], group=g, scale=0.5)
        torch.cuda.synchronize()
        assert torch.equal(got, torch.cat([xs[r] for r in g.ranks])), f"allgather on {name} {g.ranks}"
        want = 0.5 * sum(ys[r].double() for r in g.ranks)
        err = (red.double() - want[g.rank * 3:(g.rank + 1) * 3]).abs().max().item()
        assert err < 1e-4, f"reduce_scatter on {name} {g.ranks}: off by {err}"


def test_interleaved_calls_on_overlapping_groups(dist_env, groups):
    """Calls on the world and on groups that overlap, queued back to back without a sync between
    them, in the same order on every rank: each keeps its own buffers and sequence."""
    rank, world = dist_env
    op = _op("allreduce_bf16")
    order = ([None] + [groups[n] for n in _names(world)]) * 3
    xs = [all_inputs((64, 4096), torch.bfloat16, SEED + 31 * i) for i in range(len(order))]
    outs = [op(x[rank], group=g).clone() for x, g in zip(xs, order)]  # (outputs of one size share a buffer)
    torch.cuda.synchronize()
    for i, (g, out) in enumerate(zip(order, outs)):
        ranks = range(world) if g is None else g.ranks
        assert_reduction(out, [xs[i][r] for r in ranks], "sum", None, f"call {i} on {list(ranks)}")


def test_group_calls_replay_in_a_cuda_graph(dist_env, groups):
    rank, world = dist_env
    op = _op("allreduce_bf16")
    g = groups["tp" if world == 4 else "reversed"]
    x = torch.zeros((32, 4096), dtype=torch.bfloat16, device="cuda")
    out = op.empty_output(32, g)
    op(x, out, group=g)  # loads and warms up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(x, out, group=g)
    for i in range(3):
        xs = all_inputs((32, 4096), torch.bfloat16, SEED + 500 + i)
        x.copy_(xs[rank])
        graph.replay()
        torch.cuda.synchronize()
        assert_reduction(out, [xs[r] for r in g.ranks], "sum", None, f"replay {i} on {g.ranks}")


def test_torch_ops_eager_compiled_and_replayed(dist_env, groups):
    rank, world = dist_env
    ar, ag = _op("allreduce_bf16"), _op("allgather_bf16")
    ar.load(), ag.load()
    g = groups["tp" if world == 4 else "reversed"]

    def block(x, y):
        h = ar.torch(x * 2, group=g)
        return torch.cat([ar.torch(h + 1, group=g), ag.torch(y * 3, group=g)[:, :4096]])

    xs = all_inputs((8, 4096), torch.bfloat16, SEED + 900)
    ys = all_inputs((8, 8192), torch.bfloat16, SEED + 901)
    h = sum(xs[r].double() * 2 for r in g.ranks).to(torch.bfloat16).double()
    ref = torch.cat([g.size * (h + 1), torch.cat([ys[r].double() * 3 for r in g.ranks])[:, :4096]])
    eager = block(xs[rank], ys[rank])
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)(xs[rank], ys[rank])
    graphed_fn = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    graphed = [graphed_fn(xs[rank], ys[rank]).clone() for _ in range(4)]  # warm-up, record, replays
    torch.cuda.synchronize()
    for what, got in [("eager", eager), ("compiled", compiled)] + [(f"graphed {i}", t) for i, t in enumerate(graphed)]:
        assert rel_err(got, ref) < 1e-2, what


def test_gemm_on_a_group(dist_env, groups):
    rank, world = dist_env
    op = _op("ag_gemm_bf16")
    g = groups["tp" if world == 4 else "reversed"]
    n, k = op.gemm_nk[g.size]
    a = all_inputs((33, k), torch.bfloat16, SEED + 70)
    b = (all_inputs((k, n), torch.bfloat16, SEED + 71 + g.rank)[rank].float() / k ** 0.5).to(torch.bfloat16)
    c = op(a[rank], b if op.b_layout == "kn" else b.t().contiguous(), group=g)
    torch.cuda.synchronize()
    assert c.shape == (g.size * 33, n)
    assert rel_err(c, torch.cat([a[r] for r in g.ranks]).float() @ b.float()) < 1e-2


def test_moe_on_a_group(dist_env, groups):
    """dispatch then combine with identity experts in the group: each token comes back as x * sum(w)."""
    rank, world = dist_env
    op = _op("moe_bf16")
    g = groups["tp" if world == 4 else "reversed"]
    m = 50
    gen = torch.Generator(device="cuda").manual_seed(SEED + rank)
    x = torch.randn((m, op.hidden), device="cuda", generator=gen).to(torch.bfloat16)
    w, idx = torch.topk(torch.rand((m, op.experts), device="cuda", generator=gen), op.topk, dim=1)
    w = torch.softmax(w, dim=1).float().contiguous()
    recv, counts, h = op.dispatch(x, idx, w, group=g)
    assert counts.numel() == op.experts // g.size
    out = op.combine(recv, h)
    torch.cuda.synchronize()
    want = x.double() * w.double().sum(dim=1, keepdim=True)
    assert rel_err(out, want) < 1e-2


def test_bad_groups_are_value_errors_before_launch(dist_env, groups):
    rank, world = dist_env
    op = _op("allreduce_bf16")
    x = torch.zeros((4, 4096), dtype=torch.bfloat16, device="cuda")
    outsider = tilegen.group([0])  # every rank makes it; only rank 0 is in it, and no op serves 1 rank
    with pytest.raises(ValueError, match="has 1 ranks|does not hold this rank"):
        op(x, group=outsider)
    with pytest.raises(ValueError, match="group must be a tilegen group"):
        op(x, group=[0, 1])
    with pytest.raises(ValueError, match="must hold ranks in"):
        tilegen.group([0, world])
    torch.cuda.synchronize()
    dist.barrier()
