"""Bar chart of a bench/scripts/bench_gemm.py result: per case, each variant's time over GEMM alone (same run;
CUDA-graph columns over the graphed GEMM).

    python bench/scripts/plot_gemm.py docs/data/bench_gemm_np2_h100.json docs/gemm_overlap_np2.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = [  # (key in the result, label)
    ("tilegen_copy_engine", "tilegen copy engine"),
    ("graph_copy_engine", "tilegen copy engine, CUDA graph"),
    ("tilegen_decomposed", "tilegen decomposed (comm. kernel)"),
    ("tilegen_fused", "tilegen fused (CUTLASS)"),
    ("nccl_then_cublas", "NCCL then cuBLAS"),
    ("graph_nccl_then_cublas", "NCCL then cuBLAS, CUDA graph"),
    ("torch_fused", "torch fused_all_gather_matmul / fused_matmul_reduce_scatter"),
]


def value(us: dict, key: str) -> float:
    """A series' time in a row (torch_fused: whichever of torch's two fused ops the row has)."""
    if key == "torch_fused":
        return us.get("torch_fused_all_gather_matmul", us.get("torch_fused_matmul_reduce_scatter", float("nan")))
    return us.get(key, float("nan"))


def main(src: str, dst: str) -> None:
    rows = json.load(open(src))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(SERIES)
    for i, (key, label) in enumerate(SERIES):
        base = "graph_gemm_alone" if key.startswith("graph_") else "gemm_alone"  # graphs against a graphed GEMM
        ys = [value(r["us"], key) / r["us"].get(base, r["us"]["gemm_alone"]) for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], ys, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    labels = [r["case"].replace("llama-70b up ", "").replace(" batch", "") for r in rows]
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=8)
    ax.set_ylabel("time / cuBLAS GEMM alone (same run)")
    ax.set_title(f"GEMM + communication overlap, bf16, {rows[0]['world']} ranks (lower is better; 1.0 = no "
                 f"communication cost)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="a bench_gemm.py JSON result")
    ap.add_argument("figure", help="the figure to write (.png, .svg, ...)")
    a = ap.parse_args()
    main(a.result, a.figure)
