"""Plot tools/bench_moe.py results: dispatch and combine time, tilegen vs the NCCL baseline, per case and
world size (log scale), into one PNG.

    python tools/plot_moe.py docs/data/bench_moe_np2_h100.json docs/data/bench_moe_np4_h100.json -o docs/moe.png
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, half in zip(axes, ("dispatch", "combine")):
        xs = range(len(rows))
        for i, (impl, color) in enumerate((("nccl", "#999999"), ("tilegen", "#2a7ab9"))):
            ax.bar([x + (i - 0.5) * 0.38 for x in xs], [r["us"][f"{impl}_{half}"] for r in rows], 0.38,
                   label="NCCL all_to_all_single" if impl == "nccl" else "tilegen (normal mode)", color=color)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"MoE {half}, hidden 7168, top-8 of 256 experts, bf16")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("us per call (median, eager)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
