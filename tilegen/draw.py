"""Pictures: a plan as a per-rank timeline (from the cost model), benchmark plots."""
from __future__ import annotations

from pathlib import Path

from .collective.ir import Schedule
from .collective.layout import layout, tile_bytes_for, unit_length
from .collective.plan import TOPOLOGIES, Plan

def pyplot():
    """matplotlib's pyplot (headless), or a clear error: plotting is an optional extra."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'tilegen[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


COLOURS = {"entry": "#9e9e9e", "put": "#4c72b0", "reduce": "#dd8452", "wait": "#c44e52"}


def timeline(s: Schedule, in_bytes: int, elem: int, ctas: int, tile_bytes: int, topo=TOPOLOGIES["nvswitch"]):
    """Estimated (rank, step, kind, start_us, end_us, remote ranks) of every step: ranks run their
    steps in order; a step that waits starts when the first tile it waits for can have landed."""
    w = s.world
    shard, part = layout(s.op, w, in_bytes, elem, s.parts)
    tile = tile_bytes_for(part, tile_bytes, ctas)
    first: dict[tuple, float] = {}  # (rank, buf, slot) -> first tile landed
    entry: dict[int, float] = {}
    rows: list[tuple] = []
    for _ in range(4 * w):  # relax until the estimates settle
        rows = []
        for r, steps in enumerate(s.ranks):
            t = topo.launch_us
            for i, st in enumerate(steps):
                if st.kind == "entry":
                    entry[r] = t
                    start = max([t] + [entry.get(p, 0.0) for p in st.await_ranks])
                    end = start + (topo.hop_us if st.await_ranks else 0.0)
                    rows.append((r, i, "entry", t, end, ()))
                    t = end
                    continue
                n = unit_length(s.op, w, in_bytes, shard, part, s.parts, st.unit)
                ready = max([first.get((g.rank, g.buf, g.slot), 0.0) for g in st.waits], default=0.0)
                start = max(t, ready)
                if st.kind == "wait":
                    end = start + topo.step_us
                    rows.append((r, i, "wait", t, end, ()))
                else:
                    remote = tuple(sorted({d.rank for d in st.dests if d.rank != r}))
                    dur = n * max(len(remote), 1) / topo.egress_Bpus + topo.step_us
                    if len(st.srcs) > 1:
                        dur += n * (len(st.srcs) + len(st.dests)) / topo.reduce_Bpus
                    end = start + dur
                    for d in st.dests:
                        first[(d.rank, d.buf, d.slot)] = (
                            start + min(tile, n) / topo.egress_Bpus + (topo.hop_us if d.rank != r else 0)
                        )
                    rows.append((r, i, "reduce" if len(st.srcs) > 1 else "put", start, end, remote))
                t = end
    return rows


def draw_plan(p: Plan, path: str | Path, shard_bytes: int | None = None) -> None:
    """Draw the plan's variant for the given input size (default: the largest) as one row per rank.
    Steps too short for their label show only their colour (the legend, below the plot, names them);
    the file is the same for the same plan (no timestamp, fixed SVG ids)."""
    from .collective.plan import fmt_bytes

    plt = pyplot()
    plt.rcParams["svg.hashsalt"] = "tilegen"
    spec = p.spec
    n = shard_bytes or p.variants[-1].max_bytes
    v = next((v for v in p.variants if n <= v.max_bytes), p.variants[-1])
    rows = timeline(v.schedule, n, spec.elem_bytes, v.ctas, v.tile_bytes)
    w = v.schedule.world
    fig, ax = plt.subplots(figsize=(12, 1.4 + 0.75 * w))
    span = max((end for *_, end, _ in rows), default=1.0)
    ax.set_xlim(0, span * 1.02)
    texts = []
    for r, i, kind, start, end, remote in rows:
        ax.broken_barh([(start, max(end - start, 0.05))], (r - 0.35, 0.7), facecolors=COLOURS[kind], edgecolor="white")
        label = f"{i}:{kind}" + (f"→{','.join(map(str, remote))}" if remote else "")
        t = ax.text(start + (end - start) / 2, r, label, ha="center", va="center", fontsize=7, color="white")
        texts.append((t, start, end))
        for q in remote:
            ax.annotate("", xy=(end, q), xytext=(end, r), arrowprops=dict(arrowstyle="->", color="#555555", lw=0.6))
    ax.set_yticks(range(w), [f"rank {r}" for r in range(w)])
    ax.invert_yaxis()
    ax.set_xlabel("estimated time (us, cost model)")
    ax.set_title(f"{spec.name}: {v.schedule.algorithm}, world {w}, {fmt_bytes(n)} input per rank, {v.ctas} CTAs, "
                 f"sync {spec.sync}")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, list(COLOURS), loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, ncol=len(COLOURS),
              frameon=False)
    fig.tight_layout()
    _drop_labels_wider_than_their_step(fig, ax, texts)
    fig.savefig(path, metadata={"Date": None} if str(path).endswith(".svg") else None)
    plt.close(fig)


def _drop_labels_wider_than_their_step(fig, ax, texts) -> None:
    """A label that would spill out of its step's bar (and over its neighbours') is removed."""
    renderer = fig.canvas.get_renderer()
    for t, start, end in texts:
        box = t.get_window_extent(renderer)
        x0, x1 = (ax.transData.transform((x, 0))[0] for x in (start, end))
        if box.x0 < x0 or box.x1 > x1:
            t.remove()
