"""`python3 -m bench PHASE [RANKS] [--flags] [-- script args]`: parse the phase's typed configuration,
prepare the machine (wheels, op libraries), run the phase; exit 0 when every step passed."""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

from .config import add_flags, from_args
from .machine import Machine, MachineConfig, count_gpus
from .phases import PHASES


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="phase", required=True, metavar="PHASE")
    for p in PHASES.values():
        sp = sub.add_parser(p.name, help=p.help, description=p.help)
        sp.add_argument("ranks", nargs="?", type=int, help="torchrun processes (default: every GPU, at least 2)")
        add_flags(sp, MachineConfig)
        add_flags(sp, p.config)
    return ap


def split_script(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the lab's arguments, the script's): split at the first `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script = split_script(argv)
    ns = parser().parse_args(ours)
    phase = PHASES[ns.phase]
    cfg = from_args(phase.config, ns)
    if script:
        if not phase.takes_script:
            raise SystemExit(f"phase {phase.name} takes no script (arguments after --: {' '.join(script)})")
        cfg = dataclasses.replace(cfg, script=tuple(script))
    gpus = count_gpus()
    m = Machine(ns.ranks or max(gpus, 2), gpus, from_args(MachineConfig, ns))
    m.out.mkdir(parents=True, exist_ok=True)
    if gpus:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.splitlines()
        for line in sorted(set(smi)):
            print(f"{smi.count(line):6d} {line}")
    m.setup_python()
    if phase.needs_ops and not getattr(cfg, "build_only", False) and not getattr(cfg, "list", False):
        if not m.make_ops():
            return 1
    # (docs/data/runs.json's fields for what this phase writes: tools/report_measurements.py --add reads it)
    record = m.out / f"provenance_{phase.name}.json"
    record.write_text(json.dumps(m.provenance("python3 -m bench " + " ".join(argv)), indent=1) + "\n")
    return 0 if phase.run(m, cfg) else 1
