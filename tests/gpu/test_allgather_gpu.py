"""Generated allgather ops against torch.distributed.all_gather_into_tensor on real GPUs."""
import pytest
import torch
import torch.distributed as dist



def _ops():
    from generated import allgather_bf16, allgather_f16_nvshmem
    return allgather_bf16, allgather_f16_nvshmem


def _random(shape, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, device="cuda", dtype=torch.float32, generator=g).to(dtype)


def _inputs(shape, dtype, seed):
    """Every rank's input, made locally from per-rank seeds (rank r uses seed + r)."""
    return [_random(shape, dtype, seed + r) for r in range(dist.get_world_size())]


def _reference(inputs):
    """The expected gather: concatenation in rank order; also NCCL's answer where NCCL can run."""
    ref = torch.cat(inputs)
    if dist.get_backend() == "nccl":
        x = inputs[dist.get_rank()]
        out = torch.empty_like(ref)
        dist.all_gather_into_tensor(out, x)
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), "NCCL disagrees with the concatenation"
    return ref


# rows per rank: 1 row, odd counts, the spec's max for the f16 op, and 32768 x 8192 bf16 = 512 MiB per rank
BF16_ROWS = [1, 3, 64, 1000, 4096, 32768]
F16_ROWS = [1, 7, 333, 4096]


@pytest.mark.parametrize("rows", BF16_ROWS)
def test_allgather_bf16_matches_nccl_bitwise(dist_env, rows):
    rank, world = dist_env
    op, _ = _ops()
    xs = _inputs((rows, 8192), torch.bfloat16, seed=1000 * rows)
    out = op.empty_output(rows)
    out.fill_(float("nan"))  # poison: every element must be written
    op(xs[rank], out)
    ref = _reference(xs)
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), f"rank {rank}: mismatch at rows={rows}"


@pytest.mark.parametrize("rows", F16_ROWS)
def test_allgather_f16_nvshmem_odd_rows_match_nccl(dist_env, rows):
    rank, world = dist_env
    _, op = _ops()
    xs = _inputs((rows, 1001), torch.float16, seed=77 * rows)
    out = op.empty_output(rows)
    out.fill_(float("nan"))
    op(xs[rank], out)
    ref = _reference(xs)
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_repeated_calls_with_changing_sizes_and_data(dist_env):
    """Epochs advance per call; consecutive calls of different sizes must not see stale signals."""
    rank, world = dist_env
    op, _ = _ops()
    for i, rows in enumerate([5, 2048, 5, 17, 2048, 1] * 3):
        xs = _inputs((rows, 8192), torch.bfloat16, seed=i * 31)
        out = op.empty_output(rows)
        op(xs[rank], out)
        ref = _reference(xs)
        # overwrite the input right after the call, on the same stream: stream order must protect it
        xs[rank].fill_(0)
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), f"iteration {i} rows {rows}"


def test_back_to_back_calls_without_host_sync(dist_env):
    """Many calls queued on one stream reuse the same output: the entry barrier must order them."""
    rank, world = dist_env
    op, _ = _ops()
    rows = 512
    batches = [_inputs((rows, 8192), torch.bfloat16, seed=500 + 10 * k) for k in range(8)]
    out = op.empty_output(rows)
    acc = torch.zeros((world * rows, 8192), dtype=torch.float32, device="cuda")
    for xs in batches:
        op(xs[rank], out)
        acc += out.float()  # consumes out before the next call overwrites it
    ref = torch.zeros_like(acc)
    for xs in batches:
        ref += _reference(xs).float()
    torch.cuda.synchronize()
    assert torch.equal(acc, ref)


def test_side_stream(dist_env):
    rank, world = dist_env
    op, _ = _ops()
    s = torch.cuda.Stream()
    xs = _inputs((99, 8192), torch.bfloat16, seed=9)
    out = op.empty_output(99)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(xs[rank], out)
    torch.cuda.current_stream().wait_stream(s)
    ref = _reference(xs)
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_default_output_is_allocated_symmetric(dist_env):
    rank, world = dist_env
    op, _ = _ops()
    xs = _inputs((10, 8192), torch.bfloat16, seed=3)
    out = op(xs[rank])
    assert out.shape == (world * 10, 8192)
    ref = _reference(xs)
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("case", ["dtype", "inner", "rows_max", "device", "not_symmetric", "noncontig", "out_shape"])
def test_bad_arguments_raise_value_error_before_launch(dist_env, case):
    rank, world = dist_env
    op, _ = _ops()
    good = _random((8, 8192), torch.bfloat16, seed=1)
    out = op.empty_output(8)
    sentinel = torch.full_like(out, 7.0)
    out.copy_(sentinel)
    expect = {
        "dtype": "dtype bf16", "inner": "dim 1 must be 8192", "rows_max": "dim 0 must be m in [1, 65536]",
        "device": "CUDA tensor", "not_symmetric": "symmetric heap", "noncontig": "contiguous",
        "out_shape": "dim 0 must be",
    }[case]
    args = {
        "dtype": (good.float(), out), "inner": (_random((8, 4096), torch.bfloat16, 1), out),
        "rows_max": (torch.empty((65537, 8192), dtype=torch.bfloat16, device="cuda"), out),
        "device": (good.cpu(), out), "not_symmetric": (good, torch.empty_like(out)),
        "noncontig": (_random((8192, 16), torch.bfloat16, 1).t(), out),
        "out_shape": (good, op.empty_output(16)),
    }[case]
    with pytest.raises(ValueError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        op(*args)
    torch.cuda.synchronize()
    assert torch.equal(out, sentinel), "a rejected call must not touch the output"
    dist.barrier()

