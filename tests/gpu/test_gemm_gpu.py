"""AllGather+GEMM and GEMM+ReduceScatter, copy-engine, decomposed and fused (CUTLASS) overlap, against the gathered
matmul / matmul then reduce-scatter, bf16/f16 with fp32 accumulation, at whatever world size runs:
the example specs give the layer's whole n (ag_gemm) or k (gemm_rs), each rank holding its share."""
import pytest
import torch
import torch.distributed as dist

import generated

from ._refs import as_kn, gemm_operands, gemm_reference, rel_err


@pytest.mark.parametrize("name", ["ag_gemm_bf16", "ag_gemm_bf16_ce", "ag_gemm_bf16_fused"])
@pytest.mark.parametrize("rows", [1, 17, 1000, 4096])
def test_ag_gemm_bf16_matches_gathered_matmul(dist_env, rows, name):
    rank, world = dist_env
    op = getattr(generated, name)
    a, bs = gemm_operands(op, rows, 31 * rows)
    c = op(a[rank], bs[rank])
    ref = gemm_reference(op, a, bs, rows)
    torch.cuda.synchronize()
    assert c.shape == (world * rows, op.n) and op.n == 8192 // world
    assert rel_err(c, ref) < 1e-2
    if dist.get_backend() == "nccl":  # the NCCL + cuBLAS pipeline it replaces
        full = torch.empty((world * rows, op.k), dtype=torch.bfloat16, device="cuda")
        dist.all_gather_into_tensor(full, a[rank])
        assert rel_err(c, full @ as_kn(bs[rank], op.b_layout)) < 1e-2


@pytest.mark.parametrize("rows", [1, 3, 777, 2048])
def test_ag_gemm_f16_weight_layout_odd_sizes_ring_barrier(dist_env, rows):
    rank, world = dist_env
    op = generated.ag_gemm_f16_nk
    assert (op.n, op.k) == (999, 1000)  # a per-rank n: the same at every world size
    a, ws = gemm_operands(op, rows, 5 * rows)  # ws: Linear weights [out, in]
    c = torch.full((world * rows, 999), float("nan"), dtype=torch.float16, device="cuda")
    op(a[rank], ws[rank], c)
    ref = gemm_reference(op, a, ws, rows)
    torch.cuda.synchronize()
    assert rel_err(c, ref) < 1e-2


@pytest.mark.parametrize("name", ["ag_gemm_bf16", "ag_gemm_bf16_ce", "ag_gemm_bf16_fused"])
def test_ag_gemm_back_to_back_and_side_stream(dist_env, name):
    rank, world = dist_env
    op = getattr(generated, name)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    results, refs = [], []
    with torch.cuda.stream(s):
        for i in range(6):
            a, bs = gemm_operands(op, 256, 900 + i)
            results.append(op(a[rank], bs[rank]))
            refs.append(gemm_reference(op, a, bs, 256))
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for c, ref in zip(results, refs):
        assert rel_err(c, ref) < 1e-2


@pytest.mark.parametrize("name", ["ag_gemm_bf16", "ag_gemm_bf16_ce", "ag_gemm_bf16_fused"])
def test_ag_gemm_bad_arguments(dist_env, name):
    rank, world = dist_env
    op = getattr(generated, name)
    n, k = op.n, op.k
    a = torch.zeros((8, k), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=rf"b must be \[{k}, {n}\]"):
        op(a, torch.zeros((n, k), dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="a must have dtype bfloat16"):
        op(a.float(), torch.zeros((k, n), dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="c must be a contiguous"):
        op(a, torch.zeros((k, n), dtype=torch.bfloat16, device="cuda"), torch.zeros((3, 3), device="cuda"))
    dist.barrier()


@pytest.mark.parametrize("name", ["gemm_rs_bf16", "gemm_rs_bf16_ce", "gemm_rs_bf16_fused"])
@pytest.mark.parametrize("rows", [1, 5, 200, 640, 4096])
def test_gemm_rs_matches_matmul_then_reduce_scatter(dist_env, rows, name):
    """Rows that are not a multiple of the 128-row GEMM tile make blocks straddle two ranks' chunks."""
    rank, world = dist_env
    op = getattr(generated, name)
    a, bs = gemm_operands(op, rows, 13 * rows)
    assert op.k == 8192 // world
    c = torch.full((rows, op.n), float("nan"), dtype=torch.bfloat16, device="cuda")
    op(a[rank], bs[rank], c)
    ref = gemm_reference(op, a, bs, rows)
    torch.cuda.synchronize()
    assert rel_err(c, ref) < 1e-2
    if dist.get_backend() == "nccl":
        y = torch.empty((rows, op.n), dtype=torch.bfloat16, device="cuda")
        dist.reduce_scatter_tensor(y, a[rank] @ as_kn(bs[rank], op.b_layout))
        assert rel_err(c, y) < 1e-2


@pytest.mark.parametrize("name", ["gemm_rs_bf16", "gemm_rs_bf16_ce", "gemm_rs_bf16_fused"])
def test_gemm_rs_back_to_back_with_changing_sizes(dist_env, name):
    """No host sync between calls; the fused op's per-part tile counters reset themselves across sizes."""
    rank, world = dist_env
    op = getattr(generated, name)
    outs, refs = [], []
    for i, rows in enumerate([128, 8, 300, 1, 128, 1024]):
        a, bs = gemm_operands(op, rows, 500 + i)
        outs.append(op(a[rank], bs[rank]))
        refs.append(gemm_reference(op, a, bs, rows))
    torch.cuda.synchronize()
    for c, ref in zip(outs, refs):
        assert rel_err(c, ref) < 1e-2


@pytest.mark.parametrize("name, style", [("ag_gemm_bf16_ce", "chunks"), ("ag_gemm_bf16_ce", "merged"),
                                         ("ag_gemm_bf16_ce", "merged_spread"), ("gemm_rs_bf16_ce", "direct"),
                                         ("gemm_rs_bf16_ce", "ring")])
@pytest.mark.parametrize("executor, splits", [("library", "1"), ("library", "3"), ("python", "2")])
def test_copy_engine_executors(dist_env, name, style, executor, splits, monkeypatch):
    """The op library's executor (cuBLASLt, one call) and the Python one (torch's GEMMs, step by
    step) run the same program: both match the reference, in every style (whatever the measured
    choice for these sizes is), at 1 to 3 splits and odd row counts."""
    monkeypatch.setenv("TILEGEN_CE_EXECUTOR", executor)
    monkeypatch.setenv("TILEGEN_CE_SPLITS", splits)
    monkeypatch.setenv("TILEGEN_CE_STYLE", style)
    rank, world = dist_env
    op = getattr(generated, name)
    for i, rows in enumerate([1, 2, 129, 640]):
        a, bs = gemm_operands(op, rows, 70 + i)
        c = op(a[rank], bs[rank])
        ref = gemm_reference(op, a, bs, rows)
        torch.cuda.synchronize()
        assert rel_err(c, ref) < 1e-2, (executor, splits, rows)


def test_fused_gemm_bad_arguments(dist_env):
    rank, world = dist_env
    op = generated.gemm_rs_bf16_fused
    n, k = op.n, op.k
    a = torch.zeros((world * 8, k), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=rf"b must be \[{n}, {k}\]"):
        op(a, torch.zeros((k, n), dtype=torch.bfloat16, device="cuda"))
    mod = op.load()
    with pytest.raises(Exception, match="a must be a contiguous 2-d bf16 CUDA tensor"):
        mod.fused_gemm(a.float(), torch.zeros((n, k), dtype=torch.bfloat16, device="cuda"), a, 0, -1, 0)
    dist.barrier()


@pytest.mark.parametrize("name, rows", [("llama3_8b_down", 1024), ("llama3_8b_down", 2048),
                                        ("llama3_8b_gate_up_fused", 2048)])
def test_llama_shapes_that_hung_or_refused(dist_env, name, rows):
    """Regressions: gemm_rs at Llama-3-8B down-projection shapes (k 7168 per rank at TP 2, n 4096)
    hung at 1024 and 2048 rows (its 264 spinning CTAs held every SM the GEMMs needed); a fused ag_gemm
    spec without ctas failed at 2048 rows ("GEMM CTAs -132"). Three calls each, bounded waits."""
    rank, world = dist_env
    op = getattr(generated, name)
    assert op.manifest["spec"]["ctas"] == "auto"
    for i in range(3):
        a, bs = gemm_operands(op, rows, 70 + i)
        c = op(a[rank], bs[rank], timeout_ms=20000)
        ref = gemm_reference(op, a, bs, rows)
        torch.cuda.synchronize()
        assert rel_err(c, ref) < 1e-2, f"{name} rows={rows} call {i}"
    dist.barrier()
