"""The lab's command line, machine, steps and phases, on the CPU: what each phase would run (steps
recorded, not executed), the step runner's limits, and the A/B rotation over real folders."""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from bench import ab, cli, phases, steps
from bench.config import add_flags, from_args, option
from bench.machine import Machine, MachineConfig


@pytest.fixture
def machine(tmp_path):
    def make(ranks=2, gpus=2):
        return Machine(ranks, gpus, MachineConfig(out=str(tmp_path / "out")))
    return make


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Steps the phases would run (argv), each 'passing' with the log text `logs` gives for its name."""
    ran, logs = [], {}

    def fake(step, m, budget=None):
        ran.append(step)
        m.out.mkdir(parents=True, exist_ok=True)
        step.log(m.out).write_text(logs.get(step.name, ""))
        return int(logs.get(step.name + ".rc", 0))
    for mod in (phases, ab):
        monkeypatch.setattr(mod, "execute", fake)
    return ran, logs


def test_a_configurations_fields_are_its_typed_flags():
    import argparse

    @dataclasses.dataclass(frozen=True)
    class C:
        n: int = option(3, "a count")
        sms: int | None = option(None, "optional")
        on: bool = option(True, "a switch")
        names: tuple[str, ...] = option(("a",), "several")
    ap = argparse.ArgumentParser()
    add_flags(ap, C)
    assert from_args(C, ap.parse_args([])) == C()
    got = from_args(C, ap.parse_args(["--n", "7", "--sms", "100", "--no-on", "--names", "x", "y"]))
    assert got == C(n=7, sms=100, on=False, names=("x", "y"))
    with pytest.raises(SystemExit):
        ap.parse_args(["--n", "seven"])
    with pytest.raises(TypeError, match="tuple"):
        option([1], "a list default")


def test_every_phase_parses_its_flags_and_only_script_phases_take_a_script(monkeypatch, capsys):
    for name in phases.PHASES:
        ns = cli.parser().parse_args([name, "2"])
        assert ns.ranks == 2 and ns.phase == name
    ran = []
    monkeypatch.setattr(cli, "count_gpus", lambda: 0)
    monkeypatch.setattr(Machine, "setup_python", lambda self: None)
    monkeypatch.setattr(Machine, "make_ops", lambda self: True)
    for p in phases.PHASES.values():
        monkeypatch.setitem(phases.PHASES, p.name, dataclasses.replace(p, run=lambda m, c: ran.append((m, c)) or True))
    assert cli.main(["ab", "4", "--rounds", "3", "--", "x.py", "--rounds", "9"]) == 0
    m, cfg = ran[-1]
    assert m.ranks == 4 and cfg == ab.AbConfig(script=("x.py", "--rounds", "9"), rounds=3)
    assert cli.main(["tests", "--select", "tests/gpu/test_moe_gpu.py -k batch", "--timeout", "90"]) == 0
    assert ran[-1][0].ranks == 2 and ran[-1][1] == phases.TestsConfig("tests/gpu/test_moe_gpu.py -k batch", 90)
    with pytest.raises(SystemExit, match="phase coll takes no script"):
        cli.main(["coll", "2", "--", "x.py"])


def test_the_machine_never_multicasts_and_shares_gpus_only_beyond_one_rank_per_gpu(machine):
    m = machine(4, 1)
    assert m.env["NVSHMEM_DISABLE_NVLS"] == "1" and m.env["NCCL_NVLS_ENABLE"] == "0"
    assert m.env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and m.env["CUDA_MODULE_LOADING"] in ("EAGER", "LAZY")
    assert m.shared and not machine(2, 2).shared and not machine(4, 8).shared and not machine(2, 0).shared
    assert m.with_ranks(1).ranks == 1 and not m.with_ranks(1).shared


def _wheel(folder, name, module_text):
    """A minimal pure-Python wheel of one module (what pip needs: the module, METADATA, WHEEL, RECORD)."""
    import zipfile
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": module_text, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_the_machine_installs_the_carried_wheels_and_unpacks_the_prebuilt_ops(machine, monkeypatch, tmp_path):
    """A phase's first minute on a fresh device machine: the carried wheels go to the machine's site folder,
    which the steps (PYTHONPATH) and the lab itself then import from; the prebuilt tarball's libraries land in
    generated/ and the steps find NVSHMEM's and TVM-FFI's libraries (LD_LIBRARY_PATH)."""
    import importlib

    from bench import machine as machine_mod
    pytest.importorskip("tvm_ffi")
    pytest.importorskip("nvidia.nvshmem")
    site = tmp_path / "site"
    monkeypatch.setattr(machine_mod, "SITE", site)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".whl").mkdir()
    _wheel(tmp_path / ".whl", "carried_probe_pkg", "VALUE = 42\n")
    lib = tmp_path / "pack" / "generated" / "op_x" / "_build" / "libtilegen_op_x.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"\x7fELF")
    (tmp_path / ".prebuilt").mkdir()
    with tarfile.open(tmp_path / ".prebuilt" / "ops.tar.xz", "w:xz") as t:
        t.add(tmp_path / "pack" / "generated", arcname="generated")
    m = machine(2, 1)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert m.make_ops() and m.make_ops()  # (the second: already made)
    assert (site / "carried_probe_pkg.py").is_file()
    assert m.env["PYTHONPATH"].split(os.pathsep) == [str(site), str(tmp_path)]
    assert importlib.import_module("carried_probe_pkg").VALUE == 42
    monkeypatch.delitem(sys.modules, "carried_probe_pkg")
    assert (tmp_path / "generated" / "op_x" / "_build" / "libtilegen_op_x.so").read_bytes() == b"\x7fELF"
    libs = m.env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert libs[0].endswith(os.path.join("nvidia", "nvshmem", "lib"))
    assert libs[1].endswith(os.path.join("tvm_ffi", "lib"))
    ran = subprocess.run([sys.executable, "-c", "import carried_probe_pkg; print(carried_probe_pkg.VALUE)"],
                         env=m.env, capture_output=True, text=True, cwd=tmp_path)
    assert ran.stdout.strip() == "42", ran.stderr


def test_the_machine_records_where_a_phases_figures_come_from(machine, monkeypatch, tmp_path):
    """A phase's provenance (what tools/report_measurements.py --add takes): the packed ops' commit only when
    the tree was clean, the cards and driver nvidia-smi lists, torch's and NCCL's versions as the steps import
    them, the command; no GPU: no cards."""
    from bench import machine as machine_mod
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".prebuilt").mkdir()
    rev = tmp_path / ".prebuilt" / "ops.rev"
    rev.write_text("0123456789abcdef0123456789abcdef01234567\n")
    smi = "NVIDIA H100 80GB HBM3, 580.159.04\nNVIDIA H100 80GB HBM3, 580.159.04\n"
    real_run = subprocess.run

    def fake_run(argv, *a, **kw):
        if argv[0] == "nvidia-smi":
            return subprocess.CompletedProcess(argv, 0, stdout=smi)
        return real_run(argv, *a, **kw)
    monkeypatch.setattr(machine_mod.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(machine_mod.subprocess, "run", fake_run)
    record = machine(2, 2).provenance("python3 -m bench hot 2")
    torch = pytest.importorskip("torch")
    assert record["commit"] == "0123456" and record["cards"] == "2 x NVIDIA H100 80GB HBM3"
    assert record["driver"] == "580.159.04" and record["torch"] == torch.__version__
    assert record["nccl"] and record["command"] == "python3 -m bench hot 2"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"])
    rev.write_text("0123456789abcdef0123456789abcdef01234567-dirty\n")
    smi = ""
    record = machine(2, 2).provenance("x")
    assert record["commit"] is None and record["cards"] is None and record["driver"] is None


def test_a_step_past_its_limit_is_killed_with_its_children(machine, tmp_path):
    m = machine()
    pidfile = tmp_path / "child.pid"
    code = f"import subprocess,time; p=subprocess.Popen(['sleep','60']); open('{pidfile}','w').write(str(p.pid)); " \
           "print('started', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    rc = steps.run_bounded([sys.executable, "-c", code], 2, m.env, subprocess.DEVNULL)
    assert rc == steps.TIMED_OUT and time.monotonic() - t0 < 15
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip() \
        in ("", "Z")  # (gone, or a zombie awaiting its reaped parent)


def test_a_step_shows_what_it_asks_for_and_the_logs_end_when_it_fails(machine, capsys):
    m = machine()
    s = steps.Step("s", (sys.executable, "-c", "print('noise'); print('host cost 3 us'); print('ranks on x');"
                        "print('table'); raise SystemExit(3)"), 30, grep="^host cost", after="ranks on")
    assert steps.execute(s, m) == 3
    out = capsys.readouterr().out
    assert out.startswith("host cost 3 us\nranks on x\ntable\ns: exit 3") and "noise" in out.split("exit 3")[1]
    assert (m.out / "s.log").read_text().startswith("noise")
    assert steps.execute(dataclasses.replace(s, tail_on_failure=0), m) == 3  # (0: the status line alone)
    assert capsys.readouterr().out.endswith("table\ns: exit 3\n")
    budget = steps.Budget(10)
    assert steps.execute(dataclasses.replace(s, timeout_s=200), m, budget) == steps.TIMED_OUT
    assert re.search(r"^s skipped: (9|10) s left of the phase's budget$", capsys.readouterr().out, re.M)


def test_gpu_tests_run_pytest_under_torchrun_and_sum_up_the_failures(machine, recorded, capsys):
    ran, logs = recorded
    fail = "FAILED tests/gpu/x.py::a - boom\n"
    logs["gpu_tests_np2"] = fail + "E   long traceback Error\n" + fail + "1 failed, 3 passed in 9s\n"
    assert phases.gpu_tests(machine(), phases.TestsConfig("tests/gpu/x.py -k a", 60))
    argv = ran[0].argv
    assert argv[:3] == ("torchrun", "--nproc-per-node", "2")
    assert argv[3:8] == ("-m", "pytest", "tests/gpu/x.py", "-k", "a")
    assert ran[0].timeout_s == 60
    assert capsys.readouterr().out == fail + "== gpu tests at 2 ranks: 1 failed, 3 passed in 9s\n"


def test_quick_runs_the_tests_at_two_ranks_then_at_every_gpu(machine, recorded):
    ran, _ = recorded
    phases.quick(machine(2, 4), phases.TestsConfig())
    assert [s.argv[2] for s in ran] == ["2", "4"]
    ran.clear()
    phases.quick(machine(2, 2), phases.TestsConfig())
    assert [s.argv[2] for s in ran] == ["2"]


def test_sanitize_runs_each_tool_one_gpu_per_rank_and_fails_on_a_report(machine, recorded, capsys):
    ran, logs = recorded
    assert phases.sanitize(machine(2, 2), phases.SanitizeConfig())
    assert [s.name for s in ran] == ["sanitize_memcheck_np2", "sanitize_racecheck_np2"]
    assert ran[0].argv[:8] == ("torchrun", "--nproc-per-node", "2", "--no-python", "compute-sanitizer", "--tool",
                               "memcheck", "--error-exitcode") and ran[0].argv[-1].endswith("sanitize_ops.py")
    logs["sanitize_racecheck_np2.rc"] = 9
    assert not phases.sanitize(machine(2, 2), phases.SanitizeConfig())
    ran.clear()
    assert not phases.sanitize(machine(4, 2), phases.SanitizeConfig()) and not ran
    assert "sanitize needs one GPU per rank: 4 ranks, 2 GPU(s)" in capsys.readouterr().out


def test_profile_wraps_rank_zero_only(machine, recorded, monkeypatch):
    ran, _ = recorded
    phases.profile(machine(), phases.ProfileConfig(kernel="ll_", script=("x.py", "--n", "1"), metrics="a,b"))
    argv = ran[0].argv
    cut = argv.index("--")
    assert argv[cut - 3:cut] == (sys.executable, "-m", "bench.rank0") and argv[cut + 1] == "ncu"
    assert "regex:ll_" in argv and ("--metrics", "a,b") == argv[argv.index("--metrics"):argv.index("--metrics") + 2]
    assert argv[-3:] == ("x.py", "--n", "1")
    from bench import rank0
    execs = []
    monkeypatch.setattr("os.execvp", lambda f, a: execs.append(a))
    for r in ("0", "1"):
        monkeypatch.setenv("RANK", r)
        rank0.main(["--", "ncu", "-x", "--", "s.py", "a"])
    assert execs == [["ncu", "-x", sys.executable, "s.py", "a"], [sys.executable, "s.py", "a"]]


def _tarball(path, side, marker=True):
    src = path.parent / f"pkg_{side}" / "generated"
    (src / "op" / "_build").mkdir(parents=True)
    (src / "op" / "_build" / "libop.so").write_text(side)
    if marker:
        (src / "MARKER").write_text(side + "\n")
    with tarfile.open(path, "w:xz") as t:
        t.add(src, arcname="generated")


def test_ab_runs_every_side_on_its_own_build_in_turns(machine, monkeypatch, tmp_path, capsys):
    """The base's build, each variant's, then the tree's, in turns (even rounds reversed), the tree's
    build back in place, and each side's range of one number over every rank and round."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ab, "WORK", tmp_path / "ab_work")
    pre = tmp_path / ".prebuilt"
    pre.mkdir()
    for side, name in (("base", "base"), ("v1", "ab_v1"), ("v2", "ab_v2")):
        _tarball(pre / f"{name}.tar.xz", side)
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "MARKER").write_text("tree\n")

    def fake(step, m, budget=None):  # what the script saw: the build ./generated points at
        seen = (tmp_path / "generated" / "MARKER").read_text().strip()
        m.out.mkdir(parents=True, exist_ok=True)
        step.log(m.out).write_text(f"side sees: {seen}\nrank 0: dispatch {len(seen) + 1}.5\n")
        return 0
    monkeypatch.setattr(ab, "execute", fake)
    m = machine()
    assert ab.run_ab(m, ab.AbConfig(script=("s.py",), summary=r"dispatch ([0-9.]+)"))
    out = capsys.readouterr().out
    runs = re.findall(r"== (\w+), round (\d)\nside sees: (\w+)", out)
    sides = ["base", "v1", "v2", "tree"]
    assert runs == [(s, "1", s) for s in sides] + [(s, "2", s) for s in reversed(sides)], out
    summary = dict(re.findall(r"^  (\w+) +(.*)$", out.split("== summary")[1], re.M))
    assert summary == {s: f"{len(s) + 1}.5 / {len(s) + 1}.5 / {len(s) + 1}.5 (2 values)" for s in sides}
    assert (tmp_path / "generated").is_dir() and not (tmp_path / "generated").is_symlink()
    assert (tmp_path / "generated" / "MARKER").read_text() == "tree\n"


def test_ab_restores_the_trees_build_after_an_interrupted_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "w"
    (work / "tree" / "generated").mkdir(parents=True)
    (work / "tree" / "generated" / "MARKER").write_text("tree")
    (work / "base" / "generated").mkdir(parents=True)
    (tmp_path / "generated").symlink_to(work / "base" / "generated")
    ab.restore_tree(work)
    assert not (tmp_path / "generated").is_symlink() and (tmp_path / "generated" / "MARKER").read_text() == "tree"


def test_ab_without_a_base_says_how_to_make_one(machine, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert not ab.run_ab(machine(), ab.AbConfig(script=("s.py",)))
    assert "BASE=<rev> bash tools/pack_prebuilt.sh" in capsys.readouterr().out


@pytest.mark.nvcc
@pytest.mark.parametrize("name", sorted(phases.PROBES.values()))
def test_each_probe_compiles_with_the_phases_flags(tmp_path, name):
    """bench/scripts/<probe>.cu builds with the flags the probe phase uses."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    r = subprocess.run(["nvcc", *phases.PROBE_NVCC_FLAGS, str(phases.SCRIPTS / f"{name}.cu"), "-o",
                        str(tmp_path / "probe")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_probe_runs_each_probe_at_every_gpu_count_it_can(machine, recorded, monkeypatch, tmp_path, capsys):
    """The latency probe runs at 1 GPU (its launch floors) and at N and 2; the store probe needs 2 GPUs and says
    so where there is one; an unknown probe name fails before anything builds."""
    ran, logs = recorded
    monkeypatch.chdir(tmp_path)
    assert phases.probe(machine(4, 4), phases.ProbeConfig())
    out = str(tmp_path / "out")
    assert [(s.name, s.argv[1:]) for s in ran if not s.name.endswith("_build")] == [
        ("probe_nvlink_stores_4", ("4", "15")), ("probe_nvlink_stores_2", ("2", "15")),
        ("probe_latency_floor_4", ("4", "15", "50", f"{out}/probe_latency_floor_4.json")),
        ("probe_latency_floor_2", ("2", "15", "50", f"{out}/probe_latency_floor_2.json"))]
    ran.clear()
    assert phases.probe(machine(2, 1), phases.ProbeConfig(repeats=5))
    assert [(s.name, s.argv[1:]) for s in ran if not s.name.endswith("_build")] == [
        ("probe_latency_floor_1", ("1", "5", "50", f"{out}/probe_latency_floor_1.json"))]
    assert "probe stores: needs 2 GPUs, this machine has 1: skipped" in capsys.readouterr().out
    ran.clear()
    logs["probe_latency_floor_2.rc"] = 1
    assert not phases.probe(machine(2, 2), phases.ProbeConfig(probes=("latency",)))
    ran.clear()
    assert not phases.probe(machine(2, 2), phases.ProbeConfig(probes=("latency", "ping")))
    assert not ran and "unknown probe(s) ['ping']" in capsys.readouterr().out


@pytest.mark.parametrize("phase, cfg", [
    ("coll", phases.CollConfig(graph=False, reps=5)), ("hot", phases.HotConfig(sizes=False)),
    ("gemm", phases.GemmConfig(styles="all", splits="1,2,3")),
    ("moe", phases.MoeConfig()), ("moe", phases.MoeConfig(low_latency=True, trace=True)),
    ("sanitize", phases.SanitizeConfig())])
def test_each_phase_passes_its_scripts_only_flags_they_define(machine, recorded, phase, cfg):
    """A flag a script does not define fails the step on the device, minutes into a call: every --flag a
    phase passes after a bench/scripts/ script is one that script's argument parser names."""
    ran, _ = recorded
    phases.PHASES[phase].run(machine(), cfg)
    checked = 0
    for step in ran:
        at = [i for i, a in enumerate(step.argv) if a.startswith(str(phases.SCRIPTS))]
        if not at:
            continue
        source = (phases.SCRIPTS / step.argv[at[0]].rsplit("/", 1)[1]).read_text()
        for flag in (a for a in step.argv[at[0] + 1:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{step.name}: {flag} is not a flag of {step.argv[at[0]]}"
            checked += 1
    assert checked or phase == "sanitize"
