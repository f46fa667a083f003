"""Running a Python spec config: in a child process, bounded in time.

A config is code (as pip runs a setup.py): it may call ``sys.exit``, ``os._exit``, loop forever or
crash the interpreter. It runs in a forked child that sends back one outcome over a pipe, so that
whatever it does, tilegen reports a located error for that file and goes on with the others:
- ``("value", SPEC)``: what the config assigned to SPEC (tilegen.core.spec validates it);
- ``("invalid", errors)``: pydantic's errors from building a KernelSpec in the config, with their
  inputs as printable stand-ins;
- ``("raised", line, message)``: an exception, at the config's own line where it has one;
- ``("exit", line, code)``: SystemExit;
- ``("nospec",)``: no SPEC.
No outcome (EOF) means the child ended the process itself (``os._exit``, a signal). A child still
running after ``timeout_s`` is killed with its process group.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

SAY_AFTER_S = 2.0  # a config still running after this long is named on stderr


class Shown:
    """A value of the child's, carried back as its repr (pydantic inputs may not pickle)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _portable_errors(errors: list[dict]) -> list[dict]:
    out = []
    for e in errors:
        value = e.get("input")
        plain = isinstance(value, (int, float, str, bool, type(None)))
        out.append({"loc": tuple(e["loc"]), "msg": e["msg"], "type": e["type"],
                    "input": value if plain else Shown(repr(value)[:200])})
    return out


def _line_in(path: str, tb) -> int:
    """The last line of the config itself in a traceback (1 if none)."""
    line = 1
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _outcome(path: str) -> tuple:
    import runpy

    from pydantic import ValidationError
    try:
        ns = runpy.run_path(path, run_name="tilegen_spec")
    except ValidationError as e:
        return ("invalid", _portable_errors(e.errors()))
    except SystemExit as e:
        return ("exit", _line_in(path, e.__traceback__), e.code)
    except BaseException as e:  # noqa: BLE001 - a config's failure is reported, whatever it is
        line = e.lineno if isinstance(e, SyntaxError) and e.lineno else _line_in(path, e.__traceback__)
        return ("raised", line, f"{type(e).__name__}: {e}")
    return ("value", ns["SPEC"]) if "SPEC" in ns else ("nospec",)


def _child(path: str, conn) -> None:
    os.setpgid(0, 0)  # its own process group: a timeout kills whatever it started too
    sys.stdin = open(os.devnull)  # a config that reads stdin gets EOF, not the terminal
    try:
        outcome = _outcome(path)
    except BaseException as e:  # noqa: BLE001 - e.g. an exception whose str() raises
        outcome = ("raised", 1, f"{type(e).__name__} (while reporting the config's failure)")
    try:
        conn.send(outcome)
    except Exception as e:  # noqa: BLE001 - an outcome that does not pickle (a lambda in SPEC, say)
        if outcome[0] == "value" and isinstance(outcome[1], dict):  # its fields then say which value is wrong
            conn.send(("value", {k: v if _pickles(v) else Shown(repr(v)[:200]) for k, v in outcome[1].items()}))
        else:
            conn.send(("raised", 1, f"SPEC could not be sent back from the config: {type(e).__name__}: {e}"))
    conn.close()


def _pickles(value) -> bool:
    import pickle
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - whatever pickling raises
        return False


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.join()


def run_config(path: str, timeout_s: float) -> tuple:
    """Run the config at `path` in a child; its outcome (see the module's docstring), or
    ``("ended", exitcode)`` when it ended the process without one, or ``("timeout", timeout_s)``.
    Ctrl-C stops the child and raises KeyboardInterrupt here."""
    # fork: the child starts at once with tilegen imported; spawn where other threads could hold locks
    ctx = multiprocessing.get_context("fork" if threading.active_count() == 1 else "spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(path, send), daemon=True)
    proc.start()
    send.close()
    start, said = time.monotonic(), False
    try:
        while True:
            left = timeout_s - (time.monotonic() - start)
            if left <= 0:
                _kill(proc)
                return ("timeout", timeout_s)
            wait = min(left, SAY_AFTER_S) if not said else left
            if recv.poll(wait):
                try:
                    outcome: Any = recv.recv()
                except EOFError:  # the child ended without an outcome
                    proc.join()
                    return ("ended", proc.exitcode)
                proc.join()
                return outcome
            if not said and time.monotonic() - start >= SAY_AFTER_S:
                print(f"tilegen: running {path} (a Python config; stopped after {timeout_s:g} s) ...",
                      file=sys.stderr, flush=True)
                said = True
    except BaseException:
        _kill(proc)
        raise
    finally:
        recv.close()
