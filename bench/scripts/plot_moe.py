"""Plot bench/scripts/bench_moe.py results: dispatch and combine time, tilegen (bf16, fp8 dispatch, low-latency
mode in CUDA graphs) vs the NCCL baseline, per case and world size (log scale), into one PNG.

    python bench/scripts/plot_moe.py docs/data/bench_moe_np2_h100.json docs/data/bench_moe_np4_h100.json -o docs/moe.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    rows = [r for path in a.results for r in json.load(open(path))]
    labels = [f"{r['tokens']} tokens\n{r['world']} ranks" for r in rows]
    series = (("nccl", "#999999", "NCCL all_to_all_single (eager)"), ("tilegen", "#2a7ab9", "tilegen (eager)"),
              ("tilegen_fp8", "#e08a2c", "tilegen, fp8 dispatch (eager)"),
              ("tilegen_ll_graph", "#3a9a5b", "tilegen low-latency, CUDA graph"),
              ("tilegen_fp8_ll_graph", "#8a5bb0", "tilegen low-latency fp8, CUDA graph"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(series)
    for ax, half in zip(axes, ("dispatch", "combine")):
        xs = range(len(rows))
        for i, (impl, color, label) in enumerate(series):
            ax.bar([x + (i - (len(series) - 1) / 2) * width for x in xs],
                   [r["us"].get(f"{impl}_{half}", 0) for r in rows], width, label=label, color=color)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"MoE {half}, hidden 7168, top-8 of 256 experts, bf16")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("us per call (median, slowest rank)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(series), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
