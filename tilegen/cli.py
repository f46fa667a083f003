"""Command line: validate, plan, generate, list, schema."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .spec import SpecError, json_schema, load_spec, load_specs


def load_calibration(path: str | None) -> dict | None:
    """Cost-model constants measured by `tilegen tune` (a JSON file), if any."""
    if not path:
        return None
    return json.loads(Path(path).read_text())["topology"]


def _print_problems(problems) -> None:
    for loc, msg in problems:
        print(f"{loc}: {msg}", file=sys.stderr)


def cmd_validate(args) -> int:
    good, problems = load_specs(args.paths)
    _print_problems(problems)
    if problems:
        print(
            f"{len(problems)} problem(s) in {len(good) + len({str(loc.path) for loc, _ in problems})} spec file(s)",
            file=sys.stderr,
        )
        return 1
    if not good:
        print("no spec files found (looked for *.yaml, *.yml, *.py)", file=sys.stderr)
        return 1
    for ls in good:
        print(f"ok  {ls.loc.path}  {ls.spec.name} ({ls.spec.op}, {ls.spec.dtype})")
    return 0


def cmd_plan(args) -> int:
    from .pipeline import plan_verdicts
    from .plan import format_plan, plan

    try:
        ls = load_spec(args.spec)
    except SpecError as e:
        _print_problems(e.problems)
        return 1
    world = args.world or ls.spec.world_sizes[0]
    try:
        p = plan(ls.spec, world, calibration=load_calibration(args.calibration))
    except ValueError as e:
        print(f"{ls.loc}: world_sizes: {e}", file=sys.stderr)
        return 1
    print(format_plan(p))
    ok = True
    for i, verdict in enumerate(plan_verdicts(p)):
        print(f"variant {i}: {verdict}")
        ok &= verdict.ok
    if args.svg:
        from .draw import draw_plan

        draw_plan(p, args.svg, shard_bytes=args.bytes)
        print(f"wrote {args.svg}")
    return 0 if ok else 1


def _generated_files(specs, package: str, calibration: dict | None = None) -> dict[str, str]:
    from .build import nvshmem_header_version
    from .pipeline import generate_package

    return generate_package(specs, package, nvshmem_header_version(), calibration)


def cmd_generate(args) -> int:
    from .build import BuildError, build_package, package_lock
    from .codegen import CodegenError
    from .files import write_files

    good, problems = load_specs(args.paths)
    _print_problems(problems)
    if problems:
        return 1
    if not good:
        print("no spec files found", file=sys.stderr)
        return 1
    out = Path(args.output)
    try:
        files = _generated_files(good, out.resolve().name, load_calibration(args.calibration))
    except CodegenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        return _check_drift(files, out)
    with package_lock(out):
        fm = write_files(files, out)
        print(f"wrote {len(fm.written)} file(s), {len(fm.unchanged)} unchanged, in {out}")
        if args.no_build:
            return 0
        try:
            built = build_package(
                out,
                [ls.spec for ls in good],
                {ls.spec.name: str(ls.loc.path) for ls in good},
                jobs=args.jobs,
                progress=not args.quiet,
            )
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"built {len(built)} step(s)" if built else "up to date: nothing rebuilt")
    return 0


def _check_drift(files: dict[str, str], out: Path) -> int:
    """Compare what the generator writes now with the sources in `out` (nothing is written)."""
    stale = []
    for rel, text in sorted(files.items()):
        p = out / rel
        if not p.exists() or p.read_text() != text:
            stale.append(rel)
    if stale:
        print(f"{out}: {len(stale)} generated file(s) differ from what the generator writes now:", file=sys.stderr)
        for rel in stale:
            print(f"  {out / rel}", file=sys.stderr)
        print("regenerate with: tilegen generate <specs> -o " + str(out), file=sys.stderr)
        return 1
    print(f"{out}: {len(files)} generated file(s) up to date")
    return 0


def cmd_schema(args) -> int:
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    root = Path(args.directory)
    table = Table(title=f"ops in {root}")
    for col in ("op", "kind", "dtype", "worlds: schedule", "spec hash", "built", "nvshmem", "arch"):
        table.add_column(col, no_wrap=True)
    found = 0
    for man_path in sorted(root.glob("*/manifest.json")):
        man = json.loads(man_path.read_text())
        bj = man_path.parent / "_build" / "build.json"
        info = json.loads(bj.read_text()) if bj.exists() else {}
        plans = ", ".join(
            f"{w}: {'/'.join(v['algorithm'] for v in vs)}"
            for w, vs in sorted(man["plans"].items(), key=lambda kv: int(kv[0]))
        )
        table.add_row(
            man["name"],
            man["op"],
            man["spec"]["dtype"],
            plans,
            man["spec_hash"][:12],
            f"nvcc {info['nvcc']}" if info else "no",
            info.get("nvshmem", man.get("nvshmem_headers") or "?"),
            man["arch"],
        )
        found += 1
    import shutil

    Console(width=max(shutil.get_terminal_size().columns, 260)).print(table)
    return 0 if found else 1


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tilegen plan ... | head` ends quietly
    ap = argparse.ArgumentParser(prog="tilegen", description="declarative generator of multi-GPU communication kernels")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="check spec files; errors as path:LINE:COL: field: message")
    p.add_argument("paths", nargs="+")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("plan", help="print a spec's per-rank schedule and the checker's verdict")
    p.add_argument("spec")
    p.add_argument("--world", type=int, help="number of ranks (default: the spec's smallest)")
    p.add_argument("--bytes", type=int, help="input bytes per rank the drawing shows (default: the largest)")
    p.add_argument("--svg", help="draw the schedule as a per-rank timeline (.svg or .png)")
    p.add_argument("--calibration", help="cost-model constants from `tilegen tune` (JSON)")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("generate", help="write sources for every spec and build them (nvcc -rdc, ninja)")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--output", default="generated")
    p.add_argument("-j", "--jobs", type=int)
    p.add_argument("--no-build", action="store_true", help="write sources only")
    p.add_argument("--check", action="store_true", help="fail if the sources in -o differ from what would be written")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--calibration", help="cost-model constants from `tilegen tune` (JSON)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("tune", help="time every schedule of a spec on the GPUs (under torchrun) and fit the cost model")
    p.add_argument("spec")
    p.add_argument("-o", "--output", default="calibration.json")
    p.add_argument("--reps", type=int, default=15)
    p.set_defaults(fn=lambda a: __import__("tilegen.tune", fromlist=["tune"]).tune(a.spec, a.output, a.reps))
    p = sub.add_parser("bench", help="time ops against NCCL / torch symmetric memory (under torchrun); table and plot")
    p.add_argument("ops", nargs="+", help="package:op or package:* (e.g. generated:allreduce_bf16)")
    p.add_argument("--sizes-kib", default="16,64,256,1024,4096,16384,65536,262144")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--bounded-ms", type=float, default=0.0, help="also time bounded-wait mode with this bound")
    p.add_argument("--out", help="results as JSON")
    p.add_argument("--plot", help="busbw plot (.png or .svg)")
    p.set_defaults(
        fn=lambda a: __import__("tilegen.bench", fromlist=["run"]).run(
            a.ops, [int(s) for s in a.sizes_kib.split(",")], a.reps, a.out, a.plot, a.bounded_ms
        )
    )
    p = sub.add_parser("schema", help="JSON Schema of spec files (for editor completion)")
    p.add_argument("-o", "--output")
    p.set_defaults(fn=cmd_schema)
    p = sub.add_parser("list", help="ops in a generated package, with provenance")
    p.add_argument("directory", nargs="?", default="generated")
    p.set_defaults(fn=cmd_list)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
