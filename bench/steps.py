"""A step: one command (usually torchrun over a script) with a time limit and a log, and what of the log
to show. Phases are lists of steps; a step that hangs is killed with its process group at its limit, so
a phase always ends inside one device call."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .machine import Machine, tail

TIMED_OUT = 124  # (as timeout(1) reports it)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str            # the log's stem: <out>/<name>.log
    argv: tuple[str, ...]
    timeout_s: int
    grep: str = ""       # log lines matching this regex are shown after the step
    after: str = ""      # ... and every line from the first one matching this regex
    tail_on_failure: int = 30

    def log(self, out: Path) -> Path:
        return out / f"{self.name}.log"


def torchrun(m: Machine, *args: str, no_python: bool = False) -> tuple[str, ...]:
    return ("torchrun", "--nproc-per-node", str(m.ranks), *(("--no-python",) if no_python else ()), *args)


def execute(step: Step, m: Machine, budget: "Budget | None" = None) -> int:
    """Run the step (its output into its log), show what it asks for; the return code, TIMED_OUT when
    it was killed at its limit (or the budget's)."""
    limit = budget.cap(step.timeout_s) if budget else step.timeout_s
    if limit < 30:
        print(f"{step.name} skipped: {limit} s left of the phase's budget", flush=True)
        return TIMED_OUT
    m.out.mkdir(parents=True, exist_ok=True)
    log = step.log(m.out)
    with open(log, "w") as f:
        rc = run_bounded(list(step.argv), limit, m.env, f)
    text = log.read_text(errors="replace")
    shown = show(text, step.grep, step.after)
    if shown:
        print(shown, flush=True)
    if rc:
        end = f"; the log's end:\n{tail(log, step.tail_on_failure)}" if step.tail_on_failure > 0 else ""
        print(f"{step.name}: exit {rc}{' (TIMED OUT)' if rc == TIMED_OUT else ''}{end}", flush=True)
    return rc


def run_bounded(argv: list[str], limit_s: float, env: dict, stdout) -> int:
    """argv in a process group of its own; at the limit the whole group gets SIGTERM, then SIGKILL."""
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return TIMED_OUT


def show(text: str, grep: str = "", after: str = "") -> str:
    """The lines of `text` matching `grep`, then every line from the first match of `after` on."""
    lines = text.splitlines()
    picked = [ln for ln in lines if grep and re.search(grep, ln)]
    if after:
        start = next((i for i, ln in enumerate(lines) if re.search(after, ln)), None)
        if start is not None:
            picked += lines[start:]
    return "\n".join(picked)


class Budget:
    """Seconds left of a phase that runs several steps: each step's limit is capped by what is left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def cap(self, seconds: float) -> int:
        return int(min(seconds, self.end - time.monotonic()))
