"""Every TILEGEN_* environment setting, in one place: its name, meaning, default and parser. The rest
of tilegen reads settings only through this module; the op libraries (C++) read none themselves,
Python passes them what they need. A malformed value is a ValueError naming the variable and what
it expects. README's settings table is rendered from SETTINGS (tests/test_repo.py keeps them equal).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]
    expects: str   # what a value must be (the error names it)
    doc: str       # what it changes

    def text(self) -> str:
        """The variable as set ("" when unset)."""
        return os.environ.get(self.name, "")

    def get(self) -> Any:
        text = self.text()
        if text == "":
            return self.default
        try:
            return self.parse(text)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be {self.expects}, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError
        return text
    return parse


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError
    return text == "1"


SETTINGS = {s.name: s for s in (
    Setting("TILEGEN_WAIT_TIMEOUT_MS", None, _non_negative_float, "a number of milliseconds (>= 0)",
            "bound on every wait of a call (0: unbounded) when the call gives no timeout_ms; default: the "
            "spec's wait_timeout_ms"),
    Setting("TILEGEN_CONFIG_TIMEOUT_S", 60.0, _positive_float, "a positive number of seconds",
            "how long a Python spec config may run before generate stops it"),
    Setting("TILEGEN_CE_STYLE", None, str, "a copy-engine style of the op",
            "copy-engine overlap: the program style (ag_gemm: chunks, merged, merged_spread; gemm_rs: direct, "
            "ring); default: the op's measured choice. Must be the same on every rank"),
    Setting("TILEGEN_CE_SPLITS", None, int, "a number of splits",
            "copy-engine overlap: row splits per chunk (1-8); default: the op's measured choice. Must be the "
            "same on every rank"),
    Setting("TILEGEN_CE_EXECUTOR", "library", _one_of("library", "python"), "library or python",
            "copy-engine overlap: who runs the program (python: step by step with torch GEMMs, the reference)"),
    Setting("TILEGEN_CE_MEMOPS", True, _flag, "0 or 1",
            "copy-engine overlap: flags by CUDA stream memory operations where the device has them (0: "
            "by kernels)"),
    Setting("TILEGEN_GEMM_SMS", 0, _non_negative_int, "a number of CTAs (>= 0)",
            "fused GEMM ops: CTAs of the persistent GEMM (0: the SMs this process may fill, under MPS its share, minus "
            "the communication's)"),
)}


def get(name: str) -> Any:
    """The value of setting `name` (its default when unset)."""
    return SETTINGS[name].get()


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "1" if value else "0"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table() -> str:
    """The settings as a Markdown table (README)."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {_shown(s.default)} | {s.doc} |" for s in SETTINGS.values()]
    return "\n".join(rows)
