#!/usr/bin/env python3
"""Write docs/measurements.md, the reference of current GPU figures, from docs/data/runs.json and the data
files it lists (one section per op family x machine x world size: provenance, tables, plots), then the design
decisions with the measurement behind each.

    python3 tools/report_measurements.py            # (re)write docs/measurements.md
    python3 tools/report_measurements.py --check    # exit 1 if docs/measurements.md is not what this writes
    python3 tools/report_measurements.py --out PATH # write elsewhere (links stay relative to docs/)

Stdlib only; the output depends on the input files alone (same input, same bytes). The dated history of the
measurement sessions is in docs/log/.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from tilegen.collective.plan import fmt_bytes

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DATA = DOCS / "data"
RUNS = DATA / "runs.json"
LOG_DIR = DOCS / "log"
OUT = DOCS / "measurements.md"

FIELDS = {  # field: allowed types
    "file": (str,), "family": (str,), "what": (str,), "date": (str,), "commit": (str, type(None)),
    "machine": (str,), "cards": (str,), "world": (int,), "driver": (str, type(None)),
    "nccl": (str, type(None)), "torch": (str, type(None)), "command": (str, type(None)), "section": (str,),
}
FAMILIES = {  # family: section title, in the order the document gives them
    "collective": "Collectives",
    "overlap": "GEMM + communication overlap",
    "moe": "MoE dispatch and combine",
    "host": "Host cost per call",
    "probe": "NVLink store probe",
    "hot_path": "Decode hot path: allreduce + residual + RMSNorm, allreduce by size",
    "floor": "Latency floors: launch, NVLink, a minimal LL exchange",
}
PLOTS = {  # data file: plots in docs/ drawn from it
    "bench_collectives_h100x2.json": [("collective busbw", "collectives_busbw.png"),
                                      ("collective latency", "collectives_latency.png")],
    "bench_gemm_np2_h100.json": [("overlap, 2 ranks", "gemm_overlap_np2.png")],
    "bench_gemm_np4_h100.json": [("overlap, 4 ranks", "gemm_overlap_np4.png")],
    "bench_moe_np2_h100.json": [("MoE dispatch and combine, 2 and 4 ranks", "moe.png")],
    "bench_moe_np4_h100.json": [("MoE dispatch and combine, 2 and 4 ranks", "moe.png")],
    "ab_moe_ll_fp8_np4_h100/": [("low-latency fp8 dispatch and combine, A/B", "moe_ll_ab.png")],
}

METHOD = """\
Every figure comes from runs of the lab (`python3 -m bench`; commands before 2026-12-08 name its earlier form,
`tools/gpu_check.sh`, and the scripts' earlier folder, tools/) on the machines each section names, one GPU per rank.
Times are medians of CUDA-event timings taken after warm-up calls (per call, over batches of back-to-back
calls; the slowest rank where ranks differ). Each op runs eager and, where a column says so, replayed in a
CUDA graph; NCCL (and, for allreduce, torch symmetric memory's one_shot / two_shot) runs in the same run as
tilegen, so a table's columns come from one machine start. Bus bandwidth (busbw) is counted as nccl-tests
counts it; a ratio "vs NCCL" is NCCL's time over tilegen's (above 1: tilegen is faster). MoE GB/s counts the
items' token bytes that go to other ranks over the time, as DeepEP counts them. Two starts of one machine
kind can differ (the store probe below: 10.8 vs 12.7 us on one shape), so compare figures within one
table. The MoE in-graph timelines come from CUPTI's record of each replayed kernel
(torch.profiler): per rank, medians of the replays."""

# (text, data files, [(link text, log section)]): each decision with the measurement behind it
DECISIONS = [
    ("**GEMM + communication overlap runs on the copy engines** (`overlap: auto` is `copy_engine`: cuBLAS GEMMs, "
     "`cudaMemcpyAsync` between symmetric buffers, no SM taken from the GEMMs): 1.13-1.59x NCCL then cuBLAS at "
     "4 ranks and 1.17-1.35x at 2 ranks, faster than the decomposed and fused styles in every row.",
     ["bench_gemm_np4_h100.json", "bench_gemm_np2_h100.json"],
     [("ninth session", "Issue 14: the overlap benchmark with interleaved columns (`bash tools/gpu_check.sh "
       "gemm 4`, `gemm 2`)")]),
    ("**Copy-engine flags are stream memory operations, not wait kernels**: spinning one-thread wait kernels "
     "stretched the first persistent GEMM by 20%.", [],
     [("third session", "Earlier (third session, Python executor, 2 ranks)")]),
    ("**One library call per op call** (the checked program runs from C++): Python issuing each step cost "
     "141-152 us per call at TP 2 and 600-800 us at TP 4; gemm_rs at TP 4 went from 0.849 / 0.865 / 0.844 ms "
     "to 0.561 / 0.364 / 0.261 ms.", [],
     [("fourth session", "What changed, and what each change measured (same sessions, same machine kinds)")]),
    ("**Copy-engine style and splits per size range from sweeps** (`bench/scripts/ce_calibrate.py`): TP 4 ag_gemm "
     "merged x1 up to 724 rows per chunk, chunks x1 above, gemm_rs direct x1; `merged_spread` (a copy stream "
     "per peer) was slower at every size (0.758 vs 0.456 ms at M=8192) and is not chosen.",
     ["ce_sweep_np4_h100.json", "ce_sweep_np2_h100.json"],
     [("fourth session", "What changed, and what each change measured (same sessions, same machine kinds)"),
      ("fifth session", "The `merged_spread` style measured (fifth session, `nvidia-h100-x4`, "
       "docs/data/ce_sweep_np4_h100.json)")]),
    ("**The fused CUTLASS GEMM stays cooperative, 128 x 256 x 64 tiles in 2x1 clusters**: pingpong was 14-34% "
     "slower; the remaining 5-6% against cuBLAS is the mainloop's tensor-pipe activity (ncu: 91.4% vs 97.8%), "
     "not the tile, cluster, schedule or SM count.",
     ["fused_tiles_np2_h100.json"],
     [("ninth session", "Issue 14 goal 2: the fused kernel alone, the schedule and the cause (`bash "
       "tools/gpu_check.sh fused 2`)")]),
    ("**Collectives: LL (flag-in-data) schedules up to 1 MiB, direct schedules in peer order, plans from "
     "`tilegen tune` measurements**: auto picks the fastest measured configuration (ratio 1.000-1.012) at every "
     "size from 4 KiB to 64 MiB for the five ops at 2 ranks, where one range per schedule with fixed CTAs and "
     "tiles lost 19.5% (all_to_all, 16 MiB) and 20% (broadcast, 4 MiB).",
     ["bench_collectives_h100x2.json"],
     [("collectives, 2026-11-26", "Collectives against NCCL (issue 13), 2026-11-26")]),
    ("**The host path is one TVM-FFI call**: 7.88 us per eager call, of which 5.6-5.9 us is a bare kernel "
     "launch (a TVM-FFI call 0.5 us, each DLPack tensor 0.45 us); what is left to cut is ~1 us of tensor "
     "conversion.",
     ["bench_host_h100x2.json"],
     [("collectives, 2026-11-26", "Collectives against NCCL (issue 13), 2026-11-26")]),
    ("**MoE dispatch pushes each token once per destination rank and expands locally; combine returns partial "
     "sums in the token dtype**: ~2.2x fewer NVLink bytes than pushing each item (docs/design.md); bf16 partial "
     "sums instead of fp32 took combine from 2411 us to 940-955 us at 4 ranks, 4096 tokens.",
     ["bench_moe_np4_h100.json", "bench_moe_np2_h100.json"],
     [("fifth session", "MoE dispatch and combine (issue 15), 2026-11-27 (fifth session)")]),
    ("**Only the last CTA fences at system scope, once** (`signal_when_last`, `set_flags`): a system fence in "
     "every CTA held the push at 31.1 us (bf16) / 29.7 us (fp8) against 27.8 / 25.9; a fence and a release "
     "store per flag held fp8 ll_push at 22.0-22.6 us against 20.4-20.9.", [],
     [("eighth session", "MoE dispatch and combine (issue 15), 2026-11-27 (eighth session): a low-latency "
       "dispatch that writes the outputs itself"),
      ("tenth session", "Tenth session (2026-11-27): the low-latency push against the links' own rate, one "
       "fence less")]),
    ("**fp8 per-token scales read each row once per CTA round** (`round_amax`): ll_push 25.6 -> 22.1 us, "
     "in-graph fp8 dispatch 37.5 -> 33.8 us (4 ranks, 128 tokens).", [],
     [("eighth session", "MoE dispatch and combine (issue 15), 2026-11-27 (eighth session): a low-latency "
       "dispatch that writes the outputs itself")]),
    ("**The low-latency dispatch is two kernels, not one cooperative kernel**: the cooperative version measured "
     "39.7-39.8 us (bf16) and 34.3-34.8 us (fp8) in the graph against 38.8 and 33.8 for two kernels; the waits "
     "for the slowest rank replace the kernel boundary instead of overlapping anything.", [],
     [("eighth session", "MoE dispatch and combine (issue 15), 2026-11-27 (eighth session): a low-latency "
       "dispatch that writes the outputs itself")]),
    ("**Store width and TMA are not the push's lever**: ~2.5 MB to three peers takes ~11-13 us on these links "
     "with 8-byte, 16-byte or TMA bulk stores alike; 16 fp8 channels per lane (one 16-byte store) slowed "
     "ll_push to 25.2-26.5 us against 21.9-22.8.",
     ["probe_nvlink_stores_h100x4.txt"],
     [("tenth session", "Tenth session (2026-11-27): the low-latency push against the links' own rate, one "
       "fence less")]),
    ("**The low-latency dispatch carries its flag in the data** (LL128 lines, a warp per piece and rank, the "
     "expansion launched once the push routed): in-graph fp8 dispatch 30.0-30.4 -> 26.2-27.6 us, combine "
     "33.5-34.0 -> 31.9-33.1 us; weak line stores measured the same as volatile ones, so the lines keep NCCL's "
     "volatile stores. Four earlier ideas for the tail (staging rows, handles written at the destination, "
     "routing beside the amax loads, a warp-reduced amax) were each 0.2-1 us slower.",
     ["ab_moe_ll_fp8_np4_h100/"],
     [("thirteenth session", "Thirteenth session (2026-11-27): the flag in the data, the low-latency dispatch "
       "at 26-28 us"),
      ("twelfth session", "Twelfth session (2026-11-27): four ideas for the low-latency dispatch's tail, none "
       "kept")]),
]


# ---------------------------------------------------------------------------------------------- formatting


def fmt(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def fmt_us(x: float | None) -> str:
    """us: one decimal below 1000, whole numbers above."""
    if x is None:
        return ""
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def fmt_ms(us: float | None) -> str:
    return "" if us is None else f"{us / 1000:.3f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    return "" if num is None or not den else f"{num / den:.2f}x"


def span(values: list[float]) -> str:
    """min-max (median) of a list, one decimal."""
    if not values:
        return ""
    lo, hi, med = min(values), max(values), statistics.median(values)
    return f"{lo:.1f}{' to ' if lo < 0 else '-'}{hi:.1f} ({med:.1f})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


class Anchors:
    """Where each heading of docs/log/*.md is, for links from the reference to the history."""

    def __init__(self, log_dir: Path):
        self.headings: list[tuple[str, str, str]] = []  # (file name, heading, anchor)
        for path in sorted(log_dir.glob("*.md")):
            seen: dict[str, int] = {}
            fence = False
            for line in path.read_text().splitlines():
                if line.startswith("```"):
                    fence = not fence
                m = None if fence else re.match(r"#{1,6} (.+?)\s*#*\s*$", line)
                if not m:
                    continue
                base = slug(m.group(1))
                n = seen.get(base, 0)
                seen[base] = n + 1
                self.headings.append((path.name, m.group(1), base if n == 0 else f"{base}-{n}"))

    def link(self, section: str, text: str | None = None) -> str:
        """A markdown link to a section ("A > B": B, the first heading of that name after A)."""
        parts = [p.strip() for p in section.split(" > ")]
        start = 0
        found = None
        for part in parts:
            for i in range(start, len(self.headings)):
                if self.headings[i][1] == part:
                    found, start = self.headings[i], i + 1
                    break
            else:
                found = None
                break
        label = text if text is not None else parts[-1].replace("`", "")
        if found is None:
            return label
        return f"[{label}](log/{found[0]}#{found[2]})"


# ---------------------------------------------------------------------------------------------- renderers


def render_collectives(data: dict) -> list[str]:
    rows = []
    matched = 0
    for r in data["rows"]:
        op = r["op"]
        t, g, bw = r["times_us"], r.get("times_graph_us", {}), r.get("busbw_GBps", {})
        matched += bool(r.get("matches_nccl"))

        def pair(key: str) -> str:
            if key not in t and key not in g:
                return ""
            return f"{fmt(t.get(key))} / {fmt(g.get(key))}"

        rows.append([
            f"`{op}`", fmt_bytes(r["bytes"]), pair(op), pair("nccl"),
            fmt_ratio(t.get("nccl"), t.get(op)), fmt_ratio(g.get("nccl"), g.get(op)),
            f"{bw[op]:.0f} / {bw['nccl']:.0f}" if op in bw and "nccl" in bw else "",
            pair("torch_symm_one_shot"), pair("torch_symm_two_shot"),
        ])
    out = [f"Bytes as nccl-tests counts them; us per call, eager / CUDA graph; {data.get('device', '')}, "
           f"{data.get('world')} ranks, baseline backend {data.get('backend', 'nccl')}. Every row's output matched "
           f"NCCL's: {matched} of {len(data['rows'])}.", ""]
    out += table(["op", "size", "tilegen us", "NCCL us", "vs NCCL, eager", "vs NCCL, graph",
                  "busbw GB/s, eager: tilegen / NCCL", "torch symm one_shot us", "torch symm two_shot us"], rows)
    return out


def render_host(data: dict) -> list[str]:
    calls, burst = data.get("calls"), data.get("burst_calls")
    shape = " x ".join(str(d) for d in [data.get("rows")] + list(data.get("inner_shape", [])))
    out = [f"`{data.get('op')}` on {shape} elements, {data.get('world')} ranks, {data.get('device')}, torch "
           f"{data.get('torch')}; us per call over {calls} back-to-back calls ({data.get('repeats')} repeats) and "
           f"in a burst of {burst} calls.", ""]
    burst_us = data.get("burst_us_per_call", {})
    rows = [[f"`{k}`", fmt(v, 2), fmt(burst_us.get(k), 2)] for k, v in data["us_per_call"].items()]
    return out + table(["call", f"us per call ({calls} calls)", f"us per call (burst of {burst})"], rows)


OVERLAP_COLUMNS = [  # key in "us", header; a column is shown when any row has it
    ("gemm_alone", "GEMM alone"),
    ("graph_gemm_alone", "GEMM alone, graph"),
    ("tilegen_copy_engine", "tilegen copy engine"),
    ("graph_copy_engine", "copy engine, graph"),
    ("tilegen_decomposed", "decomposed"),
    ("tilegen_fused", "fused"),
    ("fused_kernel_only", "fused kernel only"),
    ("fused_kernel_all_sms", "fused kernel, all SMs"),
    ("nccl_then_cublas", "NCCL then cuBLAS"),
    ("graph_nccl_then_cublas", "NCCL then cuBLAS, graph"),
    ("torch_fused", "torch fused op"),
]
CE_STYLES = ["chunks", "merged", "merged_spread", "direct", "ring"]


def overlap_op(row: dict) -> str:
    return "gemm_rs" if row["case"].startswith("gemm_rs") else "ag_gemm"


def overlap_us(row: dict) -> dict:
    us = dict(row["us"])
    for k in ("torch_fused_all_gather_matmul", "torch_fused_matmul_reduce_scatter"):
        if k in us:
            us["torch_fused"] = us.pop(k)
    return us


def shape(row: dict) -> str:
    return f"{row['M']} x {row['N']} x {row['K']}"


def render_overlap(rows: list[dict]) -> list[str]:
    ce_keys = sorted({k for r in rows for k in r["us"] if k.startswith("ce_")},
                     key=lambda k: (CE_STYLES.index(k[3:].rsplit("_", 1)[0]) if k[3:].rsplit("_", 1)[0] in CE_STYLES
                                    else len(CE_STYLES), k))
    if ce_keys:
        return render_ce_sweep(rows, ce_keys)
    uss = [overlap_us(r) for r in rows]
    cols = [(k, h) for k, h in OVERLAP_COLUMNS if any(k in u for u in uss)]
    body = []
    for r, u in zip(rows, uss):
        body.append([overlap_op(r), shape(r)] + [fmt_ms(u.get(k)) for k, _ in cols]
                    + [fmt_ratio(u.get("nccl_then_cublas"), u.get("tilegen_copy_engine")),
                       fmt_ratio(u.get("tilegen_copy_engine"), u.get("gemm_alone"))])
    out = [f"ms per call, M x N x K of the whole problem, TP {rows[0]['world']}; \"vs NCCL\": NCCL then cuBLAS "
           "over the copy engine, eager; \"vs GEMM alone\": the copy engine over cuBLAS GEMM alone, eager.", ""]
    return out + table(["op", "M x N x K"] + [h for _, h in cols] + ["vs NCCL", "vs GEMM alone"], body)


def render_ce_sweep(rows: list[dict], ce_keys: list[str]) -> list[str]:
    out = [f"Eager ms per call, TP {rows[0]['world']}, `ce_<style>_<splits>` per column (the fastest in bold); "
           "\"copy engine\" is what `auto` ran (the choice table of that build).", ""]
    for op in ("ag_gemm", "gemm_rs"):
        group = [r for r in rows if overlap_op(r) == op]
        keys = [k for k in ce_keys if any(k in r["us"] for r in group)]
        if not group:
            continue
        body = []
        for r in group:
            us = r["us"]
            best = min((us[k] for k in keys if k in us), default=None)
            cells = [(f"**{fmt_ms(us[k])}**" if us[k] == best else fmt_ms(us[k])) if k in us else "" for k in keys]
            body.append([op, shape(r)] + cells + [fmt_ms(us.get("tilegen_copy_engine")),
                                                  fmt_ms(us.get("nccl_then_cublas")), fmt_ms(us.get("gemm_alone"))])
        out += table(["op", "M x N x K"] + [k[3:] for k in keys]
                     + ["copy engine", "NCCL then cuBLAS", "GEMM alone"], body) + [""]
    return out[:-1]


def render_fused_tiles(data: dict) -> list[str]:
    body = []
    for i, r in enumerate(data["rows"], 1):
        name = r["op"]
        cluster = re.search(r"_c(\d+x\d+)", name)
        us = r["us"]
        body.append([str(i), f"`{name}`", " x ".join(str(t) for t in r["tile"]),
                     cluster.group(1) if cluster else "1x1", "pingpong" if "_pp" in name else "cooperative",
                     fmt(us.get("fused_all_sms")), fmt(us.get("fused_overlap_sms")), fmt(us.get("cublas")),
                     fmt_ratio(us.get("fused_all_sms"), us.get("cublas"))])
    r0 = data["rows"][0]
    note = f" Note in the data: {data['note']}." if data.get("note") else ""
    out = [f"The fused kernel alone, M {r0['M']}, N {r0['N']} per rank, K {r0['K']}, {r0['world']} ranks, "
           f"{data.get('device')} ({data.get('sms')} SMs); us per call, cuBLAS timed in turns with each row.{note}",
           ""]
    return out + table(["#", "spec", "tile", "cluster", "schedule", "fused, all SMs", "fused, the overlap's SMs",
                        "cuBLAS", "fused / cuBLAS"], body)


MOE_ROWS = [
    ("nccl_dispatch", "NCCL dispatch (all_to_all_single)"),
    ("tilegen_dispatch", "tilegen dispatch"),
    ("tilegen_dispatch_unchecked", "tilegen dispatch, unchecked"),
    ("tilegen_fp8_dispatch", "tilegen fp8 dispatch"),
    ("nccl_combine", "NCCL combine"),
    ("tilegen_combine", "tilegen combine"),
    ("tilegen_fp8_combine", "tilegen combine after the fp8 dispatch"),
    ("tilegen_ll_graph_dispatch", "low-latency dispatch, CUDA graph"),
    ("tilegen_ll_graph_combine", "low-latency combine, CUDA graph"),
    ("tilegen_fp8_ll_graph_dispatch", "low-latency fp8 dispatch, CUDA graph"),
    ("tilegen_fp8_ll_graph_combine", "low-latency combine after fp8, CUDA graph"),
    ("tilegen_ll_eager_pair", "low-latency dispatch + combine, eager"),
    ("tilegen_fp8_ll_eager_pair", "low-latency fp8 dispatch + combine, eager"),
]


def render_moe(rows: list[dict]) -> list[str]:
    r0 = rows[0]
    header = ["us per call"] + [r["case"] for r in rows]
    known = {k for k, _ in MOE_ROWS}
    extra = sorted({k for r in rows for k in r["us"]} - known)
    body = [[label] + [fmt_us(r["us"].get(k)) for r in rows] for k, label in MOE_ROWS + [(k, k) for k in extra]
            if any(k in r["us"] for r in rows)]

    def derived(label: str, f) -> None:
        cells = [f(r["us"], r) for r in rows]
        if any(cells):
            body.append([label] + cells)

    derived("dispatch vs NCCL", lambda u, r: fmt_ratio(u.get("nccl_dispatch"), u.get("tilegen_dispatch")))
    derived("fp8 dispatch vs NCCL", lambda u, r: fmt_ratio(u.get("nccl_dispatch"), u.get("tilegen_fp8_dispatch")))
    derived("combine vs NCCL", lambda u, r: fmt_ratio(u.get("nccl_combine"), u.get("tilegen_combine")))
    derived("dispatch GB/s", lambda u, r: fmt(r["bytes_to_peers"] / u["tilegen_dispatch"] / 1e3, 0)
            if "tilegen_dispatch" in u else "")
    derived("combine GB/s", lambda u, r: fmt(r["bytes_to_peers"] / u["tilegen_combine"] / 1e3, 0)
            if "tilegen_combine" in u else "")
    derived("check: rows received", lambda u, r: str(r.get("check", {}).get("recv_rows", "")))
    derived("check: combine max diff vs NCCL", lambda u, r: str(r.get("check", {}).get("combine_max_diff_vs_nccl",
                                                                                        "")))
    out = [f"{r0['world']} ranks, hidden {r0['hidden']}, top-{r0['topk']} of {r0['experts']} experts, bf16 tokens; "
           "us per call between CUDA events (a CUDA graph's replays for the graph rows), slowest rank; GB/s: the "
           "items' token bytes to other ranks over the time.", ""]
    return out + table(header, body)


AB_LINE = re.compile(r"rank (\d+): in-graph timeline of (\S+) \((\d+) tokens, (\d+) ranks, (\d+) replays;.*\): "
                     r"dispatch ([\d.]+), combine ([\d.]+)")
AB_KERNEL = re.compile(r"\s+(\w+)\s+gap\s+(-?[\d.]+)\s+kernel\s+(-?[\d.]+)")


def render_ab(folder: Path) -> list[str]:
    builds: dict[str, dict[str, list[float]]] = {}
    runs: dict[str, int] = {}
    what = None
    for path in sorted(folder.glob("*.log")):
        m = re.fullmatch(r"ab_(\w+?)_(\d+)\.log", path.name)
        build = m.group(1) if m else path.stem
        b = builds.setdefault(build, {})
        runs[build] = runs.get(build, 0) + 1
        for line in path.read_text().splitlines():
            if (h := AB_LINE.search(line)):
                what = what or f"`{h.group(2)}`, {h.group(3)} tokens, {h.group(4)} ranks, {h.group(5)} replays"
                b.setdefault("dispatch", []).append(float(h.group(6)))
                b.setdefault("combine", []).append(float(h.group(7)))
            elif (k := AB_KERNEL.match(line)):
                b.setdefault(k.group(1) + " kernel", []).append(float(k.group(3)))
                b.setdefault(k.group(1) + " gap", []).append(float(k.group(2)))
    cols = ["dispatch", "combine", "ll_push kernel", "ll_expand kernel", "ll_expand gap", "combine_send kernel",
            "combine_reduce kernel"]
    body = [[build, str(runs[build]), str(len(b.get("dispatch", [])))] + [span(b.get(c, [])) for c in cols]
            for build, b in sorted(builds.items())]
    out = [f"In-graph timeline per rank ({what}); us, min-max (median) over every rank of every round; a half's "
           "time runs from the previous graph's end; a negative gap is a kernel that starts before the one "
           "before it ends.", ""]
    return out + table(["build", "rounds", "rank medians"] + cols, body)


def render_probe(text: str) -> list[str]:
    groups: dict[tuple[int, int, int], dict[str, list[float]]] = {}  # (gpus, bytes, machine) -> values
    machine = gpus = 0
    header: list[str] = []
    for line in text.splitlines():
        if (m := re.match(r"## machine (\d+), (\d+) GPUs", line)):
            machine, gpus = int(m.group(1)), int(m.group(2))
            header = []
        elif line.startswith("how"):
            header = re.split(r"\s{2,}", line.strip())
        elif header and line.strip() and not line.startswith("#"):
            cells = dict(zip(header, line.split()))
            g = groups.setdefault((gpus, int(cells["bytes"]), machine), {})
            how = "TMA bulk stores" if cells["how"] == "tma" else f"SM stores, {cells['width']} B per lane"
            g.setdefault(how, []).append(float(cells["us"]))
            g.setdefault("GB/s", []).append(float(cells["GB/s/GPU"]))
    hows = ["SM stores, 8 B per lane", "SM stores, 16 B per lane", "TMA bulk stores"]

    def rng(v: list[float], digits: int) -> str:
        return "" if not v else f"{min(v):.{digits}f}-{max(v):.{digits}f}"

    body = [[f"{nbytes / 1024:g} KiB", str(g), str(mach)] + [rng(vals.get(h, []), 1) for h in hows]
            + [rng(vals["GB/s"], 0)] for (g, nbytes, mach), vals in sorted(groups.items(), key=lambda kv: (
                -kv[0][0], kv[0][1], kv[0][2]))]
    out = ["Each GPU writes the bytes to every GPU (itself included) at once, then its last CTA fences at system "
           "scope; us from the first CTA's start to that fence, slowest GPU, median of 15, min-max over the "
           "shapes tried (pieces, CTAs, row spread).", ""]
    return out + table(["bytes per peer", "GPUs", "machine start"] + [h + ", us" for h in hows]
                       + ["GB/s per GPU sent"], body)


HOT_PATH = [("tilegen_fused", "tilegen fused"), ("tilegen_unfused", "tilegen allreduce, then torch"),
            ("nccl", "NCCL, then torch"), ("symm_one_shot", "symm one_shot, then torch"),
            ("symm_two_shot", "symm two_shot, then torch")]
SYMM = [("torch_symm_one_shot", "symm one_shot"), ("torch_symm_two_shot", "symm two_shot")]


def eager_graph(times: dict, graph: dict, key: str) -> str:
    return f"{fmt(times.get(key))} / {fmt(graph.get(key))}" if key in times or key in graph else ""


def render_hot_path(data: dict) -> list[str]:
    """bench_hot_path.py: the fused decode step per (rows, hidden) against its unfused forms, then the allreduce
    alone by size, fast and deterministic, with NCCL and torch symmetric memory from the same run."""
    body = []
    for r in data["fused"]:
        t, g = r["times_us"], r.get("times_graph_us", {})
        others = [g[k] for k, _ in HOT_PATH[1:] if k in g]
        body.append([f"{r['rows']} x {r['hidden']}"] + [eager_graph(t, g, k) for k, _ in HOT_PATH]
                    + [fmt_ratio(min(others), g.get("tilegen_fused")) if others else ""])
    worst = max((r["max_diff_vs_nccl"].get("tilegen_fused", 0.0) for r in data["fused"]), default=0.0)
    out = [f"h = RMSNorm(residual += allreduce(y)) * w, bf16, {data.get('device')}, {data.get('world')} ranks; us per "
           "call, eager / CUDA graph; the unfused forms run the allreduce, then torch's add and RMSNorm (symmetric "
           f"memory: after copying y into its buffer). The fused output's largest difference from NCCL's: {worst:g}.",
           ""]
    out += table(["rows x hidden"] + [f"{label} us" for _, label in HOT_PATH] + ["fused vs the fastest other, graph"],
                 body)
    if not data.get("sizes"):
        return out
    fast, det = data["fast_op"], data["deterministic_op"]
    by_size: dict[int, dict[str, dict]] = {}
    for r in data["sizes"]:
        by_size.setdefault(r["bytes"], {})[r["op"]] = r
    body = []
    for size, ops in sorted(by_size.items()):
        f, d = ops.get(fast, {}), ops.get(det, {})
        t, g = f.get("times_us", {}), f.get("times_graph_us", {})
        dt, dg = d.get("times_us", {}), d.get("times_graph_us", {})
        bar = max([t[k] for k in ("nccl", "torch_symm_two_shot") if k in t], default=None)
        body.append([fmt_bytes(size), eager_graph(t, g, fast), eager_graph(dt, dg, det),
                     fmt_ratio(g.get(fast), dg.get(det)), eager_graph(t, g, "nccl")]
                    + [eager_graph(t, g, k) for k, _ in SYMM] + [fmt_ratio(bar, t.get(fast))])
    out += ["", f"The allreduce alone (`{fast}`, and `{det}` with `deterministic: true`), bf16; us per call, eager / "
            "CUDA graph; symmetric memory reduces its buffer in place (no copy in).", ""]
    return out + table(["size", f"`{fast}` us", f"`{det}` us", "deterministic speed vs fast, graph", "NCCL us"]
                       + [f"{label} us" for _, label in SYMM] + ["fast vs max(NCCL, two_shot), eager"], body)


def render_floor(data: dict) -> list[str]:
    """probe_latency_floor.cu: an empty kernel's launch, a store's one-way NVLink latency, a minimal LL exchange."""
    body = [[f"{r['ctas']} x {r['threads']}", str(r["param_bytes"]), fmt(r["eager_us"], 2), fmt(r["graph_us"], 2)]
            for r in data["launch"]]
    out = [f"{data['gpus']} x {data['device']}; us per call, median of {data.get('repeats')} repeats of "
           f"{data.get('calls')} back-to-back calls (eager, and one CUDA graph of them), slowest GPU.", "",
           "An empty kernel:", ""]
    out += table(["CTAs x threads", "parameter bytes", "eager us", "graph us"], body)
    if "nvlink_one_way_us" not in data:
        return out
    out += ["", f"One-way NVLink latency of an 8-byte store (half a ping-pong's round trip, GPU 0 and 1): "
            f"{data['nvlink_one_way_us']:.3f} us.", "",
            "A minimal LL one-shot allreduce (each GPU stores its bytes as 16-byte LL lines into every peer, polls "
            "its own buffer, sums; the flag from a device epoch):", ""]
    return out + table(["bytes", "CTAs", "eager us", "graph us"],
                       [[fmt_bytes(r["bytes"]), str(r["ctas"]), fmt(r["eager_us"], 2), fmt(r["graph_us"], 2)]
                        for r in data["exchange"]])


def render_data(run: dict) -> list[str]:
    path = DATA / run["file"]
    if path.is_dir():
        return render_ab(path)
    if path.suffix == ".txt":
        return render_probe(path.read_text())
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "fused" in data:
        return render_hot_path(data)
    if isinstance(data, dict) and "launch" in data:
        return render_floor(data)
    if isinstance(data, dict) and "us_per_call" in data:
        return render_host(data)
    if isinstance(data, dict) and data.get("rows") and "times_us" in data["rows"][0]:
        return render_collectives(data)
    if isinstance(data, dict) and data.get("rows") and "tile" in data["rows"][0]:
        return render_fused_tiles(data)
    if isinstance(data, list) and data and "tokens" in data[0]:
        return render_moe(data)
    if isinstance(data, list) and data and "case" in data[0] and "M" in data[0]:
        return render_overlap(data)
    raise SystemExit(f"{path}: no renderer for this structure")


# ---------------------------------------------------------------------------------------------- document


def load_runs(path: Path | None = None) -> list[dict]:
    path = RUNS if path is None else path
    runs = json.loads(path.read_text())
    for i, run in enumerate(runs):
        for field, types in FIELDS.items():
            if field not in run or not isinstance(run[field], types) or isinstance(run[field], bool):
                raise SystemExit(f"{path}: entry {i} ({run.get('file')}): field {field!r} missing or of a wrong type")
        if run["family"] not in FAMILIES:
            raise SystemExit(f"{path}: {run['file']}: family {run['family']!r} is not one of {sorted(FAMILIES)}")
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", run["date"]):
            raise SystemExit(f"{path}: {run['file']}: date {run['date']!r} is not YYYY-MM-DD")
        if not (DATA / run["file"]).exists():
            raise SystemExit(f"{path}: {run['file']} does not exist in {DATA}")
    return runs


def code(text: str) -> str:
    return f"`{text}`" if "`" not in text else text


def provenance(run: dict, anchors: Anchors) -> list[str]:
    def nr(v: object) -> str:
        return "not recorded" if v is None else str(v)

    name = run["file"]
    lines = [
        f"Contents: {run['what']}.",
        "",
        f"Measured {run['date']}, commit {code(run['commit']) if run['commit'] else 'not recorded'}, on "
        f"`{run['machine']}` ({run['cards']}), {run['world']} ranks; driver {nr(run['driver'])}, NCCL "
        f"{nr(run['nccl'])}, torch {nr(run['torch'])}. Command: "
        f"{code(run['command']) if run['command'] else 'not recorded'}. Data: [data/{name}](data/{name}). "
        f"Log: {anchors.link(run['section'])}.",
    ]
    plots = PLOTS.get(name, [])
    existing = [(alt, png) for alt, png in plots if (DOCS / png).exists()]
    if existing:
        lines += [""] + [f"![{alt}]({png})" for alt, png in existing]
    return lines


def render(runs: list[dict] | None = None) -> str:
    runs = load_runs() if runs is None else runs
    anchors = Anchors(LOG_DIR)
    order = list(FAMILIES)
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["family"], run["machine"], run["world"]), []).append(run)
    keys = sorted(groups, key=lambda k: (order.index(k[0]), -k[2], k[1]))

    def title(key: tuple[str, str, int]) -> str:
        return f"{FAMILIES[key[0]]}, {key[1]}, {key[2]} ranks"

    out = ["# Measurements", "",
           "The current figure of each op, per op family, machine and world size, with where it was measured.\n"
           "This file is written by `tools/report_measurements.py` from `docs/data/runs.json` and the data files\n"
           "it lists: edit those and run the script (`--check` tells whether this file is current).", "",
           "## How the figures are measured", "", METHOD, "", "## Contents", ""]
    out += [f"* [{title(k)}](#{slug(title(k))})" for k in keys]
    out += ["* [Decisions](#decisions)", ""]
    for key in keys:
        out += [f"## {title(key)}", ""]
        for run in groups[key]:
            out += [f"### {run['file']}", ""] + provenance(run, anchors) + [""] + render_data(run) + [""]
    out += ["## Decisions", "",
            "Design decisions and the measurement behind each (the data file, or the session in the log).", ""]
    for text, files, sections in DECISIONS:
        refs = [f"[data/{f}](data/{f})" for f in files]
        refs += [anchors.link(s, t) for t, s in sections]
        out.append(f"* {text} ({'; '.join(refs)})")
    out += ["", "The dated history of the measurement sessions, newest first, is in [docs/log/](log/)."]
    return "\n".join(out) + "\n"


PROVENANCE = ("date", "commit", "cards", "driver", "nccl", "torch", "command")  # what the lab records per phase


def add_run(data_file: str, provenance: Path, **fields) -> None:
    """Record docs/data/<data_file> in runs.json (replacing an earlier entry of that file): the lab's
    provenance record of the phase that wrote it (out/provenance_<phase>.json) and the given fields."""
    record = json.loads(provenance.read_text())
    missing = [k for k in PROVENANCE if k not in record]
    if missing:
        raise SystemExit(f"{provenance}: not a lab provenance record (no {', '.join(missing)})")
    entry = {"file": data_file, **fields, **{k: record[k] for k in PROVENANCE}}
    if entry["cards"] is None:
        raise SystemExit(f"{provenance}: no cards recorded (nvidia-smi listed no GPU): not a measurement")
    runs = [r for r in json.loads(RUNS.read_text()) if r["file"] != data_file] + [{k: entry[k] for k in FIELDS}]
    previous = RUNS.read_text()
    RUNS.write_text(json.dumps(runs, indent=2) + "\n")
    try:
        load_runs()
    except SystemExit:
        RUNS.write_text(previous)  # (nothing half-recorded)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the output file differs from what would be written")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write (default docs/measurements.md)")
    add = ap.add_argument_group("recording a run (then the reference is written)")
    add.add_argument("--add", metavar="FILE", help="a data file in docs/data/ to record in runs.json")
    add.add_argument("--provenance", type=Path, help="the lab's record of the phase that wrote it "
                                                      "(<out>/provenance_<phase>.json)")
    add.add_argument("--family", choices=sorted(FAMILIES))
    add.add_argument("--machine", help="the device kind, e.g. nvidia-h100-x2")
    add.add_argument("--world", type=int, help="ranks")
    add.add_argument("--what", help="one sentence: what the file holds")
    add.add_argument("--section", help="the docs/log/ heading of the session (' > ' joins nested headings)")
    args = ap.parse_args(argv)
    if args.add:
        needed = ("provenance", "family", "machine", "world", "what", "section")
        if any(getattr(args, k) is None for k in needed):
            ap.error("--add needs --" + ", --".join(needed))
        add_run(args.add, args.provenance, family=args.family, machine=args.machine, world=args.world,
                what=args.what, section=args.section)
    text = render()
    if args.check:
        current = args.out.read_bytes() if args.out.exists() else None
        if current != text.encode():
            print(f"{args.out} is not what tools/report_measurements.py writes from docs/data/runs.json: "
                  "run python3 tools/report_measurements.py", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(text.encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
