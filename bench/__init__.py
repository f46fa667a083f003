"""tilegen's measurement lab: everything that needs GPUs, kept apart from the product (as nccl-tests is
apart from NCCL). One command line, run on the device machine from the repository root:

    python3 -m bench PHASE [RANKS] [--flags]          (tools/gpu_check.sh forwards to it)
    python3 -m bench --help | python3 -m bench PHASE --help

Phases (bench/phases.py): tests, coll, sweep, gemm, moe, tune, ab, profile, sanitize, probe,
downstream, script, quick. Each phase's options are a typed configuration (a dataclass whose fields are
its flags), not environment variables. Variants of a spec are swept by filter (bench/sweep.py), not
written one YAML per variant. The scripts the phases run live in bench/scripts/; the lab's tests in
bench/tests/ (CPU: they run the phases' plans and the sweeps, never a GPU).

The lab imports only the standard library until its phase has installed the carried wheels: the
device machine has no pydantic (tilegen's dependency) until then.
"""
