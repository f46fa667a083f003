#!/usr/bin/env bash
# The lab's command line (bench/): bash tools/gpu_check.sh PHASE [RANKS] [--flags] [-- script args]
# is python3 -m bench PHASE ...; python3 -m bench --help lists the phases, PHASE --help their flags.
cd "$(dirname "$0")/.." && exec python3 -m bench "$@"
