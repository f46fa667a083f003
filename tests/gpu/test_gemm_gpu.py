"""AllGather+GEMM and GEMM+ReduceScatter, decomposed and fused (CUTLASS) overlap, against the gathered
matmul / matmul then reduce-scatter, bf16/f16 with fp32 accumulation."""
import pytest
import torch
import torch.distributed as dist

import generated


def _inputs(shape, dtype, seed):
    out = []
    for r in range(dist.get_world_size()):
        g = torch.Generator(device="cuda").manual_seed(seed + r)
        out.append(torch.randn(shape, device="cuda", generator=g).to(dtype))
    return out


def _rel_err(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", ["ag_gemm_bf16", "ag_gemm_bf16_fused"])
@pytest.mark.parametrize("rows", [1, 17, 1000, 4096])
def test_ag_gemm_bf16_matches_gathered_matmul(dist_env, rows, name):
    rank, world = dist_env
    op = getattr(generated, name)
    a = _inputs((rows, 8192), torch.bfloat16, 31 * rows)
    g = torch.Generator(device="cuda").manual_seed(7 + rank)
    b = (torch.randn((8192, 4096), device="cuda", generator=g) / 64).to(torch.bfloat16)
    c = op(a[rank], b)
    ref = torch.cat(a).float() @ b.float()
    torch.cuda.synchronize()
    assert c.shape == (world * rows, 4096)
    assert _rel_err(c, ref) < 1e-2
    if dist.get_backend() == "nccl":  # the NCCL + cuBLAS pipeline it replaces
        full = torch.empty((world * rows, 8192), dtype=torch.bfloat16, device="cuda")
        dist.all_gather_into_tensor(full, a[rank])
        assert _rel_err(c, (full @ b).float()) < 1e-2


@pytest.mark.parametrize("rows", [1, 3, 777, 2048])
def test_ag_gemm_f16_weight_layout_odd_sizes_ring_barrier(dist_env, rows):
    rank, world = dist_env
    op = generated.ag_gemm_f16_nk
    a = _inputs((rows, 1000), torch.float16, 5 * rows)
    w = (torch.randn((999, 1000), device="cuda") / 32).half()  # a Linear weight: [out, in]
    c = torch.full((world * rows, 999), float("nan"), dtype=torch.float16, device="cuda")
    op(a[rank], w, c)
    ref = torch.cat(a).float() @ w.float().t()
    torch.cuda.synchronize()
    assert _rel_err(c, ref) < 1e-2


@pytest.mark.parametrize("name", ["ag_gemm_bf16", "ag_gemm_bf16_fused"])
def test_ag_gemm_back_to_back_and_side_stream(dist_env, name):
    rank, world = dist_env
    op = getattr(generated, name)
    b = (torch.randn((8192, 4096), device="cuda") / 64).to(torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    results, refs = [], []
    with torch.cuda.stream(s):
        for i in range(6):
            a = _inputs((256, 8192), torch.bfloat16, 900 + i)
            results.append(op(a[rank], b))
            refs.append(torch.cat(a).float() @ b.float())
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for c, ref in zip(results, refs):
        assert _rel_err(c, ref) < 1e-2


@pytest.mark.parametrize("name", ["ag_gemm_bf16", "ag_gemm_bf16_fused"])
def test_ag_gemm_bad_arguments(dist_env, name):
    rank, world = dist_env
    op = getattr(generated, name)
    a = torch.zeros((8, 8192), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"b must be \[8192, 4096\]"):
        op(a, torch.zeros((4096, 8192), dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="a must have dtype bfloat16"):
        op(a.float(), torch.zeros((8192, 4096), dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="c must be a contiguous"):
        op(a, torch.zeros((8192, 4096), dtype=torch.bfloat16, device="cuda"), torch.zeros((3, 3), device="cuda"))
    dist.barrier()


@pytest.mark.parametrize("rows", [1, 5, 640, 4096])
def test_gemm_rs_bf16_matches_matmul_then_reduce_scatter(dist_env, rows):
    rank, world = dist_env
    op = generated.gemm_rs_bf16
    a = _inputs((world * rows, 4096), torch.bfloat16, 13 * rows)
    bs = [(x / 64) for x in _inputs((4096, 8192), torch.bfloat16, 99)]
    c = torch.full((rows, 8192), float("nan"), dtype=torch.bfloat16, device="cuda")
    op(a[rank], bs[rank], c)
    ref = sum((a[s].float() @ bs[s].float())[rank * rows:(rank + 1) * rows] for s in range(world))
    torch.cuda.synchronize()
    assert _rel_err(c, ref) < 1e-2
    if dist.get_backend() == "nccl":
        y = torch.empty((rows, 8192), dtype=torch.bfloat16, device="cuda")
        dist.reduce_scatter_tensor(y, a[rank] @ bs[rank])
        assert _rel_err(c, y.float()) < 1e-2


def test_gemm_rs_repeated_with_changing_sizes(dist_env):
    rank, world = dist_env
    op = generated.gemm_rs_bf16
    outs, refs = [], []
    for i, rows in enumerate([8, 256, 8, 1, 256]):
        a = _inputs((world * rows, 4096), torch.bfloat16, 300 + i)
        bs = [(x / 64) for x in _inputs((4096, 8192), torch.bfloat16, 400 + i)]
        outs.append(op(a[rank], bs[rank]))
        refs.append(sum((a[s].float() @ bs[s].float())[rank * rows:(rank + 1) * rows] for s in range(world)))
    torch.cuda.synchronize()
    for c, ref in zip(outs, refs):
        assert _rel_err(c, ref) < 1e-2


def _rs_reference(a, ws, rank, rows, world):
    return sum((a[s].float() @ ws[s].float().t())[rank * rows:(rank + 1) * rows] for s in range(world))


@pytest.mark.parametrize("rows", [1, 5, 200, 640, 4096])
def test_fused_gemm_rs_matches_matmul_then_reduce_scatter(dist_env, rows):
    """Rows that are not a multiple of the 128-row GEMM tile make blocks straddle two ranks' chunks."""
    rank, world = dist_env
    op = generated.gemm_rs_bf16_fused
    assert op.fused
    a = _inputs((world * rows, 4096), torch.bfloat16, 17 * rows)
    ws = [(x / 64) for x in _inputs((8192, 4096), torch.bfloat16, 77)]  # Linear weights [n, k]
    c = torch.full((rows, 8192), float("nan"), dtype=torch.bfloat16, device="cuda")
    op(a[rank], ws[rank], c)
    ref = _rs_reference(a, ws, rank, rows, world)
    torch.cuda.synchronize()
    assert _rel_err(c, ref) < 1e-2
    if dist.get_backend() == "nccl":
        y = torch.empty((rows, 8192), dtype=torch.bfloat16, device="cuda")
        dist.reduce_scatter_tensor(y, a[rank] @ ws[rank].t())
        assert _rel_err(c, y.float()) < 1e-2


def test_fused_gemm_rs_back_to_back_with_changing_sizes(dist_env):
    """No host sync between calls; the per-part tile counters reset themselves across sizes."""
    rank, world = dist_env
    op = generated.gemm_rs_bf16_fused
    outs, refs = [], []
    for i, rows in enumerate([128, 8, 300, 1, 128, 1024]):
        a = _inputs((world * rows, 4096), torch.bfloat16, 500 + i)
        ws = [(x / 64) for x in _inputs((8192, 4096), torch.bfloat16, 600 + i)]
        outs.append(op(a[rank], ws[rank]))
        refs.append(_rs_reference(a, ws, rank, rows, world))
    torch.cuda.synchronize()
    for c, ref in zip(outs, refs):
        assert _rel_err(c, ref) < 1e-2


def test_fused_gemm_bad_arguments(dist_env):
    rank, world = dist_env
    op = generated.gemm_rs_bf16_fused
    a = torch.zeros((world * 8, 4096), dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"b must be \[8192, 4096\]"):
        op(a, torch.zeros((4096, 8192), dtype=torch.bfloat16, device="cuda"))
    mod = op.load()
    with pytest.raises(Exception, match="a must be a contiguous 2-d bf16 CUDA tensor"):
        mod.fused_gemm(a.float(), torch.zeros((8192, 4096), dtype=torch.bfloat16, device="cuda"), a, 0, -1, 0)
    dist.barrier()


@pytest.mark.parametrize("fused", [False, True])
def test_tensor_parallel_mlp_example_matches_single_gpu(dist_env, fused):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "examples" / "tp_mlp.py"
    spec = importlib.util.spec_from_file_location("tp_mlp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rank, world = dist_env
    err = mod.check_against_single_gpu(tokens_per_rank=512, seed=3, fused=fused)
    assert err < 2e-2, err
