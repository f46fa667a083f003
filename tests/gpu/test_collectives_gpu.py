"""reduce_scatter, allreduce, all_to_all and broadcast ops against references on real GPUs.

Every rank makes every rank's input from per-rank seeds, so the reference is computed locally
(reductions in float64, held to the rules of _refs.assert_reduction, which also compares with
torch.distributed's NCCL collective where each rank has its own GPU)."""
import pytest
import torch
import torch.distributed as dist

import generated

from ._refs import assert_reduction


def _inputs(shape, dtype, seed):
    out = []
    for r in range(dist.get_world_size()):
        g = torch.Generator(device="cuda").manual_seed(seed + r)
        x = torch.randn(shape, device="cuda", dtype=torch.float32, generator=g)
        out.append(x.to(dtype) if dtype.is_floating_point else (x * 1000).to(dtype))
    return out


def _nccl():
    return dist.get_backend() == "nccl"


def _reduce(xs, how):
    acc = xs[0].float()
    for x in xs[1:]:
        acc = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[how](acc, x.float())
    return acc


# rows of the shard: tiny, odd, across allreduce's one-shot/ring boundary, and the maximum
@pytest.mark.parametrize("rows", [1, 3, 17, 64, 255, 1024, 4096, 16384])
def test_allreduce_bf16_sum(dist_env, rows):
    rank, world = dist_env
    xs = _inputs((rows, 4096), torch.bfloat16, 11 * rows)
    out = generated.allreduce_bf16.empty_output(rows)
    out.fill_(float("nan"))
    generated.allreduce_bf16(xs[rank], out)
    y = None
    if _nccl():
        y = xs[rank].clone()
        dist.all_reduce(y)
    torch.cuda.synchronize()
    assert_reduction(out, xs, "sum", y, f"allreduce_bf16 rows={rows}")


@pytest.mark.parametrize("rows", [1, 2, 5, 333, 4096])
def test_allreduce_f32_max_bidir_ring_barrier(dist_env, rows):
    rank, world = dist_env
    xs = _inputs((rows, 999), torch.float32, 5 * rows)
    out = generated.allreduce_f32_max_ring.empty_output(rows)
    out.fill_(float("nan"))
    generated.allreduce_f32_max_ring(xs[rank], out)
    torch.cuda.synchronize()
    assert torch.equal(out, _reduce(xs, "max"))


@pytest.mark.parametrize("rows", [1, 7, 300, 4096, 16384])
def test_reduce_scatter_bf16_sum(dist_env, rows):
    rank, world = dist_env
    xs = _inputs((world * rows, 8192), torch.bfloat16, 3 * rows)
    out = generated.reduce_scatter_bf16.empty_output(rows)
    out.fill_(float("nan"))
    generated.reduce_scatter_bf16(xs[rank], out)
    y = None
    if _nccl():
        y = torch.empty_like(out)
        dist.reduce_scatter_tensor(y, xs[rank])
    torch.cuda.synchronize()
    assert_reduction(out, [x[rank * rows:(rank + 1) * rows] for x in xs], "sum", y, f"reduce_scatter_bf16 rows={rows}")


@pytest.mark.parametrize("rows", [1, 9, 2048])
def test_reduce_scatter_f16_min_through_nvshmem(dist_env, rows):
    rank, world = dist_env
    xs = _inputs((world * rows, 1000), torch.float16, 17 * rows)
    out = generated.reduce_scatter_f16_min_nvshmem.empty_output(rows)
    generated.reduce_scatter_f16_min_nvshmem(xs[rank], out)
    torch.cuda.synchronize()
    assert torch.equal(out, _reduce([x[rank * rows:(rank + 1) * rows] for x in xs], "min").half())


@pytest.mark.parametrize("rows", [1, 13, 1024, 8192])
def test_all_to_all_bf16(dist_env, rows):
    rank, world = dist_env
    xs = _inputs((world * rows, 4096), torch.bfloat16, 7 * rows)
    out = generated.all_to_all_bf16.empty_output(rows)
    out.fill_(float("nan"))
    generated.all_to_all_bf16(xs[rank], out)
    ref = torch.cat([x[rank * rows:(rank + 1) * rows] for x in xs])
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    if _nccl():
        y = torch.empty_like(out)
        dist.all_to_all_single(y, xs[rank])
        assert torch.equal(y.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("rows", [1, 77, 65536])
@pytest.mark.parametrize("root", [0, 1])
def test_broadcast_f32_any_root(dist_env, rows, root):
    rank, world = dist_env
    xs = _inputs((rows, 1000), torch.float32, 23 * rows)
    out = generated.broadcast_f32.empty_output(rows)
    out.fill_(float("nan"))
    generated.broadcast_f32(xs[rank] if rank == root else None, out, root=root)
    torch.cuda.synchronize()
    assert torch.equal(out, xs[root])


def test_allreduce_alternating_variants_reuses_scratch_safely(dist_env):
    """Back-to-back calls switching between the small-message and the large-message schedule."""
    rank, world = dist_env
    op = generated.allreduce_bf16
    outs, parts = [], []
    for i, rows in enumerate([2, 4096, 2, 4096, 64, 16384, 1] * 2):
        xs = _inputs((rows, 4096), torch.bfloat16, 1000 + i)
        out = torch.empty((rows, 4096), dtype=torch.bfloat16, device="cuda")
        res = op(xs[rank])  # into the op's cached symmetric output for this size
        out.copy_(res)  # consume before the next call of the same size overwrites it
        outs.append(out)
        parts.append(xs)
    torch.cuda.synchronize()
    for i, (out, xs) in enumerate(zip(outs, parts)):
        assert_reduction(out, xs, "sum", what=f"call {i}")


def test_bad_calls_name_the_argument(dist_env):
    rank, world = dist_env
    rs = generated.reduce_scatter_bf16
    with pytest.raises(ValueError, match="multiple of"):
        rs(torch.zeros((world * 4 + 1, 8192), dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match="root must be in"):
        generated.broadcast_f32(torch.zeros((4, 1000), device="cuda"), root=world)
    with pytest.raises(ValueError, match="root is only meaningful for rooted ops"):
        generated.allreduce_bf16(torch.zeros((4, 4096), dtype=torch.bfloat16, device="cuda"), root=1)
    x = generated.allreduce_bf16.empty_output(4)
    with pytest.raises(ValueError, match="input overlaps output"):
        generated.allreduce_bf16(x, x)
    dist.barrier()


def test_loading_a_build_for_another_nvshmem_fails_clearly(dist_env, tmp_path_factory):
    """A real built op whose build.json names another NVSHMEM version is refused before loading."""
    import json
    import shutil
    from pathlib import Path

    from tilegen.collective.runtime import CollectiveOp
    from tilegen.core.runtime import OpLoadError
    src = Path(generated.__file__).parent / "all_to_all_bf16"
    dst = tmp_path_factory.mktemp(f"rank{dist.get_rank()}") / "all_to_all_bf16"
    shutil.copytree(src, dst)
    info = json.loads((dst / "_build" / "build.json").read_text())
    info["nvshmem"] = "3.0.0"
    (dst / "_build" / "build.json").write_text(json.dumps(info))
    op = CollectiveOp(dst, "all_to_all_bf16", "all_to_all", "bfloat16", [{"name": "m", "max": 8192}, 4096], [2, 4, 8])
    with pytest.raises(OpLoadError, match=r"built against NVSHMEM 3\.0\.0 .*but this process runs NVSHMEM [\d.]+; "):
        op.load()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, hidden", [(1, 4096), (7, 1001), (300, 2880), (4096, 4096), (33, 8)])
def test_one_allreduce_library_serves_each_element_type_and_width(dist_env, dtype, rows, hidden):
    """allreduce_multi (dtypes: [bf16, f16, f32], hidden free up to 4096): each call runs its input's
    element type's kernel on the shared buffers at its own width; eager, then replayed in a CUDA graph."""
    rank, world = dist_env
    op = generated.allreduce_multi
    xs = _inputs((rows, hidden), dtype, 3 * rows + hidden)
    out = op(xs[rank])
    assert out.dtype == dtype and out.shape == (rows, hidden)
    torch.cuda.synchronize()
    assert_reduction(out, xs, "sum", None, f"allreduce_multi {dtype} [{rows}, {hidden}]")
    x = xs[rank].clone()
    out2 = op.empty_output(rows, dtype=dtype, inner=(hidden,))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(x, out2)
    ys = _inputs((rows, hidden), dtype, 3 * rows + hidden + 1)
    x.copy_(ys[rank])
    graph.replay()
    torch.cuda.synchronize()
    assert_reduction(out2, ys, "sum", None, f"allreduce_multi {dtype} [{rows}, {hidden}], replayed")
    with pytest.raises(ValueError, match=r"dim 1 must be in \[1, 4096\]"):
        op(torch.zeros((rows, 4097), dtype=dtype, device="cuda"))
