"""Plot bench_hot_path.py results: a row of panels per world size; left, the decode step (allreduce + residual
+ RMSNorm) replayed in a CUDA graph, us per call against rows, a colour per implementation, hidden 4096 solid
and 8192 dashed; right, the allreduce alone, us per call against bytes (log-log), fast, deterministic, NCCL and
torch symmetric memory, graph solid and eager dashed.

    python bench/scripts/plot_hot_path.py hot_np2.json hot_np4.json -o docs/hot_path.png
"""
import argparse
import json

IMPLS = ["tilegen_fused", "tilegen_unfused", "nccl", "symm_one_shot", "symm_two_shot"]
BASELINES = ["nccl", "torch_symm_one_shot", "torch_symm_two_shot"]


def load(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    if not isinstance(res, dict) or not {"world", "fused"} <= set(res):
        raise SystemExit(f"{path}: not a bench_hot_path.py result (expected an object with 'world' and 'fused')")
    return res


def size_series(res: dict) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """label -> {"graph" | "eager": [(bytes, us)]}: the fast and deterministic ops, and the fast op's baselines."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    fast = res.get("fast_op")
    for r in res.get("sizes", []):
        keys = [r["op"]] + (BASELINES if r["op"] == fast else [])
        for key in keys:
            for mode, times in (("graph", r.get("times_graph_us", {})), ("eager", r["times_us"])):
                if key in times:
                    out.setdefault(key, {}).setdefault(mode, []).append((r["bytes"], times[key]))
    return out


def plot(results: list[dict], output: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = sorted(results, key=lambda r: r["world"])
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.2 * len(results)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (left, right), res in zip(axes, results):
        for i, impl in enumerate(IMPLS):
            for hidden, style in ((4096, "-"), (8192, "--")):
                pts = [(r["rows"], r["times_graph_us"][impl]) for r in res["fused"]
                       if r["hidden"] == hidden and impl in r.get("times_graph_us", {})]
                if pts:
                    left.plot(*zip(*sorted(pts)), style, marker="o", ms=3, color=colours[i % len(colours)],
                              label=f"{impl}, hidden {hidden}")
        left.set(xscale="log", xlabel="rows", ylabel="us per call, CUDA graph",
                 title=f"AR + residual + RMSNorm, bf16, {res['world']} ranks")
        left.legend(fontsize=7)
        for i, (label, modes) in enumerate(sorted(size_series(res).items())):
            for mode, style in (("graph", "-"), ("eager", "--")):
                if modes.get(mode):
                    right.plot(*zip(*sorted(modes[mode])), style, marker="o", ms=3, color=colours[i % len(colours)],
                               label=f"{label}, {mode}")
        right.set(xscale="log", yscale="log", xlabel="bytes", ylabel="us per call",
                  title=f"allreduce alone, bf16, {res['world']} ranks ({res.get('device', '')})")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench_hot_path.py JSON files (one per world size)")
    ap.add_argument("-o", "--output", required=True, help="the figure (.png, .svg, ...)")
    a = ap.parse_args(argv)
    plot([load(p) for p in a.results], a.output)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
