"""Turns copy-engine sweeps of bench/scripts/bench_gemm.py (--styles all --splits 1,2,3; one JSON per world
size) into the size ranges `overlap: auto` chooses by: for each op kind and world, the fastest
(style, splits) measured at each m (rows per chunk), with boundaries halfway (geometrically) between
measured sizes. Merged into tilegen/calibrations/<machine>/copy_engine/choices.json (other worlds kept).

    python bench/scripts/ce_calibrate.py bench_gemm_np2.json bench_gemm_np4.json [--machine h100-sxm-nvswitch]
"""
import argparse
import json
import math
from pathlib import Path

from tilegen.core.calibration import CALIBRATIONS_DIR


def fastest(rows: list[dict]) -> dict[tuple[str, int], list[tuple[int, str, int, float]]]:
    """(kind, world) -> [(m, style, splits, us)] of the fastest measured configuration per size."""
    out: dict[tuple[str, int], list] = {}
    for r in rows:
        kind = "gemm_rs" if r["case"].startswith("gemm_rs") else "ag_gemm"
        ce = {k: v for k, v in r["us"].items() if k.startswith("ce_") and not math.isnan(v)}
        if not ce:
            continue
        best = min(ce, key=ce.get)
        _, style, splits = best.rsplit("_", 2)
        out.setdefault((kind, r["world"]), []).append((r["M"] // r["world"], style, int(splits), ce[best]))
    return {k: sorted(v) for k, v in out.items()}


def ranges(best: list[tuple[int, str, int, float]]) -> list[list]:
    """[largest m, style, splits] rows: each measured size's choice up to the geometric midpoint to
    the next; neighbours with the same choice merged."""
    out: list[list] = []
    for i, (m, style, splits, _) in enumerate(best):
        top = int(math.sqrt(m * best[i + 1][0])) if i + 1 < len(best) else 1 << 30
        if out and out[-1][1:] == [style, splits]:
            out[-1][0] = top
        else:
            out.append([top, style, splits])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sweeps", nargs="+")
    ap.add_argument("--machine", default="h100-sxm-nvswitch")
    a = ap.parse_args()
    path = CALIBRATIONS_DIR / a.machine / "copy_engine" / "choices.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"format": 1, "choices": {}, "measured": {}}
    for sweep in a.sweeps:
        for (kind, world), best in fastest(json.loads(Path(sweep).read_text())).items():
            data["choices"].setdefault(kind, {})[str(world)] = ranges(best)
            data["measured"].setdefault(kind, {})[str(world)] = [
                {"m": m, "style": st, "splits": sp, "us": round(us, 1)} for m, st, sp, us in best]
            print(f"{kind} world {world}: " + ", ".join(f"m <= {t}: {st} x{sp}" for t, st, sp in ranges(best)))
    data["source"] = ("bench/scripts/bench_gemm.py --styles all --splits 1,2,3 (eager medians), "
                      "bench/scripts/ce_calibrate.py")
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
