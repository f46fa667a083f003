"""What every family's checker returns (a Verdict) and the scheduling of its protocol simulations
(Interleaving): the checkers differ in what they simulate, not in how a run is chosen or reported."""
from __future__ import annotations

import random
from dataclasses import dataclass


class CheckError(Exception):
    pass


@dataclass
class Verdict:
    ok: bool
    problems: list[str]
    configs: list[str]
    ops: int = 0

    def __str__(self) -> str:
        s = (f"checker: {'OK' if self.ok else 'FAILED'} ({len(self.configs)} configurations, {self.ops} simulated "
             f"operations)")
        for c in self.configs:
            s += f"\n  checked {c}"
        for p in self.problems[:20]:
            s += f"\n  problem: {p}"
        if len(self.problems) > 20:
            s += f"\n  ... {len(self.problems) - 20} more"
        return s


class Interleaving:
    """Which ready stream a protocol simulation runs next: the first ready one (no rng), a uniformly
    random one, or (pct) the ready one of highest priority, priorities random and the chosen one's
    lowered at 3 random steps of the run: PCT, which finds races needing one rank far behind the
    others in far fewer runs than uniform choices."""

    def __init__(self, rng: random.Random | None, streams, steps: int, pct: bool = False):
        self.rng, self.pct, self.n = rng, pct, 0
        self.prio = {k: rng.random() for k in streams} if pct else {}
        self.changes = {rng.randrange(steps) for _ in range(3)} if pct else set()

    def pick(self, ready: list):
        if self.pct:
            key = max(ready, key=self.prio.__getitem__)
            if self.n in self.changes:
                self.prio[key] = -self.rng.random()
        else:
            key = self.rng.choice(ready) if self.rng else ready[0]
        self.n += 1
        return key


def entry(v: Verdict) -> dict:
    """A verdict as the verdict cache stores it."""
    return {"ok": v.ok, "problems": v.problems, "configs": v.configs, "ops": v.ops}


def from_entry(e: dict) -> Verdict:
    return Verdict(e["ok"], e["problems"], e["configs"], e["ops"])
