"""Plan drawings and the tuner's candidate specs and fit (the GPU timing itself runs under torchrun)."""
import xml.etree.ElementTree as ET

import pytest

from tilegen import cli
from tilegen.draw import timeline
from tilegen.registry import make_schedule
from tilegen.spec import DynamicDim, KernelSpec
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
    assert [c.schedule for c in cands] == ["one_shot", "two_shot", "ring", "bidir_ring"]
    assert all(c.name.startswith("ar__") and isinstance(c.ctas, int) and isinstance(c.tile_bytes, int) for c in cands)


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
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from tilegen.draw import draw_plan
    from tilegen.plan import plan
    from tilegen.spec import load_spec
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
