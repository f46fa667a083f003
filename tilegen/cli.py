"""Command line: validate, plan, generate, list, schema."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from .calibration import resolve
from .registry import MOE_OPS
from .spec import json_schema, load_specs
from .toolchain import ARCH_PATTERN

VERDICTS = ".tilegen-verdicts.json"  # the checker's verdicts, remembered beside a generated package


def load_calibration(path: str | None):
    """--calibration: 'auto' (the committed measurements for each spec's arch), 'none', or a path."""
    if path in (None, "", "auto", "none"):
        return path or "auto"
    if not Path(path).exists():
        raise SystemExit(f"--calibration {path}: no such file or directory")
    return path


def _print_problems(problems) -> None:
    for loc, msg in problems:
        print(f"{loc}: {msg}", file=sys.stderr)


def cmd_validate(args) -> int:
    good, problems = load_specs(args.paths, allow_python=not args.no_python)
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


def _plan_moe(ls, world: int) -> int:
    """A MoE op has no schedule: its layout at this world size and tilegen.moe's verdict on it."""
    from .pipeline import moe_problems
    s = ls.spec
    if world not in s.world_sizes:
        print(f"{ls.loc}: world_sizes: {s.name} was specified for world sizes {s.world_sizes}, not {world}",
              file=sys.stderr)
        return 1
    tokens, hidden = s.max_shape
    print(f"op {s.name}: moe {s.dtype}, {s.moe_mode} mode, world {world}: {s.experts} experts, "
          f"{s.experts // world} per rank, top-{s.topk}, up to {tokens} tokens of {hidden} per rank")
    into = ("rows per local expert, source, token, slot" if s.moe_mode == "normal"
            else f"fixed segments of {tokens} rows per (local expert, source)")
    wait = "wait for the counts on the host, " if s.moe_mode == "normal" else ""
    print(f"  dispatch: route, push each token once per destination rank into its staging segment there, "
          f"{wait}expand into {into}")
    print("  combine: per staging row, the weighted sum of its local items (fp32, slot order) sent back in "
          f"{s.dtype}; each token's rank sums them in rank order")
    print(f"  symmetric memory: {s.moe_symmetric_bytes(world)} bytes")
    problems = moe_problems(world, s.experts, s.topk, s.moe_mode)
    print("MoE check (layout, random/dropped/one-expert/sparse routings, flag protocol over 3 calls): "
          + ("ok" if not problems else "FAILED\n  " + "\n  ".join(problems[:10])))
    return 0 if not problems else 1


def cmd_plan(args) -> int:
    from .pipeline import plan_verdicts
    from .plan import format_plan, plan

    good, problems = load_specs([args.spec], allow_python=not args.no_python)
    if problems or not good:
        _print_problems(problems)
        return 1
    ls = good[0]
    world = args.world if args.world is not None else ls.spec.world_sizes[0]
    if ls.spec.op in MOE_OPS:
        return _plan_moe(ls, world)
    try:
        p = plan(ls.spec, world, calibration=resolve(load_calibration(args.calibration), ls.spec.arch))
    except ValueError as e:
        print(f"{ls.loc}: world_sizes: {e}", file=sys.stderr)
        return 1
    print(format_plan(p))
    ok = True
    for i, verdict in enumerate(plan_verdicts(p)):
        print(f"variant {i}: {verdict}")
        ok &= verdict.ok
    if p.spec.overlap_style == "copy_engine":
        from .pipeline import copy_engine_verdict
        verdict = copy_engine_verdict(p.spec.op, p.world)
        print(f"copy-engine program (the overlap this op runs): {verdict}")
        ok &= verdict.ok
    if args.svg:
        from .draw import draw_plan

        draw_plan(p, args.svg, shard_bytes=args.bytes)
        print(f"wrote {args.svg}")
    return 0 if ok else 1


def package_ops(out: Path) -> set[str]:
    """The ops a generated package already holds (folders with a manifest)."""
    return {m.parent.name for m in out.glob("*/manifest.json")} if out.is_dir() else set()


def _output_problem(out: Path) -> str | None:
    if out.exists() and not out.is_dir():
        return f"-o {out}: exists and is not a directory (the generated package is a folder)"
    if not out.resolve().name.isidentifier():
        return (f"-o {out}: {out.resolve().name!r} is not a Python module name (letters, digits and _, not starting "
                f"with a digit), so the package could not be imported; choose another folder name")
    return None


def cmd_generate(args) -> int:
    from .build import BuildError, build_package, nvshmem_header_version, package_lock
    from .codegen import CodegenError
    from .files import write_files
    from .pipeline import VerdictCache, generate_package

    good, problems = load_specs(args.paths, allow_python=not args.no_python)
    _print_problems(problems)
    if problems:
        return 1
    if not good:
        print("no spec files found", file=sys.stderr)
        return 1
    out = Path(args.output)
    problem = _output_problem(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    names = {ls.spec.name for ls in good}
    others = sorted(package_ops(out) - names)  # ops of earlier runs: kept (listed) unless --prune
    cache = VerdictCache(out / VERDICTS, writable=not args.check)
    try:
        files = generate_package(good, nvshmem_header_version(), load_calibration(args.calibration), cache,
                                 kept=() if args.prune else tuple(others))
    except CodegenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        return _check_drift(files, out)
    with package_lock(out, say=lambda m: print(m, file=sys.stderr)):
        cache.save()
        fm = write_files(files, out)
        print(f"wrote {len(fm.written)} file(s), {len(fm.unchanged)} unchanged, in {out}")
        if others and args.prune:
            for name in others:
                shutil.rmtree(out / name)
            print(f"removed {len(others)} op(s) no spec of this run generates: {', '.join(others)}")
        elif others:
            print(f"kept {len(others)} op(s) of earlier runs that no spec of this run generates: {', '.join(others)} "
                  f"(--prune removes them)")
        if args.no_build:
            return 0
        try:
            built = build_package(out, [ls.spec for ls in good], {ls.spec.name: str(ls.loc.path) for ls in good},
                                  jobs=args.jobs, progress=not args.quiet, archs=parse_archs(args.archs))
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"built {len(built)} step(s)" if built else "up to date: nothing rebuilt")
    return 0


def parse_archs(text: str | None) -> list[str] | None:
    """--archs sm_90a,sm_100a -> ['sm_90a', 'sm_100a'] (checked like a spec's arch)."""
    if not text:
        return None
    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(ARCH_PATTERN, a)]
    if bad or not archs:
        raise SystemExit(f"--archs: expected GPU archs like sm_90a,sm_100a, got {text!r}")
    return archs


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
    if not root.is_dir():
        print(f"error: {root}: no such directory (a generated package is a folder written by tilegen generate)",
              file=sys.stderr)
        return 1
    manifests = sorted(root.glob("*/manifest.json"))
    if not manifests:
        print(f"error: {root}: no generated ops here (no */manifest.json)", file=sys.stderr)
        return 1
    table = Table(title=f"ops in {root}")
    table.add_column("op", no_wrap=True)
    table.add_column("kind", overflow="fold")
    table.add_column("worlds: schedules", overflow="fold")
    table.add_column("spec", no_wrap=True)
    table.add_column("built: nvcc, NVSHMEM, arch", overflow="fold")
    for man_path in manifests:
        man = json.loads(man_path.read_text())
        bj = man_path.parent / "_build" / "build.json"
        info = json.loads(bj.read_text()) if bj.exists() else {}
        plans = ", ".join(f"{w}: {'/'.join(v['algorithm'] for v in vs)}"
                          for w, vs in sorted(man["plans"].items(), key=lambda kv: int(kv[0])))
        if man.get("moe"):  # no schedules: its mode and routing
            moe = man["moe"]
            plans = f"{moe['mode']}: top-{moe['topk']} of {moe['experts']} experts"
        built = (f"{info['nvcc']}, {info.get('nvshmem', '?')}, {info.get('arch', man['arch'])}" if info
                 else f"no ({man['arch']})")
        table.add_row(man["name"], f"{man['op']} {man['spec']['dtype']}", plans, man["spec_hash"][:8], built)
    Console(width=min(shutil.get_terminal_size((100, 24)).columns, 100)).print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tilegen plan ... | head` ends quietly
    ap = argparse.ArgumentParser(prog="tilegen", description="declarative generator of multi-GPU communication kernels")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate", help="check spec files; errors as path:LINE:COL: field: message")
    p.add_argument("paths", nargs="+")
    p.add_argument("--no-python", action="store_true", help="refuse Python spec configs (they run as code)")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("plan", help="print a spec's per-rank schedule and the checker's verdict")
    p.add_argument("spec")
    p.add_argument("--world", type=int, help="number of ranks (default: the spec's smallest)")
    p.add_argument("--bytes", type=int, help="input bytes per rank the drawing shows (default: the largest)")
    p.add_argument("--svg", help="draw the schedule as a per-rank timeline (.svg or .png)")
    p.add_argument("--calibration", default="auto",
                   help="auto (the measurements committed for the spec's arch, if any), none (cost model only), "
                        "or a `tilegen tune` output file / directory")
    p.add_argument("--no-python", action="store_true", help="refuse Python spec configs (they run as code)")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("generate", help="write sources for every spec and build them (nvcc -rdc, ninja)")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--output", default="generated")
    p.add_argument("-j", "--jobs", type=int)
    p.add_argument("--no-build", action="store_true", help="write sources only")
    p.add_argument("--archs", help="GPU archs every library holds code for, e.g. sm_90a,sm_100a (default: the "
                                   "spec's arch); plans are made for the spec's")
    p.add_argument("--check", action="store_true", help="fail if the sources in -o differ from what would be written")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--calibration", default="auto",
                   help="auto (the measurements committed for the spec's arch, if any), none (cost model only), "
                        "or a `tilegen tune` output file / directory")
    p.add_argument("--prune", action="store_true",
                   help="remove the package's ops that no spec of this run generates (kept and listed otherwise)")
    p.add_argument("--no-python", action="store_true", help="refuse Python spec configs (they are code)")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("tune", help="time every schedule, CTA count and tile of specs on the GPUs (under torchrun) "
                                    "into calibration files the planner uses")
    p.add_argument("specs", nargs="+")
    p.add_argument("-o", "--output", default="calibration", help="directory: one <op>_w<world>.json per spec")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--build-only", action="store_true",
                   help="generate and build the candidate ops only (no GPU; carry .tilegen-tune to the GPU machine)")
    p.set_defaults(fn=lambda a: __import__("tilegen.tune", fromlist=["main"]).main(a.specs, a.output, a.reps,
                                                                                   a.build_only))
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
