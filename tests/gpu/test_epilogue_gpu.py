"""Collective epilogues (residual + RMSNorm, fp8 rows) and deterministic reductions on real GPUs.

Every rank makes every rank's inputs from per-rank seeds, so references are computed locally in
float64. Shapes are drawn from a seeded generator and named in every failure message."""
import random

import pytest
import torch
import torch.distributed as dist

import generated

from ._refs import all_inputs, reduce64

TIMEOUT_MS = 60_000  # a rank that misses a call fails the test instead of hanging it
TOL = {torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}  # two roundings of the output type, relative


def _shapes(seed: int, n: int, max_rows: int, max_hidden: int):
    """n (rows, hidden) pairs: the edges (1 row, widest and odd widths) and random ones."""
    rnd = random.Random(seed)
    fixed = [(1, max_hidden), (7, 1000), (33, 2880), (max_rows, max_hidden), (5, 8)]
    return fixed + [(rnd.randint(1, max_rows), rnd.choice([8, 64, 1000, 4096, max_hidden])) for _ in range(n)]


def _norm_ref(xs, residual, weight, eps, dtype):
    """The epilogue in float64 from the op's rounded intermediates: the sum and h rounded to dtype."""
    s = reduce64(xs, "sum").to(dtype).double()
    h = (s + residual.double()).to(dtype).double()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h, (y.to(dtype).double() * weight.double()).to(dtype).double()


def _assert_close(got, want, dtype, what):
    err = (got.double() - want).abs()
    bound = TOL[dtype] * want.abs() + 1e-3
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off, worst {err.max().item():.3g} (flat index "
                           f"{int((err - bound).argmax())})")


def _rows_of_rank(op_kind, world, rank, m):
    """Rows of the reduced tensor this rank's output holds (reduce_scatter: its block)."""
    return slice(rank * m, (rank + 1) * m) if op_kind == "reduce_scatter" else slice(0, m)


@pytest.mark.parametrize("name, dtype", [("allreduce_rmsnorm", torch.bfloat16), ("allreduce_rmsnorm", torch.float16),
                                         ("reduce_scatter_rmsnorm", torch.bfloat16)])
def test_residual_rmsnorm_epilogue_matches_float64(dist_env, name, dtype):
    rank, world = dist_env
    op = getattr(generated, name)
    k = world if op.kind == "reduce_scatter" else 1
    for i, (m, hidden) in enumerate(_shapes(7 + world, 3, op.max_rows(), op.inner_shape[0])):
        what = f"{name} {dtype} m={m} hidden={hidden} world={world}"
        xs = all_inputs((k * m, hidden), dtype, 1000 * i)
        res = all_inputs((m, hidden), dtype, 1000 * i + 500)[rank]
        w = (1 + 0.1 * all_inputs((hidden,), dtype, 1000 * i + 900)[0]).to(dtype)
        eps = op.epilogue["rmsnorm"]
        rows = _rows_of_rank(op.kind, world, rank, m)
        h_ref, y_ref = _norm_ref([x[rows] for x in xs], res, w, eps, dtype)
        r = res.clone()
        y = op(xs[rank], residual=r, weight=w, timeout_ms=TIMEOUT_MS)
        torch.cuda.synchronize()
        assert y.shape == (m, hidden) and y.dtype == dtype, what
        _assert_close(r, h_ref, dtype, what + ": residual")
        _assert_close(y, y_ref, dtype, what + ": output")
        # in place: the output is the input (allreduce)
        if op.kind == "allreduce":
            x = xs[rank].clone()
            r2 = res.clone()
            op(x, x, residual=r2, weight=w, timeout_ms=TIMEOUT_MS)
            torch.cuda.synchronize()
            assert torch.equal(x, y) and torch.equal(r2, r), what + ": in place differs"


@pytest.mark.parametrize("name", ["allreduce_rmsnorm", "allreduce_rmsnorm_fp8", "reduce_scatter_rmsnorm"])
def test_epilogues_replay_in_a_cuda_graph(dist_env, name):
    rank, world = dist_env
    op = getattr(generated, name)
    dtype = torch.bfloat16
    k = world if op.kind == "reduce_scatter" else 1
    m, hidden = 37, 4096
    x = torch.zeros((k * m, hidden), dtype=dtype, device="cuda")
    res = torch.zeros((m, hidden), dtype=dtype, device="cuda")
    w = torch.ones((hidden,), dtype=dtype, device="cuda")
    quant = op.epilogue["quant"] is not None
    out = torch.empty((m, hidden), dtype=torch.float8_e4m3fn if quant else dtype, device="cuda")
    scales = torch.empty((m,), dtype=torch.float32, device="cuda") if quant else None
    kw = dict(residual=res, weight=w) | ({"scales": scales} if quant else {})
    op(x, out, **kw)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(x, out, **kw)
    for call in range(3):
        xs = all_inputs((k * m, hidden), dtype, 77 + 10 * call)
        r0 = all_inputs((m, hidden), dtype, 79 + 10 * call)[rank]
        x.copy_(xs[rank])
        res.copy_(r0)
        w.copy_((1 + 0.1 * all_inputs((hidden,), dtype, 81 + call)[0]).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        what = f"{name} replay {call} m={m} hidden={hidden} world={world}"
        rows = _rows_of_rank(op.kind, world, rank, m)
        h_ref, y_ref = _norm_ref([t[rows] for t in xs], r0, w, op.epilogue["rmsnorm"], dtype)
        _assert_close(res, h_ref, dtype, what + ": residual")
        if quant:
            _assert_fp8(out, scales, y_ref, what)
        else:
            _assert_close(out, y_ref, dtype, what + ": output")


def _assert_fp8(q, scales, y_ref, what):
    s_ref = y_ref.abs().amax(-1) / 448
    assert torch.allclose(scales.double(), s_ref, rtol=1e-6, atol=0), f"{what}: scales {scales[:4]} vs {s_ref[:4]}"
    deq = q.double() * scales.double().unsqueeze(-1)
    err = (deq - y_ref).abs()
    bound = y_ref.abs() * 2 ** -4 + scales.double().unsqueeze(-1) * 2 ** -9  # e4m3: 3 mantissa bits; subnormals
    assert not (err > bound).any(), f"{what}: fp8 rows off by up to {err.max().item():.3g}"


def test_fp8_epilogue_rows_and_scales(dist_env):
    rank, world = dist_env
    op = generated.allreduce_rmsnorm_fp8
    for i, (m, hidden) in enumerate(_shapes(3 + world, 2, op.max_rows(), op.inner_shape[0])):
        what = f"allreduce_rmsnorm_fp8 m={m} hidden={hidden} world={world}"
        xs = all_inputs((m, hidden), torch.bfloat16, 300 * i)
        res = all_inputs((m, hidden), torch.bfloat16, 300 * i + 100)[rank]
        w = (1 + 0.1 * all_inputs((hidden,), torch.bfloat16, 300 * i + 200)[0]).to(torch.bfloat16)
        _, y_ref = _norm_ref(xs, res, w, op.epilogue["rmsnorm"], torch.bfloat16)
        q, scales = op(xs[rank], residual=res.clone(), weight=w, timeout_ms=TIMEOUT_MS)
        torch.cuda.synchronize()
        assert q.dtype == torch.float8_e4m3fn and q.shape == (m, hidden) and scales.shape == (m,), what
        _assert_fp8(q, scales, y_ref, what)


def test_epilogue_bad_arguments_are_value_errors_before_launch(dist_env):
    rank, world = dist_env
    op = generated.allreduce_rmsnorm
    x = torch.ones((4, 256), dtype=torch.bfloat16, device="cuda")
    res = torch.ones_like(x)
    w = torch.ones((256,), dtype=torch.bfloat16, device="cuda")
    cases = [
        (dict(weight=w), r"residual= is required"),
        (dict(residual=res), r"weight= is required"),
        (dict(residual=res, weight=w[:255]), r"weight must be \[256\]"),
        (dict(residual=res, weight=w.half()), r"weight must be \[256\] of the input's dtype"),
        (dict(residual=res[:3], weight=w), r"residual dim 0 must be 4"),
        (dict(residual=res.half(), weight=w), r"residual must have dtype"),
        (dict(residual=res.cpu(), weight=w), r"residual must (have dtype|be on cuda|be a CUDA)"),
        (dict(residual=x, weight=w), r"residual overlaps the input or the output"),
        (dict(residual=res, weight=w, scales=w.float()), r"scales= is for epilogues with quant"),
    ]
    before = res.clone()
    for kw, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            op(x, **kw)
    with pytest.raises(ValueError, match="residual=, weight= and scales= are for ops with an epilogue"):
        generated.allreduce_bf16(torch.ones((4, 4096), dtype=torch.bfloat16, device="cuda"), residual=res)
    assert torch.equal(res, before)  # nothing ran
    y = op(x, residual=res, weight=w, timeout_ms=TIMEOUT_MS)  # and the op still works
    torch.cuda.synchronize()
    assert torch.isfinite(y.float()).all()


# ------------------------------------------------------------------------------ deterministic
DETERMINISTIC = ["allreduce_det", "reduce_scatter_det", "reduce_det", "allreduce_rmsnorm_fp8", "reduce_scatter_rmsnorm"]


def _call(op, x, row_rows, res=None, w=None, timeout_ms=TIMEOUT_MS):
    """op on x; the result's rows (and fp8 scales) as one tensor of bytes per row, for comparing bits
    (timeout_ms=0 where a CUDA graph captures it: a bounded call synchronises)."""
    if op.epilogue:
        r = res.clone()
        got = op(x, residual=r, weight=w, timeout_ms=timeout_ms)
        if isinstance(got, tuple):
            q, s = got
            return torch.cat([q[row_rows].view(torch.uint8), s[row_rows].view(torch.uint8).view(-1, 4)], dim=1)
        return torch.cat([got[row_rows].view(torch.uint8), r[row_rows].view(torch.uint8)], dim=1)
    out = op(x, timeout_ms=timeout_ms)
    return out[row_rows].view(torch.uint8)


@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_rows_bits_do_not_depend_on_the_batch_it_is_reduced_in(dist_env, name, dtype):
    """The same row, reduced alone, in a batch of 7 and in a batch of 4096 (other sizes: other variants
    of the plan, other CTA counts and tiles), eager and replayed in a CUDA graph: the same bits, on every
    rank that holds it. (Two ranks add in either order alike: the test has teeth at 4 ranks and more.)"""
    rank, world = dist_env
    op = getattr(generated, name)
    if dtype not in [getattr(torch, d) for d in op.dtypes]:
        pytest.skip(f"{name} serves {op.dtypes}")
    hidden = min(op.inner_shape[0], 4096)
    k = world if op.kind == "reduce_scatter" else 1
    row = all_inputs((1, hidden), dtype, 4242)[rank] * 3
    res_row = all_inputs((1, hidden), dtype, 4343)[0] if op.epilogue else None
    w = (1 + 0.1 * all_inputs((hidden,), dtype, 4444)[0]).to(dtype) if op.epilogue else None
    seen = []
    for m, at in ((1, 0), (7, 3), (min(4096, op.max_rows()), 1234)):
        x = all_inputs((k * m, hidden), dtype, 50 + m)[rank]
        for b in range(k):  # the row at `at` of every rank's block (reduce_scatter: each block)
            x[b * m + at] = row[0]
        res = None
        if op.epilogue:
            res = all_inputs((m, hidden), dtype, 60 + m)[0]
            res[at] = res_row[0]
        seen.append((f"batch {m}", _call(op, x, slice(at, at + 1), res, w)))
        if m == 7:  # replayed in a CUDA graph too
            static = x.clone()
            graph = torch.cuda.CUDAGraph()
            _call(op, static, slice(at, at + 1), res, w)
            with torch.cuda.graph(graph):
                got = _call(op, static, slice(at, at + 1), res, w, timeout_ms=0)
            graph.replay()
            seen.append(("batch 7 replayed", got.clone()))
    torch.cuda.synchronize()
    holds = op.kind != "reduce" or rank == 0
    if holds:
        first_name, first = seen[0]
        for what, bits in seen[1:]:
            diff = int((bits != first).sum())
            assert diff == 0, (f"{name} {dtype} world={world} rank={rank}: {diff} bytes of the row differ between "
                               f"{first_name} and {what}")
    # every rank holding the row holds the same bits (allreduce: all of them)
    if op.kind == "allreduce":
        mine = seen[0][1].cpu()
        every = [None] * world
        dist.all_gather_object(every, mine)
        for r, bits in enumerate(every):
            assert torch.equal(bits, mine), f"{name} {dtype}: rank {r}'s row differs from rank {rank}'s"


GEMM_DETERMINISTIC = ["gemm_rs_bf16_det", "gemm_rs_bf16_det_decomposed", "gemm_rs_bf16_fused"]


@pytest.mark.parametrize("name", GEMM_DETERMINISTIC)
def test_a_gemm_rs_rows_bits_do_not_depend_on_how_many_rows_share_the_call(dist_env, name):
    """C = reduce_scatter(A @ B): a row of C from the same rows of A, computed with 1, 7 and 4096 rows
    per rank (other copy-engine splits, size choices and cuBLASLt shapes; the decomposed chunk GEMMs'
    other shapes; the fused kernel's other tile counts), eager and replayed in a CUDA graph: the same
    bits; and within a bf16 rounding or two of the float64 product."""
    rank, world = dist_env
    op = getattr(generated, name)
    n, k = op.n, op.k
    dtype = torch.bfloat16
    bs = all_inputs((k, n) if op.b_layout == "kn" else (n, k), dtype, 4545)
    a_rows = all_inputs((1, k), dtype, 4646)
    seen = []
    for m, at in ((1, 0), (7, 3), (min(4096, op.max_rows()), 1234)):
        a = all_inputs((world * m, k), dtype, 70 + m)[rank]
        for blk in range(world):  # the row at `at` of every rank's block: every rank's C row `at` is one sum
            a[blk * m + at] = a_rows[rank][0]
        seen.append((f"m {m}", op(a, bs[rank], timeout_ms=TIMEOUT_MS)[at:at + 1].clone()))
        if m == 7:
            op(a, bs[rank])  # (eager first: a graph cannot hold the first call's allocations)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = op(a, bs[rank], timeout_ms=0)
            graph.replay()
            seen.append(("m 7 replayed", got[at:at + 1].clone()))
    torch.cuda.synchronize()
    want = sum(a_rows[r].double() @ (bs[r].double() if op.b_layout == "kn" else bs[r].double().t())
               for r in range(world))
    _assert_close(seen[0][1], want, dtype, f"{name} world={world} rank={rank}")
    first_name, first = seen[0]
    for what, row in seen[1:]:
        diff = int((row.view(torch.uint8) != first.view(torch.uint8)).sum())
        assert diff == 0, (f"{name} world={world} rank={rank}: {diff} bytes of the row differ between {first_name} "
                           f"and {what}")
