"""Combine benchmark JSONs (what `bench/scripts/bench_collectives.py --out` / `tilegen bench --out` write:
{"device", "world", "backend", "rows": [...]}) into one figure: a panel per op kind (columns) and
world size (rows of panels), busbw GB/s against the nccl-tests message size, a colour per
implementation, eager solid and CUDA-graph replayed dashed.

    python bench/scripts/plot_collectives.py r2.json r4.json -o docs/collectives.png [--latency]

--latency plots us per call (log scale) instead, the view for small messages.
"""
import argparse
import json

from tilegen.bench import plot_results


def load(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    if not isinstance(res, dict) or not {"world", "rows"} <= set(res):
        raise SystemExit(f"{path}: not a tilegen bench result (expected an object with 'world' and 'rows')")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="bench JSON files (one per world size; same sizes are merged)")
    ap.add_argument("-o", "--output", required=True, help="the figure (.png, .svg, ...)")
    ap.add_argument("--latency", action="store_true", help="us per call (log scale) instead of busbw")
    a = ap.parse_args(argv)
    plot_results([load(p) for p in a.results], a.output, a.latency)
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
