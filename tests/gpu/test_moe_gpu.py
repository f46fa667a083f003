"""Generated MoE ops (op: moe) on GPUs: dispatch bitwise against the NCCL reference (tilegen.moe_nccl:
all_to_all_single with counts), combine against a float64 reference within one rounding, at the
sizes and routings of tilegen.moe's checks (dropped slots, one expert taking every token, mostly
empty experts, m = 0 on a rank, m = max), repeated calls, bad routings, graph capture refused.
Every rank's inputs come from per-rank seeds, so each rank can build the reference for its own tokens."""
import pytest
import torch
import torch.distributed as dist

from tilegen.moe import nccl as moe_nccl
from tilegen.moe.runtime import filled_rows

CASES = ("random", "dropped", "one_expert", "sparse")


def _op(name):
    import generated
    return getattr(generated, name)


def _routing(m, k, experts, case, seed, idx_dtype=torch.int64):
    """topk_idx [m, k] (distinct experts per token unless one_expert), softmax weights [m, k] fp32."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand((m, experts), device="cuda", generator=g)
    if case == "sparse":  # every token picks among the first k + 1 experts: most experts stay empty
        scores[:, k + 1:] = -1
    w, idx = torch.topk(scores, k, dim=1)
    if case == "one_expert":
        idx = torch.arange(k, device="cuda").expand(m, k).contiguous()
    if case == "dropped":
        drop = torch.rand((m, k), device="cuda", generator=g) < 0.3
        idx = idx.masked_fill(drop, -1)
    return idx.to(idx_dtype), torch.softmax(w, dim=1).float().contiguous()


def _tokens(op, m, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn((m, op.hidden), device="cuda", generator=g).to(getattr(torch, op.dtype))


def _expert_fn(x, local_expert):
    """A per-row expert function that differs per expert (a slot mix-up changes the result)."""
    scale = 1.0 + local_expert.double().unsqueeze(1) / 16.0
    return (x.double() * scale).to(x.dtype)


def _combine_reference(op, x, idx, w, world, with_abs=False):
    """float64 reference of combine on this rank: sum over slots of w * expert_fn(x) (y rounded to the dtype
    as the expert's output is); with_abs: also the sum of the terms' magnitudes (what rounding scales with)."""
    L = op.experts // world
    out = torch.zeros((x.shape[0], op.hidden), dtype=torch.float64, device=x.device)
    mag = torch.zeros_like(out)
    zero = torch.zeros((), device=x.device, dtype=torch.float64)
    for j in range(op.topk):
        e = idx[:, j].long()
        term = torch.where((e >= 0).unsqueeze(1), w[:, j:j + 1].double() * _expert_fn(x, e.clamp_min(0) % L).double(),
                           zero)
        out += term
        mag += term.abs()
    return (out, mag) if with_abs else out


FP32_SUMS = 16 * torch.finfo(torch.float32).eps  # what summing a row's terms in fp32 may add, per unit of magnitude


def _combine_off(out, ref, mag, fp32=FP32_SUMS):
    """None when combine's out is within its bound of the float64 reference, else by how much it is off.
    Each expert rank's partial sum and the final sum are rounded to the dtype once each (partials in the
    token dtype halve combine's NVLink bytes): within one ulp of the terms' magnitude `mag`, plus `fp32`
    of the row's largest magnitude for the fp32 sums."""
    err = (out.double() - ref).abs()
    bound = torch.finfo(out.dtype).eps * mag + fp32 * mag.amax(dim=1, keepdim=True).clamp_min(1)
    return None if (err <= bound).all() else f"off by up to {err.max().item():.3g} (bound {bound.max().item():.3g})"


def _check_one(op, m, case, seed, idx_dtype=torch.int64):
    rank, world = dist.get_rank(), dist.get_world_size()
    what = f"{op.name} rank {rank}/{world}, m={m}, case={case}, seed={seed}"
    x = _tokens(op, m, seed + rank)
    idx, w = _routing(m, op.topk, op.experts, case, seed + 100 + rank, idx_dtype)
    got_x, got_counts, h = op.dispatch(x, idx, w)
    want_x, want_counts, want_handle = moe_nccl.dispatch(x, idx, op.experts)
    torch.cuda.synchronize()
    assert torch.equal(got_counts.long(), want_counts.long()), f"{what}: counts {got_counts} vs {want_counts}"
    assert got_counts.tolist() == h.counts_host, what
    assert torch.equal(h.handle.long(), want_handle.long()), f"{what}: handle differs"
    assert torch.equal(got_x.view(torch.uint8), want_x.view(torch.uint8)), f"{what}: received tokens differ"
    L = op.experts // world
    local = torch.repeat_interleave(torch.arange(L, device="cuda"), got_counts.long())
    y = _expert_fn(got_x, local)
    out = op.combine(y, h)
    ref, mag = _combine_reference(op, x, idx, w, world, with_abs=True)
    torch.cuda.synchronize()
    off = _combine_off(out, ref, mag)
    assert off is None, f"{what}: combine {off}"


@pytest.mark.parametrize("name", ["moe_bf16", "moe_f32_k3"])
@pytest.mark.parametrize("case", CASES)
def test_moe_dispatch_and_combine_random_shapes(dist_env, name, case):
    """Seeded random token counts per rank (one rank with none), every routing case."""
    rank, world = dist_env
    op = _op(name)
    for seed in range(3):
        g = torch.Generator().manual_seed(1000 * seed + len(case))
        ms = torch.randint(0, min(op.max_rows(), 700) + 1, (world,), generator=g).tolist()
        ms[seed % world] = 0 if seed == 1 else ms[seed % world]
        _check_one(op, ms[rank], case, 7919 * seed + 31 * len(case), torch.int32 if seed == 2 else torch.int64)


@pytest.mark.parametrize("name", ["moe_bf16", "moe_f32_k3"])
def test_moe_at_max_tokens(dist_env, name):
    op = _op(name)
    _check_one(op, op.max_rows(), "random", 4242)


def test_moe_repeated_dispatches_then_combines(dist_env):
    """Calls alternate the op's two buffer halves: two dispatches before their combines (the second
    dispatch reuses nothing the first's combine needs), then the reverse order of combines."""
    rank, world = dist_env
    op = _op("moe_bf16")
    xs = [_tokens(op, 64 + 16 * i, 50 + 10 * i + rank) for i in range(3)]
    routes = [_routing(x.shape[0], op.topk, op.experts, "random", 90 + i + rank) for i, x in enumerate(xs)]
    outs = [op.dispatch(x, idx, w) for x, (idx, w) in zip(xs, routes)]
    L = op.experts // world
    combined = []
    for recv, counts, h in reversed(outs):
        local = torch.repeat_interleave(torch.arange(L, device="cuda"), counts.long())
        combined.append(op.combine(_expert_fn(recv, local), h))
    for i, out in enumerate(reversed(combined)):
        ref = _combine_reference(op, xs[i], *routes[i], world)
        assert ((out.double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-3).all(), f"rank {rank}: call {i} differs"


def test_moe_bad_routing_is_a_value_error_before_launch(dist_env):
    op = _op("moe_bf16")
    x = _tokens(op, 4, 1)
    idx, w = _routing(4, op.topk, op.experts, "random", 2)
    bad = idx.clone()
    bad[2, 1] = op.experts
    with pytest.raises(ValueError, match=r"topk_idx\[2, 1\] = 256"):
        op.dispatch(x, bad, w)
    with pytest.raises(ValueError, match="topk_idx must be"):
        op.dispatch(x, idx[:, :3].contiguous(), w)
    with pytest.raises(ValueError, match="topk_weights must be float32"):
        op.dispatch(x, idx, w.double())
    _check_one(op, 5, "random", 3)  # the op still works (every rank raised before anything was sent)


def test_moe_graph_capture_is_refused(dist_env):
    op = _op("moe_bf16")
    x = _tokens(op, 8, 1)
    idx, w = _routing(8, op.topk, op.experts, "random", 2)
    op.dispatch(x, idx, w)  # loaded, and one full call made
    op.combine(torch.zeros((0, op.hidden), device="cuda", dtype=x.dtype), op.dispatch(x[:0], idx[:0], w[:0])[2])
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with torch.cuda.graph(graph):
            op.dispatch(x, idx, w)


# ------------------------------------------------------------------ low-latency mode
def _ll_expert_fn(recv):
    """_expert_fn on the [local experts, rows, hidden] layout (local expert = dim 0)."""
    scale = 1.0 + torch.arange(recv.shape[0], device=recv.device, dtype=torch.float64).view(-1, 1, 1) / 16.0
    return (recv.double() * scale).to(recv.dtype)


def _check_ll_result(op, x, idx, w, recv, counts, h, out, what):
    world = dist.get_world_size()
    got_x, got_handle = filled_rows(recv, counts), filled_rows(h.handle, counts)
    want_x, want_counts, want_handle = moe_nccl.dispatch(x, idx, op.experts)
    torch.cuda.synchronize()
    assert torch.equal(counts.sum(dim=1).long(), want_counts.long()), f"{what}: counts differ"
    assert torch.equal(got_handle.long(), want_handle.long()), f"{what}: handle differs"
    assert torch.equal(got_x.view(torch.uint8), want_x.view(torch.uint8)), f"{what}: received tokens differ"
    ref, mag = _combine_reference(op, x, idx, w, world, with_abs=True)
    off = _combine_off(out, ref, mag)
    assert off is None, f"{what}: combine {off}"


@pytest.mark.parametrize("case", ["random", "dropped", "sparse"])
def test_moe_low_latency_matches_nccl(dist_env, case):
    rank, world = dist_env
    op = _op("moe_bf16_ll")
    for seed in range(3):
        g = torch.Generator().manual_seed(77 * seed + len(case))
        m = [0, 1, op.max_rows(), int(torch.randint(0, op.max_rows() + 1, (1,), generator=g))][(seed + rank) % 4]
        x = _tokens(op, m, 300 + seed + rank)
        idx, w = _routing(m, op.topk, op.experts, case, 400 + seed + rank)
        recv, counts, h = op.dispatch(x, idx, w)
        out = op.combine(_ll_expert_fn(recv), h)
        _check_ll_result(op, x, idx, w, recv, counts, h, out, f"rank {rank} m={m} {case} seed={seed}")


def test_moe_low_latency_replays_in_a_cuda_graph(dist_env):
    """Dispatch, the experts and combine captured once, replayed with new routings and tokens copied into
    the captured inputs: every replay's results are that replay's (the epochs advance on the device)."""
    rank, world = dist_env
    op = _op("moe_bf16_ll")
    m = 100
    x = _tokens(op, m, 1 + rank)
    idx, w = _routing(m, op.topk, op.experts, "random", 2 + rank)
    recv, counts, h = op.dispatch(x, idx, w)
    op.combine(_ll_expert_fn(recv), h)  # the first call allocates; capture the second
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_recv, g_counts, g_h = op.dispatch(x, idx, w)
        g_out = op.combine(_ll_expert_fn(g_recv), g_h)
    for replay in range(3):
        x.copy_(_tokens(op, m, 50 + 10 * replay + rank))
        new_idx, new_w = _routing(m, op.topk, op.experts, ("random", "dropped", "sparse")[replay], 60 + replay + rank)
        idx.copy_(new_idx)
        w.copy_(new_w)
        graph.replay()
        _check_ll_result(op, x, idx, w, g_recv, g_counts, g_h, g_out, f"rank {rank} replay {replay}")
    dist.barrier()


def test_moe_low_latency_refuses_out_of_order_calls_and_repeated_experts(dist_env):
    op = _op("moe_bf16_ll")
    x = _tokens(op, 4, 1)
    idx, w = _routing(4, op.topk, op.experts, "random", 2)
    with pytest.raises(RuntimeError, match="combine without a dispatch"):
        op.combine(torch.zeros((op.experts // dist.get_world_size(), dist.get_world_size() * op.max_rows(),
                                op.hidden), device="cuda", dtype=x.dtype), None)
    bad = idx.clone()
    bad[1, 3] = bad[1, 0]
    with pytest.raises(ValueError, match=r"topk_idx\[1\] names an expert twice"):
        op.dispatch(x, bad, w)
    recv, counts, h = op.dispatch(x, idx, w)
    with pytest.raises(RuntimeError, match="dispatch called twice without combine"):
        op.dispatch(x, idx, w)
    out = op.combine(_ll_expert_fn(recv), h)
    _check_ll_result(op, x, idx, w, recv, counts, h, out, "after the refused calls")


# ------------------------------------------------------------------ fp8 dispatch
def _fp8_reference(op, x, idx):
    """The NCCL version of an fp8 dispatch: quantize (tilegen.moe_nccl.quantize), then dispatch the
    e4m3 bytes and the scales; also the tokens they stand for (what the experts see)."""
    q, sc = moe_nccl.quantize(x, op.fp8_group)
    want_q, counts, handle = moe_nccl.dispatch(q.view(torch.uint8), idx, op.experts)
    want_sc, _, _ = moe_nccl.dispatch(sc, idx, op.experts)
    return want_q, want_sc, counts, handle, moe_nccl.dequantize(q, sc, x.dtype)


def _e4m3_diff(got, want, want_sc, group):
    """Where two e4m3 byte tensors differ: how many bytes, and the first few as (row, col, got, want,
    the group's scale) in values, so a rounding difference reads apart from misplaced or stale bytes."""
    bad = (got != want).nonzero()
    if bad.numel() == 0:
        return "equal"
    f8 = torch.float8_e4m3fn
    shown = [(r, c, got[r, c].view(f8).float().item(), want[r, c].view(f8).float().item(),
              want_sc[r, c // group].item()) for r, c in bad[:6].tolist()]
    return f"{bad.shape[0]} of {got.numel()} bytes differ in {bad[:, 0].unique().numel()} rows; first {shown}"


@pytest.mark.parametrize("case", ["random", "dropped", "one_expert"])
def test_moe_fp8_dispatch_matches_quantized_nccl(dist_env, case):
    rank, world = dist_env
    op = _op("moe_bf16_fp8")
    L = op.experts // world
    problems = []  # checked after every rank made every call: a rank that fails early must not strand the others
    for seed in range(2):
        m = [0, 37, 512, 700][(seed + rank) % 4]
        what = f"rank {rank} m={m} {case} seed={seed}"
        x = _tokens(op, m, 900 + seed + rank) * 8  # values past e4m3's range before scaling
        idx, w = _routing(m, op.topk, op.experts, case, 950 + seed + rank)
        (q, sc), counts, h = op.dispatch(x, idx, w)
        want_q, want_sc, want_counts, want_handle, x_deq = _fp8_reference(op, x, idx)
        torch.cuda.synchronize()
        if not (torch.equal(counts.long(), want_counts.long()) and torch.equal(h.handle.long(), want_handle.long())):
            problems.append(f"{what}: counts or handle differ")
        elif q.shape != want_q.shape:
            problems.append(f"{what}: e4m3 tokens {tuple(q.shape)} vs {tuple(want_q.shape)}")
        elif not torch.equal(q.view(torch.uint8), want_q):
            problems.append(f"{what}: e4m3 tokens: {_e4m3_diff(q.view(torch.uint8), want_q, want_sc, op.fp8_group)}")
        if not torch.equal(sc.view(torch.int32), want_sc.view(torch.int32)):
            n = (sc.view(torch.int32) != want_sc.view(torch.int32)).sum().item() if sc.shape == want_sc.shape else "all"
            problems.append(f"{what}: {n} scales differ")
        local = torch.repeat_interleave(torch.arange(L, device="cuda"), counts.long())
        out = op.combine(_expert_fn(moe_nccl.dequantize(q, sc, x.dtype), local), h)
        ref, mag = _combine_reference(op, x_deq, idx, w, world, with_abs=True)
        off = _combine_off(out, ref, mag, fp32=1e-6)
        if off is not None:
            problems.append(f"{what}: combine {off}")
    assert not problems, "\n".join(problems)


def test_moe_fp8_low_latency_per_token_scales(dist_env):
    rank, world = dist_env
    op = _op("moe_bf16_fp8_ll")
    m = [0, 1, 77, 128][rank % 4]
    x = _tokens(op, m, 70 + rank)
    idx, w = _routing(m, op.topk, op.experts, "dropped", 80 + rank)
    (q, sc), counts, h = op.dispatch(x, idx, w)
    want_q, want_sc, _, want_handle, x_deq = _fp8_reference(op, x, idx)
    got_q, got_sc, got_handle = (filled_rows(t, counts) for t in (q.view(torch.uint8), sc, h.handle))
    torch.cuda.synchronize()
    assert torch.equal(got_handle.long(), want_handle.long()), f"rank {rank}: handle differs"
    assert torch.equal(got_q, want_q) and torch.equal(got_sc, want_sc), f"rank {rank}: e4m3 tokens or scales differ"
    deq = moe_nccl.dequantize(q.reshape(-1, op.hidden), sc.reshape(-1, 1), x.dtype).view(q.shape)
    out = op.combine(_ll_expert_fn(deq), h)
    ref, mag = _combine_reference(op, x_deq, idx, w, world, with_abs=True)
    off = _combine_off(out, ref, mag, fp32=1e-6)
    assert off is None, f"rank {rank}: combine {off}"


@pytest.mark.parametrize("name", ["moe_bf16", "moe_bf16_ll"])
def test_a_tokens_combined_bits_do_not_depend_on_its_batch(dist_env, name):
    """Combine sums each token's rows in a fixed order (slot order on each expert rank, then rank order),
    so one token's result has the same bits alone, in a batch of 7 and in the largest batch (with the
    same routing and expert outputs for it), in both modes."""
    rank, world = dist_env
    op = _op(name)
    tok = _tokens(op, 1, 4242 + rank)
    tidx, tw = _routing(1, op.topk, op.experts, "random", 4343 + rank)
    seen = []
    for m, at in ((1, 0), (7, 3), (op.max_rows(), op.max_rows() // 3)):
        x = _tokens(op, m, 500 + m + rank)
        idx, w = _routing(m, op.topk, op.experts, "random", 600 + m + rank)
        x[at], idx[at], w[at] = tok[0], tidx[0], tw[0]
        if op.mode == "low_latency":
            recv, counts, h = op.dispatch(x, idx, w)
            out = op.combine(_ll_expert_fn(recv), h)
        else:
            got_x, got_counts, h = op.dispatch(x, idx, w)
            local = torch.repeat_interleave(torch.arange(op.experts // world, device="cuda"), got_counts.long())
            out = op.combine(_expert_fn(got_x, local), h)
        torch.cuda.synchronize()
        seen.append((m, out[at].clone()))
    for m, row in seen[1:]:
        diff = int((row.view(torch.uint8) != seen[0][1].view(torch.uint8)).sum())
        assert diff == 0, f"{name} rank {rank}/{world}: {diff} bytes of the token's row differ between batch 1 and {m}"
