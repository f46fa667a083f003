"""Runs a script under a wrapper on rank 0 only (torchrun's RANK), plainly on the other ranks:
    torchrun --no-python python3 -m bench.rank0 -- ncu --section ... -- script.py [args]
Rank 0: `ncu ... python3 script.py args`; other ranks: `python3 script.py args`."""
import os
import sys


def main(argv: list[str]) -> None:
    if argv[:1] != ["--"] or "--" not in argv[1:]:
        raise SystemExit("usage: python3 -m bench.rank0 -- WRAPPER [ARGS] -- SCRIPT [ARGS]")
    cut = argv.index("--", 1)
    wrapper, script = argv[1:cut], argv[cut + 1:]
    cmd = [*wrapper, sys.executable, *script] if os.environ.get("RANK", "0") == "0" else [sys.executable, *script]
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
