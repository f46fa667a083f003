"""A/B: one script on several builds of the ops in turns within one device call, so a kernel change is
judged against its baseline inside one run's drift. The sides: the base (.prebuilt/base.tar.xz, from
`BASE=<rev> tools/pack_prebuilt.sh`), each variant (.prebuilt/ab_<name>.tar.xz, VARIANTS="<name>=<rev>"),
then this tree's build; even rounds run them in reverse order, so a drift along a round favours none.

./generated becomes a link to each side's build in turn (not an import-path order: `python -m` and
`-c` put the working directory first, and the tree's package would shadow the base's unseen); the
tree's build is back in place afterwards, also after an interrupted earlier run."""
from __future__ import annotations

import dataclasses
import re
import shutil
import statistics
import tarfile
from pathlib import Path

from .config import option
from .machine import Machine
from .steps import Step, execute, show, torchrun

WORK = Path("/tmp/tilegen-ab")


@dataclasses.dataclass(frozen=True)
class AbConfig:
    script: tuple[str, ...] = option((), "the script and its arguments (after --)")
    rounds: int = option(2, "rounds over every side")
    grep: str = option(".", "lines of each side's log to show (regex)")
    lines: int = option(12, "at most this many shown lines per side and round")
    summary: str = option("", "a regex with one group, e.g. 'dispatch ([0-9.]+)': each side's min / median / max "
                              "of that number over every rank and round")
    timeout: int = option(120, "seconds per side and round")


def sides(prebuilt: Path = Path(".prebuilt")) -> list[tuple[str, Path]]:
    """(name, tarball) of the base and each variant, in that order."""
    found = [("base", prebuilt / "base.tar.xz")] if (prebuilt / "base.tar.xz").is_file() else []
    return found + [(p.name[len("ab_"):-len(".tar.xz")], p) for p in sorted(prebuilt.glob("ab_*.tar.xz"))]


def order(names: list[str], round_: int) -> list[str]:
    """Round 1, 3, ...: as given; round 2, 4, ...: reversed."""
    return names if round_ % 2 else names[::-1]


def restore_tree(work: Path = WORK) -> None:
    """./generated back to the tree's own build (after a run, or an interrupted one)."""
    here = Path("generated")
    if here.is_symlink():
        here.unlink()
        shutil.move(str(work / "tree" / "generated"), str(here))


def run_ab(m: Machine, cfg: AbConfig) -> bool:
    if not cfg.script:
        print("ab: name the script: python3 -m bench ab N -- script.py [args]")
        return False
    found = sides()
    if not found or found[0][0] != "base":
        print("no .prebuilt/base.tar.xz: BASE=<rev> bash tools/pack_prebuilt.sh")
        return False
    restore_tree()
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "tree").mkdir(parents=True)
    for name, tarball in found:
        with tarfile.open(tarball) as t:
            t.extractall(WORK / name)
    shutil.move("generated", str(WORK / "tree" / "generated"))
    names, ok = [n for n, _ in found] + ["tree"], True
    try:
        for r in range(1, cfg.rounds + 1):
            for side in order(names, r):
                Path("generated").symlink_to(WORK / side / "generated", target_is_directory=True)
                step = Step(f"ab_{side}_{r}", torchrun(m, *cfg.script), cfg.timeout, tail_on_failure=20)
                rc = execute(step, m)
                ok &= rc == 0
                print(f"== {side}, round {r}", flush=True)
                shown = show(step.log(m.out).read_text(errors="replace"), cfg.grep).splitlines()[:cfg.lines]
                if shown:
                    print("\n".join(shown), flush=True)
                Path("generated").unlink()
    finally:
        if Path("generated").is_symlink():
            Path("generated").unlink()
        shutil.move(str(WORK / "tree" / "generated"), "generated")
    if cfg.summary:
        print(f"== summary of '{cfg.summary}' (every rank and round): min / median / max")
        for side in names:
            text = "".join(p.read_text(errors="replace") for p in sorted(m.out.glob(f"ab_{side}_*.log")))
            print(f"  {side:<12} {summarise(cfg.summary, text)}")
    return ok


def summarise(pattern: str, text: str) -> str:
    v = [float(x) for x in re.findall(pattern, text)]
    return f"{min(v):.1f} / {statistics.median(v):.1f} / {max(v):.1f} ({len(v)} values)" if v else "no match"
