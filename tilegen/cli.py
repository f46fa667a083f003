"""Command line: validate, plan, generate, list, schema."""
from __future__ import annotations

import argparse
import json
import keyword
import os
import re
import shutil
import sys
from pathlib import Path

from .core.calibration import resolve
from .core.files import LIBRARY_COPY
from .core.spec import json_schema
from .core.spec_files import load_specs
from .core.toolchain import ARCH_PATTERN

VERDICTS = ".tilegen-verdicts.json"  # the checker's verdicts, remembered beside a generated package


def load_calibration(path: str | None):
    """--calibration: 'auto' (the committed measurements for each spec's arch), 'none', or a path."""
    if path in (None, "", "auto", "none"):
        return path or "auto"
    if not Path(path).exists():
        raise CliError(f"--calibration {path}: no such file or directory")
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


def cmd_plan(args) -> int:
    good, problems = load_specs(args.paths, allow_python=not args.no_python)
    _print_problems(problems)
    if not good:
        if not problems:
            print("no spec files found (looked for *.yaml, *.yml, *.py)", file=sys.stderr)
        return 1
    if args.svg and len(good) > 1:
        raise CliError(f"--svg draws one spec's schedule; {len(good)} specs were found")
    rc = 1 if problems else 0
    for i, ls in enumerate(good):
        if i:
            print()
        rc = max(rc, _plan_one(ls, args))
    return rc


def _plan_one(ls, args) -> int:
    from .core.family import family_of

    world = args.world if args.world is not None else ls.spec.world_sizes[0]
    if world not in ls.spec.world_sizes:
        print(f"{ls.at('world_sizes')}: world_sizes: {ls.spec.name} was specified for world sizes "
              f"{ls.spec.world_sizes}, not {world}", file=sys.stderr)
        return 1
    family = family_of(ls.spec.op)
    calibration = resolve(load_calibration(args.calibration), ls.spec.arch) if family.calibrated else None
    try:
        text, ok = family.describe(ls.spec, world, calibration, (args.svg, args.bytes) if args.svg else None)
    except ValueError as e:
        print(f"{ls.loc}: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0 if ok else 1


def package_ops(out: Path) -> set[str]:
    """The ops a generated package already holds (folders with a manifest)."""
    return {m.parent.name for m in out.glob("*/manifest.json")} if out.is_dir() else set()


def _output_problem(out: Path) -> str | None:
    """Why `-o out` cannot be the generated package, or None. Checked before anything is written."""
    name = out.resolve().name
    if not name.isidentifier():
        return (f"-o {out}: {name!r} is not a Python module name (letters, digits and _, not starting "
                f"with a digit), so the package could not be imported; choose another folder name")
    if keyword.iskeyword(name) or name in ("tilegen",) or name in sys.stdlib_module_names:
        what = "a Python keyword" if keyword.iskeyword(name) else "the name of a module it would shadow"
        return f"-o {out}: {name!r} is {what}, so `import {name}` could not load the package; choose another name"
    if out.exists() and not out.is_dir():
        return f"-o {out}: exists and is not a folder (the generated package is a folder)"
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"-o {out}: {existing} is a file, so no folder can be made below it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"-o {out}: cannot write in {existing} (permission denied)"
    lock = out / ".tilegen.lock"
    if lock.exists() and not os.access(lock, os.W_OK):
        return f"-o {out}: cannot write {lock} (permission denied)"
    return None


def cmd_generate(args) -> int:
    from .core.build import BuildError, build_package, find_toolchain, nvshmem_header_version, op_archs, package_lock
    from .core.render import CodegenError
    from .core.files import write_files
    from .core.pipeline import VerdictCache, generate_package

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
    archs = parse_archs(args.archs)
    if not args.check and not args.no_build:
        try:  # the toolchain before anything is written: a missing nvcc leaves the package as it was
            find_toolchain()
            for ls in good:
                op_archs(ls.spec, archs)
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    names = {ls.spec.name for ls in good}
    others = sorted(package_ops(out) - names)  # ops of earlier runs: kept (listed) unless --prune
    cache = VerdictCache(out / VERDICTS, writable=not args.check)
    try:
        files = generate_package(good, nvshmem_header_version(), load_calibration(args.calibration), cache,
                                 kept=() if args.prune else tuple(others), root=out)
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
                                  jobs=args.jobs, progress=not args.quiet, archs=archs)
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
        raise CliError(f"--archs: expected GPU archs like sm_90a,sm_100a, got {text!r}")
    return archs


def _check_drift(files: dict[str, str], out: Path) -> int:
    """Compare what the generator writes now with the sources in `out` (nothing is written). The
    package's copy of the library headers (_include/) is left out: every generate writes it from the
    installed tilegen, and it is not committed."""
    stale = []
    files = {rel: text for rel, text in files.items() if not rel.startswith(f"{LIBRARY_COPY}/")}
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


def _op_rows(manifests: list[Path]) -> list[dict]:
    rows = []
    for man_path in manifests:
        man = json.loads(man_path.read_text())
        bj = man_path.parent / "_build" / "build.json"
        info = json.loads(bj.read_text()) if bj.exists() else {}
        plans = man.get("summary", "?")  # (its family's words: schedules per world size, or a MoE mode)
        rows.append({"op": man["name"], "kind": man["op"], "dtype": man["spec"]["dtype"], "schedules": plans,
                     "spec_hash": man["spec_hash"], "arch": man["arch"], "built": bool(info),
                     "archs": info.get("archs", [man["arch"]]) if info else [],
                     "nvcc": info.get("nvcc"), "nvshmem": info.get("nvshmem"),
                     "tilegen": info.get("tilegen_version")})
    return rows


def cmd_list(args) -> int:
    root = Path(args.directory)
    if not root.is_dir():
        print(f"error: {root}: no such directory (a generated package is a folder written by tilegen generate)",
              file=sys.stderr)
        return 1
    manifests = sorted(root.glob("*/manifest.json"))
    if not manifests:
        print(f"error: {root}: no generated ops here (no */manifest.json)", file=sys.stderr)
        return 1
    rows = _op_rows(manifests)
    fmt = args.format or ("table" if sys.stdout.isatty() else "plain")
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return 0
    built = [f"{r['nvcc']}, {r['nvshmem'] or '?'}, {','.join(r['archs'])}" if r["built"] else f"no ({r['arch']})"
             for r in rows]
    if fmt == "plain":
        print("op\tkind\tworlds: schedules\tspec\tbuilt: nvcc, NVSHMEM, archs")
        for r, b in zip(rows, built):
            print(f"{r['op']}\t{r['kind']} {r['dtype']}\t{r['schedules']}\t{r['spec_hash'][:8]}\t{b}")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ops in {root}")
    table.add_column("op", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("worlds: schedules")  # wraps between words, never inside a name
    table.add_column("spec", no_wrap=True)
    table.add_column("built: nvcc, NVSHMEM, archs")
    for r, b in zip(rows, built):
        table.add_row(r["op"], f"{r['kind']} {r['dtype']}", r["schedules"], r["spec_hash"][:8], b)
    Console().print(table)
    return 0


class CliError(Exception):
    """A problem with the command line or the machine: printed as one line, exit status 1."""


def needs_torch(command: str) -> None:
    """bench and tune run under torchrun: say so when torch is missing, before anything else."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CliError(f"tilegen {command} times ops on GPUs and needs torch: pip install torch "
                       f"(or tilegen[torch]), then run it under torchrun") from None


def cmd_tune(args) -> int:
    if not args.build_only:
        needs_torch("tune")
    from .tune import main as tune_main
    return tune_main(args.specs, args.output, args.reps, args.build_only)


def cmd_bench(args) -> int:
    needs_torch("bench")
    from .bench import run
    return run(args.ops, args.sizes_kib, args.reps, args.out, args.plot, args.bounded_ms)


def _number(kind, least, what: str):
    """An argparse type: `kind` of `text`, at least `least`, else an error saying `what` was expected."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = _number(int, 1, "a positive integer")
non_negative_float = _number(float, 0.0, "a number >= 0")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes in KiB (e.g. 16,64,256), got {text!r}") \
            from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes in KiB, got {text!r}")
    return values


CALIBRATION_HELP = ("auto: the measurements committed for the spec's arch, if any; none: the cost model only; "
                    "or a `tilegen tune` output file or folder")
PYTHON_HELP = "refuse Python spec configs (they run as code)"
SPECS_HELP = "spec files (.yaml, .yml, .py) or folders of them (searched recursively)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="tilegen", formatter_class=fmt,
                                 description="declarative generator of multi-GPU communication kernels")
    ap.add_argument("--version", action="version", version=f"tilegen {__version__}")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    p = sub.add_parser("validate", formatter_class=fmt,
                       help="check spec files; errors as path:LINE:COL: field: message")
    p.add_argument("paths", nargs="+", metavar="SPEC", help=SPECS_HELP)
    p.add_argument("--no-python", action="store_true", help=PYTHON_HELP)
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("plan", formatter_class=fmt,
                       help="print each spec's per-rank schedule and the checker's verdict")
    p.add_argument("paths", nargs="+", metavar="SPEC", help=SPECS_HELP + "; every spec found is planned")
    p.add_argument("--world", type=positive_int, help="number of ranks (default: each spec's smallest world size)")
    p.add_argument("--bytes", type=positive_int, help="input bytes per rank the drawing shows (default: the largest)")
    p.add_argument("--svg", help="draw the schedule as a per-rank timeline (.svg or .png; one spec only)")
    p.add_argument("--calibration", default="auto", help=CALIBRATION_HELP)
    p.add_argument("--no-python", action="store_true", help=PYTHON_HELP)
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("generate", formatter_class=fmt,
                       help="write sources for every spec and build them (nvcc -rdc, ninja)")
    p.add_argument("paths", nargs="+", metavar="SPEC", help=SPECS_HELP)
    p.add_argument("-o", "--output", default="generated",
                   help="the generated package: a folder whose name is a Python module name")
    p.add_argument("-j", "--jobs", type=positive_int, help="parallel compile jobs (default: ninja's, from the CPUs)")
    p.add_argument("--no-build", action="store_true", help="write sources only")
    p.add_argument("--archs", help="GPU archs every library holds code for, e.g. sm_90a,sm_100a (default: each "
                                   "spec's arch); plans are made for the spec's")
    p.add_argument("--check", action="store_true",
                   help="write nothing; fail if the sources in -o differ from what would be written")
    p.add_argument("-q", "--quiet", action="store_true", help="no build progress")
    p.add_argument("--calibration", default="auto", help=CALIBRATION_HELP)
    p.add_argument("--prune", action="store_true",
                   help="remove the package's ops that no spec of this run generates (kept and listed otherwise)")
    p.add_argument("--no-python", action="store_true", help=PYTHON_HELP)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("tune", formatter_class=fmt,
                       help="time every schedule, CTA count and tile of specs on the GPUs (under torchrun) "
                            "into calibration files the planner uses")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="collective spec files")
    p.add_argument("-o", "--output", default="calibration", help="folder: one <op>_w<world>.json per spec")
    p.add_argument("--reps", type=positive_int, default=5, help="timed batches per configuration")
    p.add_argument("--build-only", action="store_true",
                   help="generate and build the candidate ops only (no GPU; carry .tilegen-tune to the GPU machine)")
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("bench", formatter_class=fmt,
                       help="time ops against NCCL / torch symmetric memory (under torchrun); table and plot")
    p.add_argument("ops", nargs="+", metavar="PACKAGE:OP",
                   help="package:op or package:* (e.g. generated:allreduce_bf16)")
    p.add_argument("--sizes-kib", type=int_list, default="16,64,256,1024,4096,16384,65536,262144",
                   help="input sizes per rank, KiB")
    p.add_argument("--reps", type=positive_int, default=20, help="timed calls per size")
    p.add_argument("--bounded-ms", type=non_negative_float, default=0.0,
                   help="also time bounded-wait mode with this bound (0: not)")
    p.add_argument("--out", help="results as JSON")
    p.add_argument("--plot", help="busbw plot (.png or .svg)")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("schema", formatter_class=fmt, help="JSON Schema of spec files (for editor completion)")
    p.add_argument("-o", "--output", help="write it to this file (default: standard output)")
    p.set_defaults(fn=cmd_schema)
    p = sub.add_parser("list", formatter_class=fmt, help="ops in a generated package, with provenance")
    p.add_argument("directory", nargs="?", default="generated", help="the generated package's folder")
    p.add_argument("--format", choices=("table", "plain", "json"),
                   help="table (default on a terminal), plain (tab-separated, one op a line; default otherwise) "
                        "or json")
    p.set_defaults(fn=cmd_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    """The command line. Every failure is one line on stderr, never a traceback: located spec errors,
    CliError, an OS error (permissions, a file where a folder should be), Ctrl-C."""
    import signal

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tilegen plan ... | head` ends quietly
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd is None:
        ap.print_help(sys.stderr)
        return 2
    try:
        return args.fn(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tilegen: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
