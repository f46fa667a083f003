"""The lab's phases. Each is a typed configuration and a function of (machine, configuration) that runs
steps and returns whether every step passed. Each fits one 10-minute device call; chain calls while the
machine is warm. With fewer GPUs than ranks the ranks share them under CUDA MPS: protocol checks only."""
from __future__ import annotations

import collections
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

from . import ab, sweep as sweeps
from .config import option
from .machine import Machine
from .steps import Budget, Step, execute, torchrun

SCRIPTS = Path(__file__).parent / "scripts"
COLLECTIVE_SPECS = ("specs/allgather_bf16.yaml", "specs/reduce_scatter_bf16.yaml", "specs/allreduce_bf16.yaml",
                    "specs/all_to_all_bf16.yaml", "specs/broadcast_f32.yaml")
# (-lpthread: the latency probe's host threads link on a glibc older than 2.34 too)
PROBE_NVCC_FLAGS = ("-O3", "-std=c++17", "-gencode", "arch=compute_90a,code=sm_90a", "-lpthread")


def script(name: str) -> str:
    return str(SCRIPTS / name)


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    config: type
    run: Callable[[Machine, object], bool]
    help: str
    needs_ops: bool = True       # the op libraries are made (unpacked or built) first
    takes_script: bool = False   # trailing arguments are a script and its arguments


# ---- tests ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TestsConfig:
    select: str = option("tests/gpu", "pytest arguments: paths, -k expressions")
    timeout: int = option(540, "seconds for the whole pytest run")


def gpu_tests(m: Machine, cfg: TestsConfig) -> bool:
    # faulthandler: a test still running after 150 s dumps every thread's stack into the log (where a hang waits)
    step = Step(f"gpu_tests_np{m.ranks}", torchrun(m, "-m", "pytest", *shlex.split(cfg.select), "-q",
                                                    "-p", "no:cacheprovider", "-o", "faulthandler_timeout=150"),
                cfg.timeout, tail_on_failure=0)
    with m.sharing_gpus():
        rc = execute(step, m)
    text = step.log(m.out).read_text(errors="replace")
    print(test_summary(text, m.ranks, rc), flush=True)
    return rc == 0


def test_summary(text: str, ranks: int, rc: int) -> str:
    """Each distinct failure line once (at most 40), then pytest's last tally."""
    failure = r"^(FAILED|ERROR)|Error|error:|Timeout \(0:|ending the run"
    bad = sorted({ln for ln in text.splitlines() if re.search(failure, ln) and not ln.startswith("E  ")})
    tallies = [ln for ln in text.splitlines() if re.search(r"[0-9]+ (passed|failed|skipped|errors?)\b", ln)]
    last = tallies[-1] if tallies else "no tally"
    return "\n".join([*bad[:40], f"== gpu tests at {ranks} ranks: {last}{' (TIMED OUT)' if rc == 124 else ''}"])


def quick(m: Machine, cfg: TestsConfig) -> bool:
    """GPU tests at 2 ranks, then at every GPU when there are more than 2."""
    ok = gpu_tests(m.with_ranks(2), cfg)
    if m.gpus > 2:
        ok &= gpu_tests(m.with_ranks(m.gpus), cfg)
    return ok


# ---- collectives ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CollConfig:
    graph: bool = option(True, "also replay each op in a CUDA graph")
    reps: int = option(20, "eager batches per size")
    host: bool = option(True, "then the host cost of an eager call (wrapper, binding + launch, NCCL)")
    timeout: int = option(420, "seconds for the collective benchmark")


def coll(m: Machine, cfg: CollConfig) -> bool:
    args = ["--out", f"{m.out}/bench_collectives_np{m.ranks}.json", "--plot", f"{m.out}/collectives_np{m.ranks}.png"]
    args += ["--reps", str(cfg.reps)] + ([] if cfg.graph else ["--no-graph"])
    steps = [Step(f"bench_collectives_np{m.ranks}", torchrun(m, script("bench_collectives.py"), *args), cfg.timeout,
                  grep="^graph capture of", after="ranks on ")]
    if cfg.host:
        steps.append(Step(f"bench_host_np{m.ranks}", torchrun(m, script("bench_host.py"), "--out",
                                                              f"{m.out}/bench_host_np{m.ranks}.json"), 120,
                          grep="^(host cost|torch.Tensor has|no NCCL)"))
    with m.sharing_gpus():
        return all([execute(s, m) == 0 for s in steps])


@dataclasses.dataclass(frozen=True)
class HotConfig:
    reps: int = option(20, "eager batches per figure")
    sizes: bool = option(True, "also the allreduce alone at every size, fast and deterministic")
    timeout: int = option(540, "seconds for the benchmark")


def hot(m: Machine, cfg: HotConfig) -> bool:
    """The decode hot path (bench/scripts/bench_hot_path.py): AR + residual + RMSNorm at decode sizes, fused and
    not, and the allreduce alone by size, against NCCL and torch symmetric memory; plot_hot_path.py draws it."""
    args = ["--out", f"{m.out}/bench_hot_path_np{m.ranks}.json", "--reps", str(cfg.reps)]
    args += [] if cfg.sizes else ["--skip-sizes"]
    with m.sharing_gpus():
        return execute(Step(f"bench_hot_path_np{m.ranks}", torchrun(m, script("bench_hot_path.py"), *args),
                            cfg.timeout, grep="^(m |torch symmetric memory unavailable)"), m) == 0


# ---- sweeps --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepConfig:
    sweep: str = option("allgather", "which sweep (bench/sweep.py)", choices=tuple(sweeps.SWEEPS))
    filter: tuple[str, ...] = option((), "axis=label|label,... (several: any matches; none: the sweep's defaults)")
    list: bool = option(False, "list the chosen variants and what tilegen refuses, run nothing")
    build_only: bool = option(False, "generate and build the variants here (the CPU machine: tools/pack_prebuilt.sh "
                                     "then carries them), run nothing")
    budget: int = option(570, "seconds for building and timing together")


def sweep(m: Machine, cfg: SweepConfig) -> bool:
    sw = sweeps.SWEEPS[cfg.sweep]
    chosen = sweeps.select(sw, cfg.filter)
    paths = sweeps.write_specs(chosen, m.out / "sweep_specs" / sw.name, sw)
    refused = sweeps.refused(paths)
    for v in chosen:
        print(f"{v.name:<40} {'refused: ' + refused[v.name] if v.name in refused else 'ok'}")
    if cfg.list:
        return True
    for name in refused:
        (m.out / "sweep_specs" / sw.name / f"{name}.yaml").unlink()
    if len(refused) == len(chosen):
        print("no variant left to run")
        return False
    budget = Budget(cfg.budget)
    prebuilt = Path(f".prebuilt/{sw.package}.tar.xz")
    if prebuilt.is_file():  # (sources, manifests and libraries built on the CPU machine: generate finds them current)
        subprocess.run(["tar", "-xJf", str(prebuilt)], check=True)
    build = Step(f"generate_{sw.package}", (sys.executable, "-m", "tilegen.cli", "generate",
                                            str(m.out / "sweep_specs" / sw.name), "-o", sw.package, "-j", "32", "-q"),
                 1800 if cfg.build_only else cfg.budget)
    if execute(build, m, None if cfg.build_only else budget) or cfg.build_only:
        return cfg.build_only and Path(sw.package).is_dir()
    if sw.name == "allgather":
        args = ["--ops", f"generated:allgather_bf16,{sw.package}:*",
                "--out", f"{m.out}/sweep_allgather_np{m.ranks}.json"]
        show = dict(grep="^graph capture of", after="ranks on ")
    else:
        args = ["--pkg", sw.package, "--out", f"{m.out}/sweep_fused_np{m.ranks}.json"]
        show = dict(grep=r"tile \[")
    with m.sharing_gpus():
        return execute(Step(f"sweep_{sw.name}_np{m.ranks}", torchrun(m, script(sw.script), *args), cfg.budget,
                            **show), m, budget) == 0


# ---- GEMM + communication, MoE ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GemmConfig:
    styles: str = option("", "copy-engine styles to sweep ('all': the sweep bench/scripts/ce_calibrate.py reads)")
    splits: str = option("", "copy-engine splits to sweep, e.g. 1,2,3")
    mlp: bool = option(True, "then the TP MLP example")


def gemm(m: Machine, cfg: GemmConfig) -> bool:
    args = ["--graph", "--out", f"{m.out}/bench_gemm_np{m.ranks}.json"]
    args += ["--styles", cfg.styles] if cfg.styles else []
    args += ["--splits", cfg.splits] if cfg.splits else []
    steps = [Step(f"bench_gemm_np{m.ranks}", torchrun(m, script("bench_gemm.py"), *args), 360,
                  grep="unavailable|^graph", after="^ag_gemm")]
    if cfg.mlp:
        steps.append(Step(f"tp_mlp_np{m.ranks}", torchrun(m, "examples/tp_mlp.py", "--graph"), 240, grep="^TP MLP"))
    with m.sharing_gpus():
        return all([execute(s, m) == 0 for s in steps])


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    low_latency: bool = option(False, "the decode-sized case alone (bf16 and fp8, CUDA graphs) and each kernel's "
                                      "in-graph time")
    tokens: int = option(128, "tokens per rank of the low-latency case")
    trace: bool = option(False, "with --low-latency: when each CTA reached each phase (rank 0)")


def moe(m: Machine, cfg: MoeConfig) -> bool:
    if not cfg.low_latency:  # the NCCL baseline checked against tilegen.moe.check's reference, then timed
        steps = [Step(f"bench_moe_np{m.ranks}", torchrun(m, script("bench_moe.py"), "--out",
                                                         f"{m.out}/bench_moe_np{m.ranks}.json"), 300,
                      grep="^(NCCL baseline|normal|low latency|  tilegen|tilegen op)"),
                 Step(f"moe_layer_np{m.ranks}", torchrun(m, "examples/moe_layer.py"), 200, grep="^MoE layer")]
    else:
        steps = [Step(f"bench_moe_ll_np{m.ranks}", torchrun(m, script("bench_moe.py"), "--tokens", str(cfg.tokens),
                                                            "--out", f"{m.out}/bench_moe_ll_np{m.ranks}.json"), 150,
                      grep="^(low latency|  tilegen|tilegen op)")]
        steps += [Step(f"profile_{op}", torchrun(m, script("profile_moe.py"), "--tokens", str(cfg.tokens), "--op", op,
                                                 *(["--trace"] if cfg.trace else [])), 90,
                       grep="in-graph timeline|^rank 0: phase stamps|^ +(dispatch|combine|cta)")
                  for op in ("moe_bf16_ll", "moe_bf16_fp8_ll")]
    with m.sharing_gpus():
        return all([execute(s, m) == 0 for s in steps])


# ---- tuning --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TuneConfig:
    specs: tuple[str, ...] = option(COLLECTIVE_SPECS, "the specs to tune")
    calibration: str = option("", "calibrate: also copy the measurements into tilegen/calibrations/<this>, "
                                  "rebuild the specs with them, then run tests and coll")


def tune(m: Machine, cfg: TuneConfig) -> bool:
    """tilegen tune at N ranks into <out>/calibration (tune's candidates prebuilt: .prebuilt/tune.tar.xz)."""
    if Path(".prebuilt/tune.tar.xz").is_file():
        subprocess.run(["tar", "-xJf", ".prebuilt/tune.tar.xz"], check=True)
    step = Step(f"tune_np{m.ranks}", torchrun(m, "-m", "tilegen.cli", "tune", *cfg.specs, "-o", f"{m.out}/calibration"),
                560, grep=r"^(?!\s+skip).*(us|GB/s|range|->|chose)")
    with m.sharing_gpus():
        ok = execute(step, m) == 0
        if not (ok and cfg.calibration):
            return ok
        committed = Path("tilegen/calibrations") / cfg.calibration
        for f in (m.out / "calibration").glob("*.json"):
            (committed / f.name).write_bytes(f.read_bytes())
            (m.out / "committed").mkdir(exist_ok=True)
            (m.out / "committed" / f.name).write_bytes(f.read_bytes())
        rebuilt = execute(Step("generate_calibrated", (sys.executable, "-m", "tilegen.cli", "generate", *cfg.specs,
                                                       "-o", "generated", "-j", "64", "-q"), 300), m) == 0
        return rebuilt and gpu_tests(m, TestsConfig()) and coll(m, CollConfig())


# ---- diagnostics ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScriptConfig:
    script: tuple[str, ...] = option((), "the script and its arguments")
    timeout: int = option(300, "seconds")


def run_script(m: Machine, cfg: ScriptConfig) -> bool:
    """Any script under torchrun in the lab's environment (diagnostics); its output is shown whole."""
    with m.sharing_gpus():
        rc = execute(Step("script", torchrun(m, *cfg.script), cfg.timeout, after=".", tail_on_failure=0), m)
    return rc == 0


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    kernel: str = option(".", "regex of the kernel names to profile")
    script: tuple[str, ...] = option((), "the script and its arguments")
    skip: int = option(3, "launches of matching kernels skipped before profiling")
    count: int = option(1, "launches profiled")
    sections: tuple[str, ...] = option(("SpeedOfLight", "LaunchStats", "Occupancy", "WarpStateStats",
                                        "MemoryWorkloadAnalysis", "SchedulerStats"), "ncu sections")
    metrics: str = option("", "extra ncu metrics, e.g. nvltx__bytes.sum,nvlrx__bytes.sum,gpu__time_duration.sum")
    timeout: int = option(300, "seconds")


def profile(m: Machine, cfg: ProfileConfig) -> bool:
    """Nsight Compute on rank 0, the other ranks plain (they wait for rank 0's replays). A kernel that
    writes peers is replayed as is (peer memory is not restored): profile idempotent ones."""
    ncu = ("ncu", "--clock-control", "none", "--kernel-name", f"regex:{cfg.kernel}", "--launch-skip", str(cfg.skip),
           "--launch-count", str(cfg.count), *[a for s in cfg.sections for a in ("--section", s)],
           *(("--metrics", cfg.metrics) if cfg.metrics else ()))
    argv = torchrun(m, sys.executable, "-m", "bench.rank0", "--", *ncu, "--", *cfg.script, no_python=True)
    with m.sharing_gpus():
        return execute(Step(f"profile_np{m.ranks}", argv, cfg.timeout, after=".", tail_on_failure=0), m) == 0


@dataclasses.dataclass(frozen=True)
class SanitizeConfig:
    tools: tuple[str, ...] = option(("memcheck", "racecheck"), "compute-sanitizer tools")
    timeout: int = option(280, "seconds per tool")


def sanitize(m: Machine, cfg: SanitizeConfig) -> bool:
    """compute-sanitizer over one op of each family (bench/scripts/sanitize_ops.py), checked calls; every
    rank's report must be clean. Sanitized kernels of ranks sharing a GPU do not run concurrently (their
    waits never end): one GPU per rank only."""
    if m.shared:
        print(f"sanitize needs one GPU per rank: {m.ranks} ranks, {m.gpus} GPU(s)")
        return False
    ok = True
    for tool in cfg.tools:
        argv = torchrun(m, "compute-sanitizer", "--tool", tool, "--error-exitcode", "9", "--print-limit", "20",
                        sys.executable, script("sanitize_ops.py"), no_python=True)
        step = Step(f"sanitize_{tool}_np{m.ranks}", argv, cfg.timeout, tail_on_failure=0)
        rc = execute(step, m)
        ok &= rc == 0
        print(f"== {tool} at {m.ranks} ranks: {'clean' if rc == 0 else f'exit {rc}'}")
        print(count_lines(step.log(m.out), r"ERROR SUMMARY|sanitize_ops|Error|Timeout"))
    return ok


def count_lines(log: Path, pattern: str) -> str:
    """Each distinct line matching `pattern`, with how often it came (at most 20)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if re.search(pattern, ln)]
    return "\n".join(f"{n:7d} {ln}" for ln, n in sorted(collections.Counter(lines).items())[:20])


PROBES = {"stores": "probe_nvlink_stores", "latency": "probe_latency_floor"}


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    probes: tuple[str, ...] = option(tuple(PROBES), "which CUDA probes: stores (NVLink store rates at the MoE "
                                     "push's sizes), latency (launch, NVLink one-way and LL exchange floors)")
    repeats: int = option(15, "repeats per figure (medians)")


def probe_outputs(name: str, gpus: int, m: Machine) -> tuple[str, ...]:
    """The latency probe's calls per figure and its JSON result (for docs/data/); the store probe prints a table."""
    return ("50", str(m.out / f"probe_latency_floor_{gpus}.json")) if name == "latency" else ()


def probe(m: Machine, cfg: ProbeConfig) -> bool:
    """CUDA programs, no ops: NVLink store rates at the low-latency MoE push's sizes, and the latency floors a
    small allreduce sits on (launch, a store's one-way NVLink latency, a minimal LL exchange), at N GPUs and 2."""
    unknown = sorted(set(cfg.probes) - set(PROBES))
    if unknown:
        print(f"probe: unknown probe(s) {unknown}; expected some of {sorted(PROBES)}")
        return False
    Path("build").mkdir(exist_ok=True)
    n = min(m.gpus, m.ranks)
    ok = True
    for name in cfg.probes:
        exe = f"build/{PROBES[name]}"
        if execute(Step(f"{PROBES[name]}_build", ("nvcc", *PROBE_NVCC_FLAGS, script(f"{PROBES[name]}.cu"), "-o", exe),
                        300), m):
            ok = False
            continue
        least = 2 if name == "stores" else 1  # (the latency probe's launch floors need one GPU, its others two)
        counts = [g for g in sorted({n, 2}, reverse=True) if least <= g <= n]
        if not counts:
            print(f"probe {name}: needs {least} GPUs, this machine has {n}: skipped")
        ok &= all([execute(Step(f"{PROBES[name]}_{g}", (exe, str(g), str(cfg.repeats), *probe_outputs(name, g, m)),
                                200, after="."), m) == 0 for g in counts])
    return ok


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    timeout: int = option(240, "seconds")


def downstream(m: Machine, cfg: DownstreamConfig) -> bool:
    """examples/downstream's app from its carried wheel (.whl/tp_app-*.whl), no LD_LIBRARY_PATH: as users run it."""
    if subprocess.run([sys.executable, "-c", "import tp_app"], env=m.env, capture_output=True).returncode:
        print("tp_app wheel not installed (pip wheel examples/downstream -w .whl)")
        return False
    env_without = dict(m.env)
    env_without.pop("LD_LIBRARY_PATH", None)
    plain = m.with_ranks(m.ranks)
    plain.env = env_without
    with plain.sharing_gpus():
        return execute(Step(f"downstream_np{m.ranks}", torchrun(plain, "-m", "tp_app"), cfg.timeout,
                            grep="^(tp_app|allreduce_bf16|mlp_)|Error"), plain) == 0


def ab_phase(m: Machine, cfg: ab.AbConfig) -> bool:
    with m.sharing_gpus():
        return ab.run_ab(m, cfg)


PHASES = {p.name: p for p in (
    Phase("quick", TestsConfig, quick, "GPU tests at 2 ranks, then at every GPU (when more than 2)"),
    Phase("tests", TestsConfig, gpu_tests, "GPU tests at N ranks (--select: paths, -k)"),
    Phase("coll", CollConfig, coll, "collective benchmark (eager + CUDA graph, NCCL, symmetric memory), host cost"),
    Phase("hot", HotConfig, hot, "decode hot path: AR + residual + RMSNorm fused and not, the allreduce by size "
          "(fast, deterministic), NCCL and symmetric memory beside them"),
    Phase("sweep", SweepConfig, sweep, "variants of a spec by filter (tile, cluster, CTAs, sync, schedule), timed"),
    Phase("gemm", GemmConfig, gemm, "GEMM + communication benchmarks and the TP MLP example"),
    Phase("moe", MoeConfig, moe, "MoE dispatch/combine against the NCCL baseline, the MoE layer example"),
    Phase("tune", TuneConfig, tune, "tilegen tune of the collective specs (--calibration: commit, rebuild, test)"),
    Phase("ab", ab.AbConfig, ab_phase, "a script on the base, variant and tree builds in turns", takes_script=True),
    Phase("profile", ProfileConfig, profile, "Nsight Compute on rank 0 over a script", takes_script=True),
    Phase("sanitize", SanitizeConfig, sanitize, "compute-sanitizer memcheck and racecheck, one op per family"),
    Phase("probe", ProbeConfig, probe, "CUDA probes, no ops: NVLink store rates; launch, NVLink and LL exchange "
          "latency floors", needs_ops=False),
    Phase("downstream", DownstreamConfig, downstream, "examples/downstream's app from its carried wheel"),
    Phase("script", ScriptConfig, run_script, "any script under torchrun in this environment", takes_script=True),
)}
