"""Plot a `python3 -m bench ab` run of bench/scripts/profile_moe.py: each build's in-graph dispatch and combine,
every rank of every round (the logs ab_<build>_<round>.log the phase leaves in $OUT), into one PNG.

    python bench/scripts/plot_ab.py docs/data/ab_moe_ll_fp8_np4_h100 -o docs/moe_ll_ab.png --title "..." \
        --name base="main 00c1ebf" --name tree="LL128 lines" --goal dispatch=30
"""
import argparse
import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINE = re.compile(r"^rank (\d+): in-graph .*: dispatch ([0-9.]+), combine ([0-9.]+)", re.M)


def read_runs(folder: pathlib.Path) -> dict[str, dict[str, list[float]]]:
    """{build: {"dispatch": [...], "combine": [...]}}, every rank of every round, in the logs' order."""
    runs: dict[str, dict[str, list[float]]] = {}
    for log in sorted(folder.glob("ab_*_*.log")):
        build = log.stem[3:].rsplit("_", 1)[0]
        found = LINE.findall(log.read_text())
        if not found:
            raise SystemExit(f"{log}: no 'rank N: in-graph ... dispatch X, combine Y' line")
        side = runs.setdefault(build, {"dispatch": [], "combine": []})
        for _, d, c in found:
            side["dispatch"].append(float(d))
            side["combine"].append(float(c))
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=pathlib.Path)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--name", action="append", default=[], help="build=label shown for it (\\n: a line break)")
    ap.add_argument("--goal", action="append", default=[], help="half=us: a dashed line (dispatch=30)")
    a = ap.parse_args()
    names = {k: v.replace("\\n", "\n") for k, v in (n.split("=", 1) for n in a.name)}
    goals = {k: float(v) for k, v in (g.split("=", 1) for g in a.goal)}
    runs = read_runs(a.folder)
    builds = [b for b in ("base", *sorted(set(runs) - {"base", "tree"}), "tree") if b in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, half in zip(axes, ("dispatch", "combine")):
        for i, b in enumerate(builds):
            v = runs[b][half]
            ax.scatter([i] * len(v), v, s=18, alpha=0.7)
            ax.hlines(sorted(v)[len(v) // 2], i - 0.25, i + 0.25, color="black")
        if half in goals:
            ax.axhline(goals[half], color="red", linestyle="--", linewidth=1, label=f"goal {goals[half]:g} us")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(builds)), [names.get(b, b) for b in builds], fontsize=8)
        ax.set_title(f"{half} (every rank and round; bar: median)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("us in a CUDA graph (per-rank median of its replays)")
    fig.suptitle(a.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
