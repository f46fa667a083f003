"""torch-native ops (tilegen.core.torch_ops): registration, fake implementations (shapes per group,
bad input named), and torch.compile(fullgraph=True) tracing them into one graph. Runs on the CPU:
tensors are fake CUDA tensors (FakeTensorMode), so only the fakes run; tests/gpu runs the real ops."""
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from tilegen.collective.runtime import CollectiveOp  # noqa: E402
from tilegen.core import runtime  # noqa: E402
from tilegen.core.group import Group, Registry  # noqa: E402
from tilegen.overlap.runtime import AgGemmOp, GemmRsOp  # noqa: E402

NOWHERE = Path("/nonexistent")


@pytest.fixture
def job(monkeypatch):
    """Rank 2 of 4, TP groups [0, 1] and [2, 3] in slot 1."""
    reg = Registry(4)
    reg.add([(0, 1), (2, 3)])
    for key, value in (("initialised", True), ("rank", 2), ("world", 4), ("groups", reg)):
        monkeypatch.setitem(runtime._state, key, value)
    return Group((2, 3), 1, 0)


def _compiled(fn, *ops, fullgraph=True):
    """fn compiled with fullgraph=True (any graph break is an error) by a backend that keeps the graphs;
    `ops` registered first, as loading them does."""
    graphs = []
    for op in ops:
        op.torch  # noqa: B018

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=fullgraph, backend=backend), graphs


def _targets(graphs):
    return [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]


def test_collectives_trace_into_one_graph_with_their_groups_shapes(job):
    ag = CollectiveOp(NOWHERE, "tt_allgather", "allgather", "bfloat16", [{"name": "m", "max": 64}, 128], [2, 4])
    rs = CollectiveOp(NOWHERE, "tt_reduce_scatter", "reduce_scatter", "bfloat16", [{"name": "m", "max": 64}, 128],
                      [2, 4])
    ar = CollectiveOp(NOWHERE, "tt_allreduce", "allreduce", "bfloat16", [{"name": "m", "max": 64}, 128], [2, 4])
    tp = job

    def layer(x):
        g = ag.torch(x, group=tp)           # [2 * m, 128] in the TP group
        w = ag.torch(x)                     # [4 * m, 128] in the world
        s = rs.torch(g * 2, group=tp)       # [m, 128]
        return g, w, s, ar.torch(s + 1, group=tp) * 3

    fn, graphs = _compiled(layer, ag, rs, ar)
    with FakeTensorMode():
        x = torch.empty(8, 128, dtype=torch.bfloat16, device="cuda")
        g, w, s, o = fn(x)
    assert [list(t.shape) for t in (g, w, s, o)] == [[16, 128], [32, 128], [8, 128], [8, 128]]
    assert len(graphs) == 1
    called = _targets(graphs)
    for name in ("tilegen.tt_allgather.default", "tilegen.tt_reduce_scatter.default", "tilegen.tt_allreduce.default"):
        assert name in called


def test_out_forms_check_eagerly_and_are_refused_under_compile(job):
    ar = CollectiveOp(NOWHERE, "tt_allreduce_outs", "allreduce", "bfloat16", [{"name": "m", "max": 64}, 128], [2, 4])
    fn, _ = _compiled(lambda x, out: ar.torch.out(x, out, group=job), ar)
    with FakeTensorMode():
        x = torch.empty(8, 128, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(ValueError, match=r"out must be \[8, 128\], got \[4, 128\]"):
            ar.torch.out(x, torch.empty(4, 128, dtype=torch.bfloat16, device="cuda"), group=job)
        with pytest.raises(Exception, match="under torch.compile call the functional form"):
            fn(x, torch.empty(8, 128, dtype=torch.bfloat16, device="cuda"))


def test_gemm_ops_trace_with_their_groups_n_and_k(job):
    nk = {2: (256, 128), 4: (128, 128)}
    agm = AgGemmOp(NOWHERE, "tt_ag_gemm", "ag_gemm", "bfloat16", [{"name": "m", "max": 64}, 128], [2, 4],
                   gemm_nk=nk, b_layout="kn")
    rsm = GemmRsOp(NOWHERE, "tt_gemm_rs", "gemm_rs", "bfloat16", [{"name": "m", "max": 64}, 128], [2, 4],
                   gemm_nk=nk, b_layout="kn")

    def mlp(x, w1, w2):
        h = agm.torch(x, w1, group=job)          # [2 * m, 256]
        return rsm.torch(h[:, :128].contiguous(), w2, group=job)  # [m, 256]

    fn, graphs = _compiled(mlp, agm, rsm)
    with FakeTensorMode():
        x = torch.empty(4, 128, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(128, 256, dtype=torch.bfloat16, device="cuda")
        y = fn(x, w, w)
    assert list(y.shape) == [4, 256] and len(graphs) == 1
    assert {"tilegen.tt_ag_gemm.default", "tilegen.tt_gemm_rs.default"} <= set(_targets(graphs))


@pytest.mark.parametrize("make, needle", [
    (lambda: torch.empty(8, 128, dtype=torch.float16, device="cuda"), "input must have dtype torch.bfloat16"),
    (lambda: torch.empty(8, 128, dtype=torch.bfloat16, device="cpu"), "input must be a CUDA tensor"),
    (lambda: torch.empty(8, 64, dtype=torch.bfloat16, device="cuda"), r"input must be \[rows, 128\]"),
    (lambda: torch.empty(65, 128, dtype=torch.bfloat16, device="cuda"), r"input dim 0 must be m in \[1, 64\]"),
])
def test_bad_input_is_a_value_error_naming_the_argument_eager_and_compiled(job, make, needle):
    ag = CollectiveOp(NOWHERE, "tt_allgather_bad", "allgather", "bfloat16", [{"name": "m", "max": 64}, 128], [2, 4])
    fn, _ = _compiled(lambda x: ag.torch(x, group=job), ag, fullgraph=False)
    whole, _ = _compiled(lambda x: ag.torch(x, group=job), ag)
    with FakeTensorMode():
        x = make()
        with pytest.raises(ValueError, match=needle):
            ag.torch(x, group=job)
        with pytest.raises(ValueError, match=needle):
            fn(x)
        with pytest.raises(Exception, match=needle):  # fullgraph: torch.compile reports the ValueError
            whole(x)


def test_registering_while_compiling_says_to_load_first(job):
    ar = CollectiveOp(NOWHERE, "tt_allreduce_late", "allreduce", "bfloat16", [{"name": "m", "max": 64}, 128], [4])
    fn, _ = _compiled(lambda x: ar.torch(x))
    with FakeTensorMode():
        x = torch.empty(8, 128, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(Exception, match="load it .* before torch.compile traces a call"):
            fn(x)


def test_a_wrong_group_is_refused_before_tracing_the_op(job):
    ar = CollectiveOp(NOWHERE, "tt_allreduce_grp", "allreduce", "bfloat16", [{"name": "m", "max": 64}, 128], [4])
    with FakeTensorMode():
        x = torch.empty(8, 128, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(ValueError, match="group must be a tilegen group"):
            ar.torch(x, group=[2, 3])
        with pytest.raises(ValueError, match="group slot 5 does not exist"):
            ar.torch.functional(x, 5)


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_moe_dispatch_and_combine_trace_into_one_graph(job, mode):
    from tilegen.moe.runtime import MoeOp

    op = MoeOp(NOWHERE, f"tt_moe_{mode}", "moe", "bfloat16", [{"name": "tokens", "max": 32}, 256], [2, 4],
               experts=8, topk=2, mode=mode)

    def layer(x, idx, w):
        recv, counts, h = op.torch.dispatch(x, idx, w, group=job)
        return op.torch.combine(recv * 2, h), counts

    fn, graphs = _compiled(layer, op)
    # normal mode's sizes are data: torch.compile keeps such ops in the graph when told to
    # (the graph then runs on these fake tensors: a shape environment gives them the data's sizes)
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        x = torch.empty(16, 256, dtype=torch.bfloat16, device="cuda")
        idx = torch.empty(16, 2, dtype=torch.int64, device="cuda")
        w = torch.empty(16, 2, dtype=torch.float32, device="cuda")
        out, counts = fn(x, idx, w)
        assert list(out.shape) == [16, 256]
        assert list(counts.shape) == ([4] if mode == "normal" else [4, 2])  # 8 experts over the TP group of 2
        with pytest.raises(ValueError, match=r"topk_weights must be float32 \[16, 2\]"):
            op.torch.dispatch(x, idx, w.double(), group=job)
    assert len(graphs) == 1
    names = {f"tilegen.tt_moe_{mode}_dispatch.default", f"tilegen.tt_moe_{mode}_combine.default"}
    assert names <= set(_targets(graphs))


def test_an_op_of_several_element_types_takes_each(job):
    ar = CollectiveOp(NOWHERE, "tt_allreduce_any", "allreduce", "bfloat16", [{"name": "m", "max": 64}, 128], [2, 4],
                      dtypes=["bfloat16", "float16", "float32"])
    fn, graphs = _compiled(lambda x, y: (ar.torch(x, group=job), ar.torch(y, group=job)), ar)
    with FakeTensorMode():
        h = torch.empty(8, 128, dtype=torch.float16, device="cuda")
        f = torch.empty(8, 128, dtype=torch.float32, device="cuda")
        a, b = fn(h, f)
        assert (a.dtype, b.dtype) == (torch.float16, torch.float32)
        with pytest.raises(ValueError, match="must have dtype torch.bfloat16 or torch.float16 or torch.float32"):
            ar.torch(torch.empty(8, 128, dtype=torch.int32, device="cuda"))


def test_free_inner_dims_take_the_inputs_width(job):
    ar = CollectiveOp(NOWHERE, "tt_allreduce_wide", "allreduce", "bfloat16",
                      [{"name": "m", "max": 64}, {"name": "hidden", "max": 128}], [2, 4])
    fn, _ = _compiled(lambda x: ar.torch(x, group=job), ar)
    with FakeTensorMode():
        assert list(fn(torch.empty(8, 40, dtype=torch.bfloat16, device="cuda")).shape) == [8, 40]
        with pytest.raises(ValueError, match=r"input must be \[rows, <=128\], got \[8, 129\]"):
            ar.torch(torch.empty(8, 129, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(ValueError, match=r"inner dims must be \[<=128\], got \[0\]"):
        ar._inner((0,))


def test_loading_without_torch_registers_nothing(job, monkeypatch):
    import sys

    ar = CollectiveOp(NOWHERE, "tt_allreduce_notorch", "allreduce", "bfloat16", [{"name": "m", "max": 64}, 128], [4])
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)  # import torch raises ImportError
        ar._register_torch_ops()
        assert ar._torch_op is None
    ar._register_torch_ops()
    assert ar._torch_op is not None and ar.torch.functional is torch.ops.tilegen.tt_allreduce_notorch.default


def test_epilogue_ops_trace_with_their_residual_updated_in_place(job):
    """allreduce + residual + RMSNorm (and the fp8 form) inside a compiled decoder step: one graph, the
    residual declared mutated, shapes and fp8 outputs from the fakes; bad operands named."""
    epi = {"residual": True, "rmsnorm": 1e-5, "quant": None}
    ar = CollectiveOp(NOWHERE, "tt_ar_norm", "allreduce", "bfloat16",
                      [{"name": "m", "max": 64}, {"name": "hidden", "max": 256}], [2, 4], epilogue=epi)
    q8 = CollectiveOp(NOWHERE, "tt_ar_norm_fp8", "allreduce", "bfloat16", [{"name": "m", "max": 64}, 256], [2, 4],
                      epilogue={**epi, "quant": "fp8_e4m3"})
    rs = CollectiveOp(NOWHERE, "tt_rs_norm", "reduce_scatter", "bfloat16", [{"name": "m", "max": 64}, 256], [2, 4],
                      epilogue=epi)

    def step(x, res, w):
        y = ar.torch(x * 2, residual=res, weight=w, group=job)
        q, s = q8.torch(y, residual=res, weight=w)
        return y, q, s, rs.torch(x.repeat(2, 1), residual=res, weight=w, group=job)

    fn, graphs = _compiled(step, ar, q8, rs)
    with FakeTensorMode():
        x = torch.empty(8, 256, dtype=torch.bfloat16, device="cuda")
        res, w = torch.empty_like(x), torch.empty(256, dtype=torch.bfloat16, device="cuda")
        y, q, s, z = fn(x, res, w)
        assert (y.shape, y.dtype, q.dtype, s.shape, s.dtype, z.shape) == (
            (8, 256), torch.bfloat16, torch.float8_e4m3fn, (8,), torch.float32, (8, 256))
        with pytest.raises(ValueError, match=r"tt_ar_norm: weight must be a CUDA \[256\] torch.bfloat16 tensor"):
            ar.torch(x, residual=res, weight=w[:128])
        with pytest.raises(ValueError, match="tt_ar_norm: residual must have 8 rows"):
            ar.torch(x, residual=res[:4], weight=w)
        with pytest.raises(ValueError, match="tt_ar_norm: weight= is required"):
            ar.torch(x, residual=res)
    assert len(graphs) == 1
    called = _targets(graphs)
    assert {"tilegen.tt_ar_norm.default", "tilegen.tt_ar_norm_fp8.default", "tilegen.tt_rs_norm.default"} <= set(
        called), called
    schema = str(torch.ops.tilegen.tt_ar_norm.default._schema)
    assert "Tensor(a!) residual" in schema and schema.endswith("-> Tensor")
