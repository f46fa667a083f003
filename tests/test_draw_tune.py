"""Plan drawings and the tuner's candidate specs and fit (the GPU timing itself runs under torchrun)."""
import xml.etree.ElementTree as ET

import pytest

from tilegen import cli
from tilegen.draw import timeline
from tilegen.collective.ops import make_schedule
from tilegen.core.spec import DynamicDim, KernelSpec
from tilegen.tune import candidate_specs, fit, schedule_features


def ar_spec(**kw):
    base = dict(
        name="ar",
        op="allreduce",
        dtype="bf16",
        world_sizes=[2, 4],
        shape=[DynamicDim(name="m", max=1024), 4096],
        ctas="auto",
        tile_bytes="auto",
    )
    base.update(kw)
    return KernelSpec(**base)


def test_plan_svg_is_a_drawing_of_every_rank(root, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plotting is the [plot] extra")
    out = tmp_path / "plan.svg"
    assert cli.main(["plan", str(root / "specs/allreduce_bf16.yaml"), "--world", "4", "--svg", str(out)]) == 0
    svg = out.read_text()
    ET.fromstring(svg)  # well-formed
    again = tmp_path / "again.svg"
    assert cli.main(["plan", str(root / "specs/allreduce_bf16.yaml"), "--world", "4", "--svg", str(again)]) == 0
    assert again.read_text() == svg and "<dc:date>" not in svg  # reproducible: no timestamp, fixed ids
    for r in range(4):
        assert f"rank {r}" in svg
    png = tmp_path / "plan.png"
    assert (
        cli.main(["plan", str(root / "specs/broadcast_f32.yaml"), "--world", "2", "--svg", str(png), "--bytes", "4096"])
        == 0
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_orders_dependent_steps():
    s = make_schedule("reduce_scatter", "ring", 4, "per_tile")
    rows = timeline(s, 4 * 1 << 20, 2, 132, 256 << 10)
    by = {(r, i): (start, end) for r, i, _k, start, end, _ in rows}
    for r in range(4):  # a rank's steps never overlap, and each ring step starts after its input landed
        starts = [by[(r, i)] for i in range(len(s.ranks[r]))]
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(starts, starts[1:]))
    assert by[(1, 2)][0] > by[(0, 1)][0]  # rank 1's second send waits for rank 0's first


def test_candidate_specs_fix_each_schedule():
    cands = candidate_specs(ar_spec())
    assert [c.schedule for c in cands] == ["one_shot", "two_shot", "ring", "bidir_ring", "ll_one_shot", "ll_two_shot"]
    assert all(c.name.startswith("ar__") and isinstance(c.ctas, int) and isinstance(c.tile_bytes, int) for c in cands)



def test_candidates_of_deterministic_and_epilogue_specs_time_every_schedule_alone():
    """tune times the reduction's schedules: a deterministic spec's rings too (its planner drops them),
    and an epilogue spec's without the epilogue (the same cost for every schedule)."""
    from tilegen.core.spec import parse_spec
    spec = parse_spec({**ar_spec().model_dump(), "deterministic": True, "epilogue": {"residual": True}})
    cands = candidate_specs(spec)
    assert "ring" in [c.schedule for c in cands]
    assert all(c.epilogue is None and not c.deterministic for c in cands)


def test_fit_recovers_known_constants():
    spec = ar_spec()
    rows = []
    for alg in ("one_shot", "two_shot", "ring"):
        for n in (4096, 65536, 1 << 20, 8 << 20):
            f = schedule_features(spec, 4, alg, n)
            rows.append({**f, "us": 6.0 + 2.0 * (f["hops"] + 1) + f["link_bytes"] / 300e3 + f["reduce_bytes"] / 2e6})
    got = fit(rows)
    assert got["launch_us"] == pytest.approx(6.0, rel=1e-6)
    assert got["hop_us"] == pytest.approx(2.0, rel=1e-6)
    assert got["egress_Bpus"] == pytest.approx(300e3, rel=1e-6)
    assert got["reduce_Bpus"] == pytest.approx(2e6, rel=1e-6)


def test_fit_never_returns_negative_constants():
    rows = [
        {"hops": h, "link_bytes": x, "reduce_bytes": 0, "us": 50.0 - 10 * h + x / 1e5}
        for h in (0, 1, 2)
        for x in (0, 1e6, 1e7)
    ]
    got = fit(rows)
    assert all(v >= 0 for v in got.values()) and got["hop_us"] == 0.0


def test_bench_table_and_plot_from_rows(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is the [plot] extra")
    from tilegen.bench import busbw_GBps, format_table, plot

    rows = [
        {
            "op": "allreduce_bf16",
            "kind": "allreduce",
            "bytes": n,
            "rows": 1,
            "matches_nccl": True,
            "times_us": {"allreduce_bf16": 10.0 + n / 3e5, "nccl": 30.0 + n / 2.5e5},
            "busbw_GBps": {
                "allreduce_bf16": busbw_GBps("allreduce", n, 10.0 + n / 3e5, 2),
                "nccl": busbw_GBps("allreduce", n, 30.0 + n / 2.5e5, 2),
            },
        }
        for n in (1 << 14, 1 << 20, 1 << 26)
    ]
    text = format_table(rows, 2, "2 x NVIDIA H200", False)
    assert "allreduce_bf16" in text and "nccl" in text and text.count("yes") == 3
    assert busbw_GBps("allreduce", 1 << 30, 1e6, 2) == pytest.approx((1 << 30) / 1e9)  # 2(n-1)/n = 1 at n = 2
    plot(rows, str(tmp_path / "b.png"), 2)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_plan_drawing_keeps_labels_inside_their_steps_and_the_legend_off_the_ranks(root, tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="plotting is the [plot] extra")
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from tilegen.draw import draw_plan
    from tilegen.collective.plan import plan
    from tilegen.core.spec_files import load_spec
    s = load_spec(root / "specs/allreduce_f32_max_ring.py").spec
    captured = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *a, **kw):
        captured["fig"] = fig
        return real_savefig(fig, *a, **kw)
    plt.Figure.savefig = keep
    try:
        draw_plan(plan(s, 4), str(tmp_path / "plan.png"), shard_bytes=65536)
    finally:
        plt.Figure.savefig = real_savefig
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = captured["fig"]
    ax = fig.axes[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    axes_box = ax.get_window_extent(renderer)
    legend_box = ax.get_legend().get_window_extent(renderer)
    assert legend_box.y1 <= axes_box.y0  # below the plot, not over rank 0
    labels = [t for t in ax.texts if t.get_text()]
    assert labels  # the long steps keep theirs
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i, a in enumerate(boxes):  # no two labels overlap
        for b in boxes[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0


def _bench_rows(world: int, graph: bool, kinds=(("allreduce", "allreduce_bf16"), ("allgather", "allgather_bf16"))):
    """Synthetic rows as tilegen.bench.bench_op makes them (graph: with CUDA-graph replayed times)."""
    from tilegen.bench import busbw_GBps

    rows = []
    for kind, op in kinds:
        for n in (1 << 14, 1 << 20, 1 << 26):
            t = {op: 10.0 + n / 3e5, "nccl": 30.0 + n / 2.5e5}
            r = {"op": op, "kind": kind, "bytes": n, "rows": 1, "matches_nccl": True, "times_us": t,
                 "busbw_GBps": {k: busbw_GBps(kind, n, v, world) for k, v in t.items()}}
            if graph:
                g = {k: v / 2 for k, v in t.items()}
                r.update(times_graph_us=g, busbw_graph_GBps={k: busbw_GBps(kind, n, v, world) for k, v in g.items()})
            rows.append(r)
    return rows


def test_bench_table_shows_eager_and_graph_times_and_both_ratios():
    from tilegen.bench import format_table

    rows = [
        {"op": "allreduce_bf16", "kind": "allreduce", "bytes": 1 << 20, "rows": 128, "matches_nccl": True,
         "times_us": {"allreduce_bf16": 20.0, "nccl": 50.0}, "busbw_GBps": {"allreduce_bf16": 99.5, "nccl": 39.8},
         "times_graph_us": {"allreduce_bf16": 8.0, "nccl": 36.0},
         "busbw_graph_GBps": {"allreduce_bf16": 248.7, "nccl": 55.3}},
        # the op's capture failed on some rank: only nccl has a graph time
        {"op": "allreduce_bf16", "kind": "allreduce", "bytes": 4 << 20, "rows": 512, "matches_nccl": False,
         "times_us": {"allreduce_bf16": 40.0, "nccl": 60.0}, "busbw_GBps": {"allreduce_bf16": 199.0, "nccl": 132.7},
         "times_graph_us": {"nccl": 55.0}, "busbw_graph_GBps": {"nccl": 144.7}},
        # graph=False rows carry no graph keys at all
        {"op": "allreduce_bf16", "kind": "allreduce", "bytes": 16 << 20, "rows": 2048, "matches_nccl": None,
         "times_us": {"allreduce_bf16": 100.0, "nccl": 150.0}, "busbw_GBps": {"allreduce_bf16": 318.0, "nccl": 212.0}},
    ]
    lines = format_table(rows, 2, "2 x NVIDIA H100", False).splitlines()
    assert "graph" in lines[0] and [c.strip() for c in lines[1].split("|")[1:3]] == ["tilegen", "nccl"]
    assert lines[2].split("|")[1].split() == ["eager", "graph", "GB/s"]
    full, partial, none = (line.split("|") for line in lines[3:6])
    assert full[1].split() == ["20.0", "8.0", "99.5"] and full[2].split() == ["50.0", "36.0", "39.8"]
    assert full[3].split() == ["2.50x", "4.50x", "yes"]  # nccl/ours eager 50/20, graph 36/8
    assert partial[1].split() == ["40.0", "-", "199.0"] and partial[2].split() == ["60.0", "55.0", "132.7"]
    assert partial[3].split() == ["1.50x", "-", "NO"]
    assert none[1].split() == ["100.0", "-", "318.0"] and none[3].split() == ["1.50x", "-", "-"]
    assert all(len(line) <= 120 for line in lines[1:])  # two implementations fit a doc page


def test_bench_table_without_graph_times_has_no_graph_columns():
    from tilegen.bench import format_table

    lines = format_table(_bench_rows(2, graph=False), 2, "2 x NVIDIA H100", False).splitlines()
    assert not any("graph" in line for line in lines)
    assert lines[2].split("|")[1].split() == ["us", "GB/s"]
    first = lines[3].split("|")
    assert first[1].split()[0] == f"{10.0 + (1 << 14) / 3e5:.1f}" and first[3].split() == [
        f"{(30.0 + (1 << 14) / 2.5e5) / (10.0 + (1 << 14) / 3e5):.2f}x", "yes"]


def test_plot_collectives_combines_world_sizes_into_one_figure(root, tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is the [plot] extra")
    import json
    import os
    import subprocess
    import sys

    from tilegen.bench import figure

    results = [{"device": "2 x NVIDIA H100", "world": 2, "backend": "nccl", "rows": _bench_rows(2, graph=True)},
               {"device": "4 x NVIDIA H100", "world": 4, "backend": "nccl", "rows": _bench_rows(4, graph=False)}]
    paths = []
    for res in results:
        paths.append(tmp_path / f"r{res['world']}.json")
        paths[-1].write_text(json.dumps(res))
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for extra, name in (([], "busbw.png"), (["--latency"], "latency.png")):
        out = tmp_path / name
        script = root / "bench/scripts/plot_collectives.py"
        cmd = [sys.executable, str(script), *map(str, paths), "-o", str(out), *extra]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    fig = figure(results)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["allreduce, 2 ranks", "allgather, 2 ranks",
                                               "allreduce, 4 ranks", "allgather, 4 ranks"]
    for ax in axes[:2]:  # world 2: eager solid and graph dashed per implementation, in the same colour
        styles = {(line.get_color(), line.get_linestyle()) for line in ax.get_lines()}
        assert len(ax.get_lines()) == 4 and {s for _, s in styles} == {"-", "--"}
        assert len({c for c, _ in styles}) == 2
        assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    for ax in axes[2:]:  # world 4 has no graph times
        assert [line.get_linestyle() for line in ax.get_lines()] == ["-", "-"]
    ours = [line for line in axes[0].get_lines() if line.get_linestyle() == "-"][0]
    assert list(ours.get_xdata()) == [1 << 14, 1 << 20, 1 << 26]
    assert list(ours.get_ydata()) == [r["busbw_GBps"]["allreduce_bf16"] for r in results[0]["rows"][:3]]
    lat = figure(results, latency=True)
    assert lat.axes[0].get_yscale() == "log"
    dashed = [line for line in lat.axes[0].get_lines() if line.get_linestyle() == "--"][0]
    assert list(dashed.get_ydata()) == [r["times_graph_us"]["allreduce_bf16"] for r in results[0]["rows"][:3]]
    from matplotlib import pyplot as plt
    plt.close("all")


class _FakeCollectives:
    """Just enough of torch / torch.distributed for tilegen.bench.time_graph on one simulated rank of
    two: the other rank's capture verdict and time come from `peer_ok` / `peer_us`."""

    def __init__(self, fail_capture: bool, peer_ok: bool, peer_us: float = 0.0, replay_ms: float = 1.0):
        import types
        self.fail_capture, self.peer_ok, self.peer_us, self.replay_ms = fail_capture, peer_ok, peer_us, replay_ms
        self.log: list = []
        self.clock = 0.0
        fake = self

        class Stream:
            def __init__(self, name="side"):
                self.name = name

            def wait_stream(self, other):
                pass

        class Ctx:
            def __init__(self, enter, exit_):
                self.enter, self.exit_ = enter, exit_

            def __enter__(self):
                self.enter()

            def __exit__(self, *exc):
                self.exit_()
                return False

        class Graph:
            def replay(self):
                fake.log.append("replay")
                fake.clock += fake.replay_ms

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = fake.clock

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.t - self.t

        class Tensor:
            def __init__(self, v):
                self.v = v[0]

            def item(self):
                return self.v

        self.streams = {"caller": Stream("caller")}
        self.current = self.streams["caller"]

        def set_stream(s):
            fake.current = s

        def stream(s):
            old = []
            return Ctx(lambda: (old.append(fake.current), set_stream(s)), lambda: set_stream(old[0]))

        def graph(g, pool=None, capture_error_mode="global"):
            fake.log.append(("mode", capture_error_mode))
            fake.log.append(("pool", pool))

            def begin():
                set_stream(Stream("capture"))  # like torch: the capture stream is current inside
                fake.log.append("capture_begin")
                if fake.fail_capture:
                    raise RuntimeError("operation not permitted when stream is capturing\nmore")
            return Ctx(begin, lambda: (fake.log.append("capture_end"), set_stream(fake.streams["caller"])))

        cuda = types.SimpleNamespace(
            current_stream=lambda: fake.current, Stream=Stream, stream=stream, graph=graph, CUDAGraph=Graph,
            Event=Event, set_stream=set_stream, synchronize=lambda: fake.log.append("sync"))

        def all_reduce(t, op):
            t.v = min(t.v, int(fake.peer_ok)) if op == "min" else max(t.v, fake.peer_us)

        def all_gather_object(out, obj):
            out[0], out[1] = obj, (None if fake.peer_ok else "RuntimeError: peer failed")

        self.dist = types.SimpleNamespace(
            get_backend=lambda: "gloo", get_world_size=lambda: 2, barrier=lambda: fake.log.append("barrier"),
            all_reduce=all_reduce, all_gather_object=all_gather_object,
            ReduceOp=types.SimpleNamespace(MIN="min", MAX="max"))
        self.torch = types.SimpleNamespace(
            cuda=cuda, distributed=self.dist, int32="int32", float64="float64",
            tensor=lambda v, dtype=None, device=None: Tensor(v))
        cuda.current_device = lambda: 0
        cuda.graph_pool_handle = lambda: (0, 7)

    def fn(self):
        self.log.append(("call", self.current.name))


@pytest.mark.parametrize("fail_capture, peer_ok", [(False, True), (True, True), (False, False)])
def test_time_graph_replays_only_when_every_rank_captured(monkeypatch, fail_capture, peer_ok):
    import sys

    from tilegen.bench import time_graph

    f = _FakeCollectives(fail_capture, peer_ok, peer_us=15.0, replay_ms=1.0)
    monkeypatch.setitem(sys.modules, "torch", f.torch)
    monkeypatch.setitem(sys.modules, "torch.distributed", f.dist)
    us, err = time_graph(f.fn, calls=50, reps=7, warmup=2)
    calls = [e[1] for e in f.log if isinstance(e, tuple) and e[0] == "call"]
    assert calls[:2] == ["side", "side"]  # warm-up on a side stream before the capture
    assert ("mode", "thread_local") in f.log
    assert f.current is f.streams["caller"]  # the caller's stream is current again, capture failed or not
    assert ("pool", (0, 7)) in f.log
    if fail_capture or not peer_ok:
        assert us is None and "replay" not in f.log
        assert err == ("rank 0: RuntimeError: operation not permitted when stream is capturing" if fail_capture
                       else "rank 1: RuntimeError: peer failed")
    else:
        assert err is None and calls[2:] == ["capture"] * 50
        assert f.log.count("replay") == 1 + 7  # one upload replay, then the timed ones
        assert f.log.count("barrier") == 7
        assert us == pytest.approx(max(1.0 * 1e3 / 50, 15.0))  # per call, the slowest rank's


def test_time_interleaved_takes_the_implementations_in_turns(monkeypatch):
    """tilegen.bench.time_interleaved times one batch of every implementation per round (clock drift under
    sustained GEMMs falls on all of them alike) and reports each one's median: a fake torch records the
    order of the calls and gives each batch a time."""
    import sys
    import types

    from tilegen import bench

    order, clock = [], [0.0]

    class Event:
        def __init__(self, enable_timing=True):
            self.t = 0.0

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    cuda = types.SimpleNamespace(synchronize=lambda: None, Event=Event)
    dist = types.SimpleNamespace(barrier=lambda: None)
    fake = types.SimpleNamespace(cuda=cuda, distributed=dist)
    monkeypatch.setitem(sys.modules, "torch", fake)
    monkeypatch.setitem(sys.modules, "torch.distributed", dist)
    monkeypatch.setattr(bench, "_slowest", lambda us: us)

    def impl(name, ms):
        def fn():
            order.append(name)
            clock[0] += ms
        return fn

    got = bench.time_interleaved({"a": impl("a", 1.0), "b": impl("b", 3.0)}, calls=2, reps=3, warmup=1)
    assert order[:2] == ["a", "b"]  # warm-up: each once
    assert order[2:] == ["a", "a", "b", "b"] * 3  # then rounds: a batch of each in turn
    assert got == {"a": 1000.0, "b": 3000.0}  # us per call


def test_bench_compares_with_nccl_reducing_as_the_op_does():
    """max/min/avg ops are timed and checked against NCCL's max/min/avg, not a sum; premul_sum ops get a
    scale and NCCL's premul sum of the same; symmetric memory (sums only) is left out for the others."""
    dist = pytest.importorskip("torch.distributed")
    from tilegen.bench import BENCH_SCALE, nccl_reduce_op, op_call_args

    class Op:
        def __init__(self, reduce):
            self.reduce = reduce
    for red, want in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX), ("min", dist.ReduceOp.MIN),
                      ("avg", dist.ReduceOp.AVG), (None, dist.ReduceOp.SUM)):
        assert nccl_reduce_op(Op(red)) == want, red
        assert op_call_args(Op(red)) == {}
    assert nccl_reduce_op(None) == dist.ReduceOp.SUM
    assert op_call_args(Op("premul_sum")) == {"scale": BENCH_SCALE}
    assert nccl_reduce_op(Op("premul_sum")) not in (dist.ReduceOp.SUM, dist.ReduceOp.AVG)
    from tilegen.collective.ops import OPS
    calls = []
    fake = type("dist", (), {"all_reduce": staticmethod(lambda out, op: calls.append(("all_reduce", op))),
                             "reduce_scatter_tensor": staticmethod(lambda out, x, op: calls.append(("rs", op))),
                             "reduce": staticmethod(lambda out, dst, op: calls.append(("reduce", op)))})
    for kind in ("allreduce", "reduce_scatter", "reduce"):
        OPS[kind].nccl(fake, "x", "out", 0, "MAX")
    assert [op for _, op in calls] == ["MAX"] * 3
